// Row kernels of the grouped-LoRA CPU backend: a block of tokens of one language against that
// language's r weight rows.
//
// Every LoRA product of the op is one of three shapes, applied to rows gathered by the routing:
//   dot_tokens     acc[t][j] += w[j][i] * x_t[i] (lane-wise; finish_dots sums the lanes)
//                                                                  h = A_l x,  u = (B_l*M_l)^T dy
//   combine_tokens out_t[i] = base_t[i] + sum_j c[t][j] * w[j][i]  y = base + s (B_l*M_l) h,  dx = A_l^T g
//   rank_update    G[j][i] += sum_t c[t][j] * row_t[i]             dA_l += g^T x,  dB_l^T += s h^T dy
//
// They are small GEMMs, register-blocked over several tokens of the same language: a weight vector
// loaded once feeds kTokenBlock tokens, and a tile of the weights stays in L2 while a whole chunk of
// tokens passes over it. Walking token by token, every token re-read its language's whole weight
// set, which at rank 64 and d = 4096 (1 MiB of staged s (B*M)^T) is far beyond L2: the large-rank
// languages were bound by those re-reads. Same process, old and new kernels interleaved, fp32,
// T=2048, 1 thread, 2-core AMD EPYC (shared; medians of 5-7): mixed ranks 2/8/64, 1024->4096:
// forward 103 -> 22 ms, backward 51 -> 35-41 ms (base forward ~200 ms); lang30 4096->1024:
// forward 6.9 -> 6.4 ms, backward 47 -> 13 ms; lang30 1024->1024: forward 2.2 -> 1.9-2.0 ms,
// backward 3.3 -> 3.1 ms.
//
// Register budget: 16 vector registers (AVX2; SSE2 and NEON hold a vec_t in two). Each kernel keeps
// at most 8 accumulators + its operands live, so that neither variant spills in its inner loop.
#pragma once

#include <algorithm>

#include "simd.h"

namespace lslo {

// Tokens per register block: each loaded weight vector is used this many times.
constexpr int kTokenBlock = 4;
// Rank rows per block of dot_tokens: kTokenBlock * kDotRanks accumulators + kDotRanks weight
// vectors + one token vector.
constexpr int kDotRanks = 2;
// Rank rows per block of rank_update: kUpdateRanks * 2 accumulator vectors + 2 row vectors + one
// broadcast coefficient.
constexpr int kUpdateRanks = 4;
// Elements of a row per tile of dot_tokens: kTokenBlock token rows of this length (8 KiB in fp32)
// stay in L1 while the rank blocks pass over them, and r weight rows of it in L2 while the token
// blocks do.
constexpr int64_t kDotTile = 512;
// Bytes of weight rows per tile of combine_tokens: the tile stays in L2 while the tokens of a chunk
// pass over it, so the weights come from memory once per chunk, not once per token block.
constexpr int64_t kCombineTileBytes = int64_t(256) << 10;

// acc[t * ldacc + j] += lane-wise w[j * ldw + i] * x[t][i] over i in [i0, i1), for t < MT, j < RB
// (the caller zeroes acc and sums its lanes with finish_dots). i0 is a multiple of the width; the
// row ends at n (i1 <= n), read without reading past it.
template <int MT, int RB, typename acc_t, typename scalar_t>
LSLO_INLINE void dot_block(const scalar_t* const* x, const acc_t* w, int64_t ldw, int64_t i0, int64_t i1,
                           vec_t<acc_t>* acc, int64_t ldacc) {
  using V = vec_t<acc_t>;
  constexpr int W = Simd<acc_t>::width;
  V a[MT][RB];
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < RB; ++j) a[t][j] = acc[t * ldacc + j];
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
    V wv[RB];
    for (int j = 0; j < RB; ++j) wv[j] = load<acc_t>(w + j * ldw + i);
    for (int t = 0; t < MT; ++t) {
      const V xv = load<acc_t>(x[t] + i);
      for (int j = 0; j < RB; ++j) a[t][j] += xv * wv[j];
    }
  }
  if (i < i1) {
    V wv[RB];
    for (int j = 0; j < RB; ++j) wv[j] = load_partial<acc_t>(w + j * ldw + i, i1 - i);
    for (int t = 0; t < MT; ++t) {
      const V xv = load_partial<acc_t>(x[t] + i, i1 - i);
      for (int j = 0; j < RB; ++j) a[t][j] += xv * wv[j];
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < RB; ++j) acc[t * ldacc + j] = a[t][j];
}

// Rank rows per block for a block of MT tokens: 8 accumulators whatever MT, so that a lone token
// (decoding: one token per language) still has 8 independent FMA chains, not 2 waiting on the FMA
// latency.
template <int MT>
constexpr int dot_ranks() {
  return MT == 1 ? 8 : MT == 2 ? 4 : kDotRanks;
}

template <int MT, int RB, typename acc_t, typename scalar_t>
LSLO_INLINE void dot_rank_rest(const scalar_t* const* x, const acc_t* w, int64_t ldw, int64_t i0, int64_t i1,
                               int64_t rest, vec_t<acc_t>* acc, int64_t ldacc) {
  if constexpr (RB > 0) {
    if (rest == RB)
      dot_block<MT, RB>(x, w, ldw, i0, i1, acc, ldacc);
    else
      dot_rank_rest<MT, RB - 1>(x, w, ldw, i0, i1, rest, acc, ldacc);
  }
}

template <int MT, typename acc_t, typename scalar_t>
LSLO_INLINE void dot_tokens_mt(const scalar_t* const* x, const acc_t* w, int64_t ldw, int64_t i0, int64_t i1,
                               int64_t r, vec_t<acc_t>* acc) {
  constexpr int RB = dot_ranks<MT>();
  int64_t j = 0;
  for (; j + RB <= r; j += RB) dot_block<MT, RB>(x, w + j * ldw, ldw, i0, i1, acc + j, r);
  if (j < r) dot_rank_rest<MT, RB - 1>(x, w + j * ldw, ldw, i0, i1, r - j, acc + j, r);
}

// acc[t * r + j] += lane-wise w[j * ldw + i] * x[t][i] over i < n, for t < nt, j < r: the nt tokens
// of a chunk, in tiles of kDotTile elements: a tile of the weight rows (r * 2 KiB in fp32) stays in
// L2 while all token blocks pass over it, so the weights come from memory once per chunk, and a
// token block's tile of x stays in L1 while the rank blocks pass over it.
template <typename acc_t, typename scalar_t>
LSLO_INLINE void dot_tokens(const scalar_t* const* x, int nt, const acc_t* w, int64_t ldw, int64_t n, int64_t r,
                            vec_t<acc_t>* acc) {
  for (int64_t i0 = 0; i0 < n; i0 += kDotTile) {
    const int64_t i1 = std::min(n, i0 + kDotTile);
    int t = 0;
    for (; t + 4 <= nt; t += 4) dot_tokens_mt<4>(x + t, w, ldw, i0, i1, r, acc + t * r);
    switch (nt - t) {
      case 3: dot_tokens_mt<3>(x + t, w, ldw, i0, i1, r, acc + t * r); break;
      case 2: dot_tokens_mt<2>(x + t, w, ldw, i0, i1, r, acc + t * r); break;
      case 1: dot_tokens_mt<1>(x + t, w, ldw, i0, i1, r, acc + t * r); break;
      default: break;
    }
  }
  static_assert(kTokenBlock == 4, "dot_tokens dispatches token blocks of 1..4");
}

// out[j] = sum of the lanes of acc[j], j < count.
template <typename acc_t>
LSLO_INLINE void finish_dots(const vec_t<acc_t>* acc, int64_t count, acc_t* out) {
  for (int64_t j = 0; j < count; ++j) out[j] = sum_lanes<acc_t>(acc[j]);
}

// Output vectors per strip for a block of MT tokens: 8 accumulators whatever MT (a lone token gets
// 8 independent FMA chains).
template <int MT>
constexpr int combine_vectors() {
  return MT == 1 ? 8 : MT == 2 ? 4 : 2;
}

// out[t][i] = base[t][i] + sum_j c[t * ldc + j] * w[j * ldw + i] for t < MT, i in [i0, i1)
// (base = 0 when kHasBase is false), written once in the output dtype, so y never takes a second
// pass through memory. Output strips of NV vectors: MT * NV accumulators. i0 is a multiple of
// the width; the last < NV vectors of [i0, i1) and the row's partial tail go one vector at a time.
template <bool kHasBase, int MT, typename acc_t, typename scalar_t>
LSLO_INLINE void combine_block(scalar_t* const* out, const scalar_t* const* base, const acc_t* c, int64_t ldc,
                               const acc_t* w, int64_t ldw, int64_t r, int64_t i0, int64_t i1, bool stream) {
  using V = vec_t<acc_t>;
  constexpr int W = Simd<acc_t>::width;
  constexpr int NV = combine_vectors<MT>();
  auto put = [&](scalar_t* dst, V v) {
    if (stream)
      store_stream<acc_t>(dst, v);
    else
      store<acc_t>(dst, v);
  };
  int64_t i = i0;
  for (; i + NV * W <= i1; i += NV * W) {
    V acc[MT][NV];
    for (int t = 0; t < MT; ++t)
      for (int v = 0; v < NV; ++v) {
        if constexpr (kHasBase)
          acc[t][v] = load<acc_t>(base[t] + i + v * W);
        else
          acc[t][v] = V{};
      }
    const acc_t* wj = w + i;
    for (int64_t j = 0; j < r; ++j, wj += ldw) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load<acc_t>(wj + v * W);
      for (int t = 0; t < MT; ++t) {
        const V cb = broadcast<acc_t>(c[t * ldc + j]);
        for (int v = 0; v < NV; ++v) acc[t][v] += cb * wv[v];
      }
    }
    for (int t = 0; t < MT; ++t)
      for (int v = 0; v < NV; ++v) put(out[t] + i + v * W, acc[t][v]);
  }
  for (; i < i1; i += W) {  // the last < NV vectors
    const int64_t m = std::min<int64_t>(W, i1 - i);
    V acc[MT];
    for (int t = 0; t < MT; ++t) {
      if constexpr (kHasBase)
        acc[t] = m == W ? load<acc_t>(base[t] + i) : load_partial<acc_t>(base[t] + i, m);
      else
        acc[t] = V{};
    }
    for (int64_t j = 0; j < r; ++j) {
      const V wv = m == W ? load<acc_t>(w + j * ldw + i) : load_partial<acc_t>(w + j * ldw + i, m);
      for (int t = 0; t < MT; ++t) acc[t] += broadcast<acc_t>(c[t * ldc + j]) * wv;
    }
    for (int t = 0; t < MT; ++t) {
      if (m == W)
        put(out[t] + i, acc[t]);
      else
        store_partial<acc_t>(out[t] + i, acc[t], m);
    }
  }
}

// out_t = base_t + sum_j c[t * ldc + j] * w[j] for the nt tokens of a chunk (rows out[t], base[t],
// length n), in tiles of the weight rows that stay in L2 across the chunk's token blocks.
// stream: write out with non-temporal stores (rows 16-byte aligned).
template <bool kHasBase, typename acc_t, typename scalar_t>
LSLO_INLINE void combine_tokens(scalar_t* const* out, const scalar_t* const* base, int nt, const acc_t* c,
                                int64_t ldc, const acc_t* w, int64_t ldw, int64_t n, int64_t r, bool stream) {
  constexpr int64_t W8 = 8 * Simd<acc_t>::width;  // a multiple of every strip
  const int64_t tile = std::max<int64_t>(W8, kCombineTileBytes / (std::max<int64_t>(r, 1) * sizeof(acc_t)) / W8 * W8);
  for (int64_t i0 = 0; i0 < n; i0 += tile) {
    const int64_t i1 = std::min(n, i0 + tile);
    int t = 0;
    for (; t + 4 <= nt; t += 4)
      combine_block<kHasBase, 4>(out + t, kHasBase ? base + t : base, c + t * ldc, ldc, w, ldw, r, i0, i1, stream);
    const scalar_t* const* base_t = kHasBase ? base + t : base;  // base is null without kHasBase
    switch (nt - t) {
      case 3: combine_block<kHasBase, 3>(out + t, base_t, c + t * ldc, ldc, w, ldw, r, i0, i1, stream); break;
      case 2: combine_block<kHasBase, 2>(out + t, base_t, c + t * ldc, ldc, w, ldw, r, i0, i1, stream); break;
      case 1: combine_block<kHasBase, 1>(out + t, base_t, c + t * ldc, ldc, w, ldw, r, i0, i1, stream); break;
      default: break;
    }
  }
  static_assert(kTokenBlock == 4, "combine_tokens dispatches token blocks of 1..4");
}

// G[j * ldg + i] += sum_t c[t * ldc + j] * rows[t][i] for j < RB, t < nt, i in one strip [i, i + NV
// widths), or the row's tail of m < width elements (NV = 1, partial).
template <int RB, int NV, bool kPartial, typename acc_t, typename scalar_t>
LSLO_INLINE void rank_update_strip(acc_t* G, int64_t ldg, const scalar_t* const* rows, const acc_t* c, int64_t ldc,
                                   int nt, int64_t i, int64_t m) {
  using V = vec_t<acc_t>;
  constexpr int W = Simd<acc_t>::width;
  V acc[RB][NV];
  for (int j = 0; j < RB; ++j)
    for (int v = 0; v < NV; ++v)
      acc[j][v] = kPartial ? load_partial<acc_t>(G + j * ldg + i, m) : load<acc_t>(G + j * ldg + i + v * W);
  for (int t = 0; t < nt; ++t) {
    V xv[NV];
    for (int v = 0; v < NV; ++v)
      xv[v] = kPartial ? load_partial<acc_t>(rows[t] + i, m) : load<acc_t>(rows[t] + i + v * W);
    for (int j = 0; j < RB; ++j) {
      const V cb = broadcast<acc_t>(c[t * ldc + j]);
      for (int v = 0; v < NV; ++v) acc[j][v] += cb * xv[v];
    }
  }
  for (int j = 0; j < RB; ++j)
    for (int v = 0; v < NV; ++v) {
      if (kPartial)
        store_partial<acc_t>(G + j * ldg + i, acc[j][v], m);
      else
        store<acc_t>(G + j * ldg + i + v * W, acc[j][v]);
    }
}

// All r rank rows of G for one strip: rank blocks of kUpdateRanks, the strip of the nt rows
// reloaded from L1 by each.
template <int NV, bool kPartial, typename acc_t, typename scalar_t>
LSLO_INLINE void rank_update_strips(acc_t* G, int64_t ldg, const scalar_t* const* rows, const acc_t* c, int64_t ldc,
                                    int nt, int64_t r, int64_t i, int64_t m) {
  int64_t j = 0;
  for (; j + kUpdateRanks <= r; j += kUpdateRanks)
    rank_update_strip<kUpdateRanks, NV, kPartial>(G + j * ldg, ldg, rows, c + j, ldc, nt, i, m);
  switch (r - j) {
    case 3: rank_update_strip<3, NV, kPartial>(G + j * ldg, ldg, rows, c + j, ldc, nt, i, m); break;
    case 2: rank_update_strip<2, NV, kPartial>(G + j * ldg, ldg, rows, c + j, ldc, nt, i, m); break;
    case 1: rank_update_strip<1, NV, kPartial>(G + j * ldg, ldg, rows, c + j, ldc, nt, i, m); break;
    default: break;
  }
  static_assert(kUpdateRanks == 4, "rank_update dispatches rank blocks of 1..4");
}

// G[j * ldg + i] += sum_t c[t * ldc + j] * rows[t][i] for j < r, t < nt, i < n: every element of G
// is loaded and stored once per call (a chunk of tokens, not once per few tokens), and the strip of
// the nt rows (nt cache lines) stays in L1 while the rank blocks pass over it.
//
// The nt rows are read strip by strip, nt streams at once, more than the hardware prefetcher
// follows: each strip prefetches the rows kUpdatePrefetch elements ahead. (x reaches dA's update
// from memory, its first read in the backward: without it, the backward of 1024->1024, lang30,
// T=2048 spent a third of its time waiting on those loads, 1 thread, AMD EPYC.)
template <typename acc_t, typename scalar_t>
LSLO_INLINE void rank_update(acc_t* G, int64_t ldg, const scalar_t* const* rows, const acc_t* c, int64_t ldc,
                             int nt, int64_t n, int64_t r) {
  constexpr int W = Simd<acc_t>::width;
  constexpr int64_t kUpdatePrefetch = 8 * W;  // 4 strips
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    if (i + kUpdatePrefetch < n)
      for (int t = 0; t < nt; ++t) __builtin_prefetch(static_cast<const void*>(rows[t] + i + kUpdatePrefetch), 0, 3);
    rank_update_strips<2, false>(G, ldg, rows, c, ldc, nt, r, i, 0);
  }
  for (; i + W <= n; i += W) rank_update_strips<1, false>(G, ldg, rows, c, ldc, nt, r, i, 0);
  if (i < n) rank_update_strips<1, true>(G, ldg, rows, c, ldc, nt, r, i, n - i);
}

}  // namespace lslo
