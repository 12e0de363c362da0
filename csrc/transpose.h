// The two transposes of the op: B (d, R) -> scaled, masked B^T (R, ldb) before the row kernels,
// and the accumulated dB^T (R, ldb) -> dB (d, R) after them.
//
// They touch R * d elements per call whatever the batch, which at decoding sizes (T=160,
// 1024->1024) is as much work as the tokens'. Both go through 8 x 8 blocks transposed in
// registers: the (d, R) side is read or written 8 contiguous elements per row, the (R, ldb) side
// 8 contiguous elements per column. Element by element through a scalar tile, the staging alone
// took half of the forward at T=160 (fp32, AMD EPYC); a column-by-column loop, one cache line per
// element, 2.4 ns per element.
//
// The mask multiplies, as in the reference (so inf/nan in B propagate alike), rather than
// selects: a select compiled to a branch on a random mask, mispredicted half the time.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "simd.h"

namespace lslo {

// Columns of B to stage: those of the languages with tokens (a decoding batch often has a single
// target language, and staging all R columns would cost R / r times the useful work), merged into
// contiguous ranges; and each column's scale s_l.
template <typename acc_t>
struct StagedColumns {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const acc_t* scale = nullptr;  // (R,)
};

// 8 bools (0/1 bytes) -> 8 floats. GCC scalarises a uint8 -> float (or -> int32) vector
// conversion into 8 separate conversions, and a vector built from scalars goes through the stack
// (a store-forwarding stall per call: it made the staging 40% slower). This is vmovq, vpermd,
// vpsrlvd, vpand, vcvtdq2ps on AVX2.
LSLO_INLINE vec_t<float> load_mask8(const bool* m) {
  typedef uint32_t words8 __attribute__((vector_size(32)));
  typedef int32_t ints8 __attribute__((vector_size(32)));
  typedef uint64_t quads4 __attribute__((vector_size(32)));
  uint64_t bytes;
  std::memcpy(&bytes, m, sizeof(bytes));
  const words8 pair = (words8)(quads4){bytes, 0, 0, 0};  // lanes: bytes 0-3, bytes 4-7, 0, ...
  const words8 words = __builtin_shuffle(pair, words8{0, 0, 0, 0, 1, 1, 1, 1});
  const words8 shifts = {0, 8, 16, 24, 0, 8, 16, 24};
  return __builtin_convertvector((ints8)((words >> shifts) & 0xFFu), vec_t<float>);
}

// Rows m[0..7] -> columns m[0..7], in 24 in-lane shuffles (unpack, shufps, 128-bit permute).
LSLO_INLINE void transpose8x8(vec_t<float> (&m)[8]) {
  typedef int32_t idx __attribute__((vector_size(32)));
  vec_t<float> t[8], u[8];
  for (int p = 0; p < 8; p += 2) {
    t[p] = __builtin_shuffle(m[p], m[p + 1], idx{0, 8, 1, 9, 4, 12, 5, 13});
    t[p + 1] = __builtin_shuffle(m[p], m[p + 1], idx{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int q = 0; q < 8; q += 4) {
    u[q] = __builtin_shuffle(t[q], t[q + 2], idx{0, 1, 8, 9, 4, 5, 12, 13});
    u[q + 1] = __builtin_shuffle(t[q], t[q + 2], idx{2, 3, 10, 11, 6, 7, 14, 15});
    u[q + 2] = __builtin_shuffle(t[q + 1], t[q + 3], idx{0, 1, 8, 9, 4, 5, 12, 13});
    u[q + 3] = __builtin_shuffle(t[q + 1], t[q + 3], idx{2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int c = 0; c < 4; ++c) {
    m[c] = __builtin_shuffle(u[c], u[c + 4], idx{0, 1, 2, 3, 8, 9, 10, 11});
    m[c + 4] = __builtin_shuffle(u[c], u[c + 4], idx{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// bmt[(c - col0) * ldb + i] = scale[c] * B[i][c] * M[i][c] for the staged columns c, rows [i0, i1).
template <typename acc_t, typename scalar_t>
LSLO_INLINE void stage_bmt_tile(acc_t* bmt, int64_t ldb, int64_t col0, const scalar_t* b, const bool* mask, int64_t R,
                                const StagedColumns<acc_t>& cols, int64_t i0, int64_t i1) {
  for (const auto& range : cols.ranges) {
    int64_t c0 = range.first;
    if constexpr (std::is_same_v<acc_t, float>) {
      for (; c0 + 8 <= range.second; c0 += 8) {
        const vec_t<float> scale = load<float>(cols.scale + c0);
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8) {
          vec_t<float> m[8];
          for (int ii = 0; ii < 8; ++ii)
            m[ii] = scale * (load<float>(b + (i + ii) * R + c0) * load_mask8(mask + (i + ii) * R + c0));
          transpose8x8(m);
          for (int cc = 0; cc < 8; ++cc) store<float>(bmt + (c0 + cc - col0) * ldb + i, m[cc]);
        }
        for (; i < i1; ++i)
          for (int64_t c = c0; c < c0 + 8; ++c)
            bmt[(c - col0) * ldb + i] =
                cols.scale[c] * (static_cast<acc_t>(b[i * R + c]) * static_cast<acc_t>(mask[i * R + c]));
      }
    }
    for (; c0 < range.second; ++c0)  // fp64, or the last < 8 columns of a range
      for (int64_t i = i0; i < i1; ++i)
        bmt[(c0 - col0) * ldb + i] =
            cols.scale[c0] * (static_cast<acc_t>(b[i * R + c0]) * static_cast<acc_t>(mask[i * R + c0]));
  }
}

// Rows of B per tile of the staging: the tile's rows of B and M (64 * R elements) stay in L2 while
// the column blocks pass over them. Column block outer over all d rows read every line of B twice
// and every line of M eight times from memory (half / an eighth of it used per pass): with 740
// columns and d = 4096 (mixed ranks 2/8/64, 1024->4096) that took 11-13% of the forward and of the
// backward (fp32, 1 thread, AMD EPYC).
constexpr int64_t kStageRows = 64;

// bmt[(c - col0) * ldb + i] = scale[c] * B[i][c] * M[i][c] for the staged columns c, rows [i0, i1).
template <typename acc_t, typename scalar_t>
LSLO_INLINE void stage_bmt_rows(acc_t* bmt, int64_t ldb, int64_t col0, const scalar_t* b, const bool* mask, int64_t R,
                                const StagedColumns<acc_t>& cols, int64_t i0, int64_t i1) {
  for (int64_t t0 = i0; t0 < i1; t0 += kStageRows)
    stage_bmt_tile(bmt, ldb, col0, b, mask, R, cols, t0, std::min(i1, t0 + kStageRows));
}

// grad_b[i][c] = gbt[c * ldb + i] * M[i][c], in B's dtype, for all columns and rows [i0, i1).
template <typename acc_t, typename scalar_t>
LSLO_INLINE void unstage_grad_b_rows(scalar_t* grad_b, const acc_t* gbt, int64_t ldb, const bool* mask, int64_t R,
                                     int64_t i0, int64_t i1) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; c0 + 8 <= R; c0 += 8) {
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        vec_t<float> m[8];
        for (int cc = 0; cc < 8; ++cc) m[cc] = load<float>(gbt + (c0 + cc) * ldb + i);
        transpose8x8(m);
        for (int ii = 0; ii < 8; ++ii)
          store<float>(grad_b + (i + ii) * R + c0, m[ii] * load_mask8(mask + (i + ii) * R + c0));
      }
      for (; i < i1; ++i)
        for (int64_t c = c0; c < c0 + 8; ++c)
          grad_b[i * R + c] = static_cast<scalar_t>(gbt[c * ldb + i] * static_cast<acc_t>(mask[i * R + c]));
    }
  }
  for (int64_t i = i0; i < i1; ++i)  // fp64, or the last < 8 columns
    for (int64_t c = c0; c < R; ++c)
      grad_b[i * R + c] = static_cast<scalar_t>(gbt[c * ldb + i] * static_cast<acc_t>(mask[i * R + c]));
}

}  // namespace lslo
