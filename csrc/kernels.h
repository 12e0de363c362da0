// Row kernels of the grouped-LoRA CPU backend: a token's row against a language's r weight rows.
//
// Every LoRA product of the op is one of three shapes, applied to rows gathered by the routing:
//   dot_rows     acc[j] += w[j][i] * x[i] (lane-wise; finish_dots sums the lanes)
//                                                                  h = A_l x,  g = s (B_l*M_l)^T dy
//   combine_rows out[i]  = base[i] + sum_j c[j] * w[j][i]          y = base + s (B_l*M_l) h,  dx = A_l^T g
//   rank_update  G[j][i] += sum_t c[t][j] * row_t[i]               dA_l += g^T x,  dB_l^T += s h^T dy
// The rank is small (1..64), so the accumulators of a vector of lanes for all r rank rows live in
// registers while the token's row streams through once; the weight rows (w, G) are the r rows of
// one language, hot in L1/L2 because tokens are visited language by language.
//
// Ranks 1..8 get a kernel each (compile-time r: accumulators and broadcast coefficients stay in
// registers, loops fully unrolled); larger ranks run in blocks of 8.
//
// Token rows are gathered (tokens of one language are ~L rows apart), so the hardware prefetcher
// restarts on every row; the streaming kernels take the next row to touch and prefetch it in step
// with the current one.
#pragma once

#include "simd.h"

namespace lslo {

constexpr int kMaxRankBlock = 8;  // 8 accumulators + operands fit the 16 vector registers

template <typename scalar_t>
LSLO_INLINE void prefetch_line(const scalar_t* p) {
  __builtin_prefetch(static_cast<const void*>(p), 0, 3);
}

// Independent accumulator chains per rank row: r = 1 or 2 would otherwise wait on the FMA latency
// (4 cycles) rather than its throughput (2 per cycle).
template <int RB>
constexpr int dot_unroll() {
  return RB == 1 ? 4 : RB <= 4 ? 2 : 1;
}

// acc[j] += lane-wise w[j * ldw + i] * x[i] over i < n, for j < RB (the caller zeroes acc and sums
// its lanes with finish_dots). Prefetches next[0:n) along the way.
template <int RB, typename acc_t, typename scalar_t>
LSLO_INLINE void dot_block(const scalar_t* x, const acc_t* w, int64_t ldw, int64_t n, vec_t<acc_t>* acc_io,
                           const scalar_t* next) {
  using V = vec_t<acc_t>;
  constexpr int W = Simd<acc_t>::width;
  constexpr int U = dot_unroll<RB>();
  V acc[U][RB];
  for (int j = 0; j < RB; ++j) acc[0][j] = acc_io[j];
  for (int u = 1; u < U; ++u)
    for (int j = 0; j < RB; ++j) acc[u][j] = V{};
  int64_t i = 0;
  for (; i + U * W <= n; i += U * W) {
    if (next) prefetch_line(next + i);
    for (int u = 0; u < U; ++u) {
      const V xv = load<acc_t>(x + i + u * W);
      for (int j = 0; j < RB; ++j) acc[u][j] += load<acc_t>(w + j * ldw + i + u * W) * xv;
    }
  }
  for (; i + W <= n; i += W) {
    if (next) prefetch_line(next + i);
    const V xv = load<acc_t>(x + i);
    for (int j = 0; j < RB; ++j) acc[0][j] += load<acc_t>(w + j * ldw + i) * xv;
  }
  if (i < n) {
    const V xv = load_partial<acc_t>(x + i, n - i);
    for (int j = 0; j < RB; ++j) acc[0][j] += load_partial<acc_t>(w + j * ldw + i, n - i) * xv;
  }
  for (int j = 0; j < RB; ++j) {
    V total = acc[0][j];
    for (int u = 1; u < U; ++u) total += acc[u][j];
    acc_io[j] = total;
  }
}

// acc[j] += lane-wise w[j * ldw + i] * x[i] over i < n, for j < r.
template <typename acc_t, typename scalar_t>
LSLO_INLINE void dot_rows(const scalar_t* x, const acc_t* w, int64_t ldw, int64_t n, int64_t r, vec_t<acc_t>* acc,
                          const scalar_t* next) {
  int64_t j = 0;
  for (; r - j > kMaxRankBlock; j += kMaxRankBlock)
    dot_block<kMaxRankBlock>(x, w + j * ldw, ldw, n, acc + j, j == 0 ? next : nullptr);
  const scalar_t* pf = j == 0 ? next : nullptr;
  w += j * ldw;
  acc += j;
  switch (r - j) {
    case 1: dot_block<1>(x, w, ldw, n, acc, pf); break;
    case 2: dot_block<2>(x, w, ldw, n, acc, pf); break;
    case 3: dot_block<3>(x, w, ldw, n, acc, pf); break;
    case 4: dot_block<4>(x, w, ldw, n, acc, pf); break;
    case 5: dot_block<5>(x, w, ldw, n, acc, pf); break;
    case 6: dot_block<6>(x, w, ldw, n, acc, pf); break;
    case 7: dot_block<7>(x, w, ldw, n, acc, pf); break;
    case 8: dot_block<8>(x, w, ldw, n, acc, pf); break;
    default: break;  // r == 0
  }
}

// out[j] = sum of the lanes of acc[j], j < r.
template <typename acc_t>
LSLO_INLINE void finish_dots(const vec_t<acc_t>* acc, int64_t r, acc_t* out) {
  for (int64_t j = 0; j < r; ++j) out[j] = sum_lanes<acc_t>(acc[j]);
}

// out[i] = base[i] + sum_j c[j] * w[j * ldw + i] for i < n (base = 0 when kHasBase is false),
// written once in the output dtype, so y never takes a second pass through memory. RB = 0: any
// rank, read from r.
template <bool kHasBase, int RB, typename acc_t, typename scalar_t>
LSLO_INLINE void combine_block(scalar_t* out, const scalar_t* base, const acc_t* c, const acc_t* w, int64_t ldw,
                               int64_t n, int64_t r, const scalar_t* next, bool stream) {
  using V = vec_t<acc_t>;
  constexpr int W = Simd<acc_t>::width;
  V coef[RB > 0 ? RB : 1];
  for (int j = 0; j < RB; ++j) coef[j] = broadcast<acc_t>(c[j]);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    if (next) prefetch_line(next + i);
    V acc{};
    if constexpr (kHasBase) acc = load<acc_t>(base + i);
    if constexpr (RB > 0) {
      for (int j = 0; j < RB; ++j) acc += coef[j] * load<acc_t>(w + j * ldw + i);
    } else {
      for (int64_t j = 0; j < r; ++j) acc += c[j] * load<acc_t>(w + j * ldw + i);
    }
    if (stream)
      store_stream<acc_t>(out + i, acc);
    else
      store<acc_t>(out + i, acc);
  }
  if (i < n) {
    V acc{};
    if constexpr (kHasBase) acc = load_partial<acc_t>(base + i, n - i);
    for (int64_t j = 0; j < r; ++j) acc += c[j] * load_partial<acc_t>(w + j * ldw + i, n - i);
    store_partial<acc_t>(out + i, acc, n - i);
  }
}

// stream: write out with non-temporal stores (out must be 16-byte aligned).
template <bool kHasBase, typename acc_t, typename scalar_t>
LSLO_INLINE void combine_rows(scalar_t* out, const scalar_t* base, const acc_t* c, const acc_t* w, int64_t ldw,
                              int64_t n, int64_t r, const scalar_t* next, bool stream) {
  switch (r) {
    case 1: combine_block<kHasBase, 1>(out, base, c, w, ldw, n, r, next, stream); break;
    case 2: combine_block<kHasBase, 2>(out, base, c, w, ldw, n, r, next, stream); break;
    case 3: combine_block<kHasBase, 3>(out, base, c, w, ldw, n, r, next, stream); break;
    case 4: combine_block<kHasBase, 4>(out, base, c, w, ldw, n, r, next, stream); break;
    case 5: combine_block<kHasBase, 5>(out, base, c, w, ldw, n, r, next, stream); break;
    case 6: combine_block<kHasBase, 6>(out, base, c, w, ldw, n, r, next, stream); break;
    case 7: combine_block<kHasBase, 7>(out, base, c, w, ldw, n, r, next, stream); break;
    case 8: combine_block<kHasBase, 8>(out, base, c, w, ldw, n, r, next, stream); break;
    default: combine_block<kHasBase, 0>(out, base, c, w, ldw, n, r, next, stream); break;  // r == 0 or r > 8
  }
}

// G[j * ldg + i] += sum_t c[t * ldc + j] * rows[t][i] for j < RB, t < nt, i < n.
template <int RB, typename acc_t, typename scalar_t>
LSLO_INLINE void rank_update_block(acc_t* G, int64_t ldg, const scalar_t* const* rows, const acc_t* c,
                                   int64_t ldc, int nt, int64_t n) {
  using V = vec_t<acc_t>;
  constexpr int W = Simd<acc_t>::width;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V acc[RB];
    for (int j = 0; j < RB; ++j) acc[j] = load<acc_t>(G + j * ldg + i);
    for (int t = 0; t < nt; ++t) {
      const V xv = load<acc_t>(rows[t] + i);
      for (int j = 0; j < RB; ++j) acc[j] += c[t * ldc + j] * xv;
    }
    for (int j = 0; j < RB; ++j) store<acc_t>(G + j * ldg + i, acc[j]);
  }
  if (i < n) {
    const int64_t m = n - i;
    V acc[RB];
    for (int j = 0; j < RB; ++j) acc[j] = load_partial<acc_t>(G + j * ldg + i, m);
    for (int t = 0; t < nt; ++t) {
      const V xv = load_partial<acc_t>(rows[t] + i, m);
      for (int j = 0; j < RB; ++j) acc[j] += c[t * ldc + j] * xv;
    }
    for (int j = 0; j < RB; ++j) store_partial<acc_t>(G + j * ldg + i, acc[j], m);
  }
}

template <typename acc_t, typename scalar_t>
LSLO_INLINE void rank_update(acc_t* G, int64_t ldg, const scalar_t* const* rows, const acc_t* c, int64_t ldc,
                             int nt, int64_t n, int64_t r) {
  int64_t j = 0;
  for (; r - j > kMaxRankBlock; j += kMaxRankBlock)
    rank_update_block<kMaxRankBlock>(G + j * ldg, ldg, rows, c + j, ldc, nt, n);
  G += j * ldg;
  c += j;
  switch (r - j) {
    case 1: rank_update_block<1>(G, ldg, rows, c, ldc, nt, n); break;
    case 2: rank_update_block<2>(G, ldg, rows, c, ldc, nt, n); break;
    case 3: rank_update_block<3>(G, ldg, rows, c, ldc, nt, n); break;
    case 4: rank_update_block<4>(G, ldg, rows, c, ldc, nt, n); break;
    case 5: rank_update_block<5>(G, ldg, rows, c, ldc, nt, n); break;
    case 6: rank_update_block<6>(G, ldg, rows, c, ldc, nt, n); break;
    case 7: rank_update_block<7>(G, ldg, rows, c, ldc, nt, n); break;
    case 8: rank_update_block<8>(G, ldg, rows, c, ldc, nt, n); break;
    default: break;
  }
}

}  // namespace lslo
