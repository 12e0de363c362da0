// CPU backend of the grouped language-specific LoRA op. Ops (schemas: lslo_kernels/spec.py, checked
// against these by tests/test_contract.py):
//   lslo_cpp::forward   -> (y, h)                                   training forward
//   lslo_cpp::backward  -> (grad_x, grad_a, grad_b, grad_scales)
//   lslo_cpp::add_      out += LoRA term in place, no h              inference
//   lslo_cpp::lora      -> y, with a C++ autograd node calling backward: training without a Python layer
//   lslo_cpp::linear_forward -> (y, h)   y = x W^T + bias + LoRA term: the frozen base Linear and the
//                                         LoRA term in one op (LoRA pass first, then the GEMM into it)
//   lslo_cpp::linear_lora    -> y        linear_forward with a C++ autograd node (training)
//   lslo_cpp::linear_decode  -> y        decoding: the same in one call, no h, optionally with
//                                         the factors of stage_factors
//
// Same math and output dtypes as lslo_kernels/reference.py:
//   h_t = A_l x_t  (fp32, fp64 for fp64 inputs)        y_t = base_out_t + s_l (B_l * M_l) h_t
//   d s_l = sum over tokens t of language l of <dy_t, (B_l * M_l) h_t>
//
// Plan of one call:
//   1. Validate, and copy the small routing metadata to the host (rank_offsets, lang_offsets).
//   2. Split the tokens, in routing order (grouped by language), into one contiguous range per
//      thread, balanced by an estimated cost per token (its language's rank and the row widths).
//      A language lies entirely inside one range except at the range ends, so dA/dB of all but at
//      most 2 languages per thread are accumulated in place, and only those split across threads go
//      through per-range scratch summed afterwards: no atomics, no per-thread copy of all of dA/dB,
//      and a result that does not depend on scheduling.
//   3. Each thread stages the weights of its languages in the accumulation type: A rows, and
//      s_l (B * M)^T, so that B's columns become contiguous rows the kernels can stream.
//   4. It walks its range in chunks of up to kChunkTokens tokens of one language, each product a
//      small GEMM register-blocked over the chunk's tokens (csrc/kernels.h), reading every
//      activation row from memory once and writing y / dx once.
// Kernels are compiled for the baseline ISA and for AVX2+FMA, picked at run time (ISA dispatch).
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels.h"
#include "transpose.h"

namespace lslo {
namespace {

// Tokens of one language processed together (see forward_piece, backward_piece): the weight tiles
// of a chunk's products come from memory once per chunk. A language of rank r loads and stores its
// dA/dB^T rows once per max(update, r) tokens of a chunk: the rows of G cost r / that per token,
// and each sub-chunk streams that many token rows at once. 1 thread, AMD EPYC, T=2048, backward ms
// (update 64 / 8): 4096->1024 lang30 17.7 / 13.4, 1024->1024 lang30 3.39 / 3.12; rank 64 wants
// whole chunks (mixed 2/8/64, 1024->4096: 8 for every rank 46.4, 64 for every rank 40.8).
// Adjustable with _C.set_token_chunks; the buffers hold min(chunk, T) * max_rank values of h, g, s h.
constexpr int kMaxChunkTokens = 128;
struct TokenChunks {
  int chunk = 64;
  int update = 8;
};
std::atomic<int64_t>& token_chunks_setting() {
  static std::atomic<int64_t> packed{(int64_t(64) << 32) | 8};
  return packed;
}
TokenChunks token_chunks() {
  const int64_t packed = token_chunks_setting().load(std::memory_order_relaxed);
  return {static_cast<int>(packed >> 32), static_cast<int>(packed & 0xFFFFFFFF)};
}
std::tuple<int64_t, int64_t> set_token_chunks(int64_t chunk, int64_t update) {
  TORCH_CHECK(chunk >= 1 && chunk <= kMaxChunkTokens, "lslo_kernels._C.set_token_chunks: expected 1 <= chunk <= ",
              kMaxChunkTokens, ", got ", chunk);
  TORCH_CHECK(update >= 1 && update <= chunk, "lslo_kernels._C.set_token_chunks: expected 1 <= update <= chunk, got ",
              update);
  const int64_t old = token_chunks_setting().exchange((chunk << 32) | update);
  return {old >> 32, old & 0xFFFFFFFF};
}
// Rows of dB transposed back per parallel task.
constexpr int64_t kTransposeRows = 64;
// Below this many streamed elements (T * (k + 2 d) + present ranks * (k + d)) a call runs on the
// calling thread: a fork/join costs a few us even when the other threads spin, and milliseconds
// when the other cores are busy. benchmarks/crossover.py, 2 idle Xeon cores, in-place forward,
// lang30: fork / no fork = 1.38 at work 19456 (1024->1024, T=1), 1.02 at 38912 (T=2), 0.87 at
// 65536 (T=4), 1.25 at 50176 (1024->4096, T=1), 0.68 at 100352 (T=2); 32->32 never gains (1.11-1.60
// up to T=160, work 24576). Adjustable with _C.set_min_parallel_work.
std::atomic<int64_t>& min_parallel_work_setting() {
  static std::atomic<int64_t> work{int64_t(1) << 16};
  return work;
}

int64_t set_min_parallel_work(int64_t work) {
  TORCH_CHECK(work >= 0, "lslo_kernels._C.set_min_parallel_work: expected work >= 0, got ", work);
  return min_parallel_work_setting().exchange(work);
}

// ------------------------------------------------------------------------------------------ checks
void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous()), got strides ",
              t.strides());
}

// Rows with a stride: unit column stride, row stride >= the row length (e.g. a column slice).
void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK((t.stride(1) == 1 || t.size(1) <= 1) && (t.stride(0) >= t.size(1) || t.size(0) <= 1), op, ": ",
              name, " must have contiguous rows (unit column stride), got strides ", t.strides());
}

void check_index(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
}

// Host view of the validated problem.
struct Problem {
  int64_t T = 0, k = 0, d = 0, R = 0, L = 0, max_rank = 0;
  int64_t ldx = 0;                    // row stride of x
  int64_t present_rank = 0;           // sum of the ranks of the languages with tokens
  std::vector<int64_t> rank_offsets;  // L + 1
  // Groups in routing order: group 0 = tokens with id -1, group l + 1 = language l.
  // Group g owns sorted positions [group_bounds[g], group_bounds[g + 1]).
  std::vector<int64_t> group_bounds;  // L + 2
  std::vector<double> scales;         // L
  const int64_t* sorted_token_idx = nullptr;
  at::Tensor sorted_token_idx_holder;
};

// strided_x: x may be a column slice (rows with a stride), as add_ accepts.
Problem check_problem(const char* op, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                      const at::Tensor& prune_mask, const at::Tensor& scales, const at::Tensor& rank_offsets,
                      const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets, int64_t max_rank,
                      bool strided_x = false) {
  if (strided_x)
    check_rows(x, op, "x");
  else
    check_activation(x, op, "x");
  check_activation(lora_a, op, "lora_a");
  check_activation(lora_b, op, "lora_b");
  check_activation(prune_mask, op, "prune_mask");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), op, ": x must be floating point, got ", dtype);
  TORCH_CHECK(lora_a.scalar_type() == dtype && lora_b.scalar_type() == dtype, op,
              ": lora_a and lora_b must have x's dtype ", dtype, ", got ", lora_a.scalar_type(), " and ",
              lora_b.scalar_type());
  TORCH_CHECK(prune_mask.scalar_type() == at::kBool, op, ": prune_mask must be bool, got ",
              prune_mask.scalar_type());

  Problem p;
  p.T = x.size(0);
  p.k = x.size(1);
  p.ldx = p.T > 1 ? x.stride(0) : p.k;
  p.R = lora_a.size(0);
  p.d = lora_b.size(0);
  p.max_rank = max_rank;
  TORCH_CHECK(lora_a.size(1) == p.k, op, ": lora_a must be (R, k) = (", p.R, ", ", p.k, ") to match x, got ",
              lora_a.sizes());
  TORCH_CHECK(lora_b.size(1) == p.R, op, ": lora_b must be (d, R) with R = ", p.R, " (rows of lora_a), got ",
              lora_b.sizes());
  TORCH_CHECK(prune_mask.sizes() == lora_b.sizes(), op, ": prune_mask shape ", prune_mask.sizes(),
              " != lora_b shape ", lora_b.sizes());
  TORCH_CHECK(max_rank >= 0, op, ": max_rank must be >= 0, got ", max_rank);

  check_index(rank_offsets, op, "rank_offsets");
  TORCH_CHECK(rank_offsets.numel() >= 2, op, ": rank_offsets must have L + 1 >= 2 entries, got ",
              rank_offsets.numel());
  p.L = rank_offsets.numel() - 1;
  TORCH_CHECK(scales.device().is_cpu(), op, ": scales must be a CPU tensor, got device ", scales.device());
  TORCH_CHECK(scales.dim() == 1 && scales.numel() == p.L, op, ": scales must be (L,) = (", p.L,
              ",), one per language, got shape ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kDouble, op,
              ": scales must be float32 or float64, got ", scales.scalar_type());
  check_index(sorted_token_idx, op, "sorted_token_idx");
  check_index(lang_offsets, op, "lang_offsets");
  TORCH_CHECK(sorted_token_idx.numel() == p.T, op, ": sorted_token_idx must have ", p.T, " entries, got ",
              sorted_token_idx.numel());
  TORCH_CHECK(lang_offsets.numel() == p.L + 1, op, ": lang_offsets must have L + 1 = ", p.L + 1,
              " entries, got ", lang_offsets.numel());

  const auto ro = rank_offsets.contiguous();
  p.rank_offsets.assign(ro.data_ptr<int64_t>(), ro.data_ptr<int64_t>() + p.L + 1);
  TORCH_CHECK(p.rank_offsets[0] == 0 && p.rank_offsets[p.L] == p.R, op, ": rank_offsets must run from 0 to R = ",
              p.R, ", got ", rank_offsets);
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t r = p.rank_offsets[l + 1] - p.rank_offsets[l];
    TORCH_CHECK(r >= 0, op, ": rank_offsets must be non-decreasing, got ", rank_offsets);
    TORCH_CHECK(r <= max_rank, op, ": language ", l, " has rank ", r, " > max_rank = ", max_rank);
  }

  const auto lo = lang_offsets.contiguous();
  const int64_t* lo_ptr = lo.data_ptr<int64_t>();
  p.group_bounds.resize(p.L + 2);
  p.group_bounds[0] = 0;
  for (int64_t l = 0; l <= p.L; ++l) p.group_bounds[l + 1] = lo_ptr[l];
  for (int64_t g = 0; g <= p.L; ++g)
    TORCH_CHECK(p.group_bounds[g] <= p.group_bounds[g + 1], op,
                ": lang_offsets must be non-decreasing and >= 0, got ", lang_offsets);
  TORCH_CHECK(p.group_bounds[p.L + 1] == p.T, op, ": lang_offsets[L] must equal the number of tokens ", p.T,
              ", got ", lang_offsets);
  for (int64_t l = 0; l < p.L; ++l)
    if (p.group_bounds[l + 2] > p.group_bounds[l + 1]) p.present_rank += p.rank_offsets[l + 1] - p.rank_offsets[l];

  // The kernels write y / dx rows through sorted_token_idx from several threads: an index out of
  // range would write outside the output and a repeated one would race, so the routing must be a
  // permutation. O(T), negligible next to the O(T * (k + d)) work. (Which language each token
  // belongs to is the routing's business: the ids were checked once per batch where they entered.)
  p.sorted_token_idx_holder = sorted_token_idx.contiguous();
  p.sorted_token_idx = p.sorted_token_idx_holder.data_ptr<int64_t>();
  std::vector<char> seen(p.T, 0);
  for (int64_t pos = 0; pos < p.T; ++pos) {
    const int64_t tok = p.sorted_token_idx[pos];
    TORCH_CHECK(tok >= 0 && tok < p.T, op, ": sorted_token_idx[", pos, "] = ", tok, " is out of range for ", p.T,
                " tokens");
    TORCH_CHECK(!seen[tok], op, ": sorted_token_idx is not a permutation: token ", tok, " appears twice");
    seen[tok] = 1;
  }

  // Read in place: a converted copy (scales.to(double)) cost an allocation per call.
  p.scales.resize(p.L);
  const auto scales_c = scales.contiguous();
  if (scales.scalar_type() == at::kDouble) {
    const double* sp = scales_c.data_ptr<double>();
    for (int64_t l = 0; l < p.L; ++l) p.scales[l] = sp[l];
  } else {
    const float* sp = scales_c.data_ptr<float>();
    for (int64_t l = 0; l < p.L; ++l) p.scales[l] = sp[l];
  }
  return p;
}

// ---------------------------------------------------------------------------------- work split
// A range of routing positions of one group, processed by one thread.
struct Piece {
  int64_t group;  // 0 = tokens with id -1, l + 1 = language l
  int64_t begin, end;
  int64_t scratch_offset;  // >= 0: the group is split across threads, accumulate dA/dB here
};

struct WorkSplit {
  std::vector<std::vector<Piece>> pieces;          // per part
  std::vector<std::vector<int64_t>> shared_pieces;  // per language: scratch offsets of its pieces
  std::vector<int64_t> shared_langs;                // languages split across parts
  int64_t scratch_size = 0;
};

int choose_parts(int64_t work) {
  if (at::in_parallel_region() || work < min_parallel_work_setting().load(std::memory_order_relaxed)) return 1;
  return std::max(1, at::get_num_threads());
}

// cost[g] is the estimated cost of one token of group g and fixed[g] that of staging its weights
// (if it has tokens); the split points fall at equal shares of the total cost. scratch_per_lang[l]
// > 0 reserves dA/dB scratch for a language split across parts.
WorkSplit split_work(const Problem& p, const std::vector<double>& cost, const std::vector<double>& fixed, int parts,
                     const std::vector<int64_t>& scratch_per_lang) {
  const int64_t groups = p.L + 1;
  auto group_cost = [&](int64_t g) {
    const int64_t n = p.group_bounds[g + 1] - p.group_bounds[g];
    return n > 0 ? fixed[g] + cost[g] * double(n) : 0.0;
  };
  double total = 0;
  for (int64_t g = 0; g < groups; ++g) total += group_cost(g);

  std::vector<int64_t> cuts(parts + 1, p.T);
  cuts[0] = 0;
  int64_t g = 0;
  double before = 0;
  for (int part = 1; part < parts; ++part) {
    const double target = total * part / parts;
    while (g < groups && before + group_cost(g) <= target) {
      before += group_cost(g);
      ++g;
    }
    int64_t cut = p.T;
    if (g < groups) {
      const int64_t n = p.group_bounds[g + 1] - p.group_bounds[g];
      const int64_t into = cost[g] > 0 ? int64_t((target - before - fixed[g]) / cost[g] + 0.5) : 0;
      cut = p.group_bounds[g] + std::min(n, std::max<int64_t>(0, into));
    }
    cuts[part] = std::max(cut, cuts[part - 1]);
  }

  WorkSplit split;
  split.pieces.resize(parts);
  split.shared_pieces.resize(p.L);
  for (int part = 0; part < parts; ++part) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t b = std::max(cuts[part], p.group_bounds[grp]);
      const int64_t e = std::min(cuts[part + 1], p.group_bounds[grp + 1]);
      if (b >= e) continue;
      Piece piece{grp, b, e, -1};
      const bool whole = b == p.group_bounds[grp] && e == p.group_bounds[grp + 1];
      if (!whole && grp > 0 && scratch_per_lang[grp - 1] > 0) {
        piece.scratch_offset = split.scratch_size;
        split.scratch_size += scratch_per_lang[grp - 1];
        if (split.shared_pieces[grp - 1].empty()) split.shared_langs.push_back(grp - 1);
        split.shared_pieces[grp - 1].push_back(piece.scratch_offset);
      }
      split.pieces[part].push_back(piece);
    }
  }
  return split;
}

// --------------------------------------------------------------------------- weight staging
// Leading dimension of the staged and accumulated weight rows: whole cache lines, so that no row
// starts mid-line.
template <typename acc_t>
int64_t padded_ld(int64_t n) {
  constexpr int64_t per_line = 64 / sizeof(acc_t);
  return (n + per_line - 1) / per_line * per_line;
}

// a_part[c - col0][0:k) = A[c][0:k) in the accumulation type.
template <typename acc_t, typename scalar_t>
void stage_a_rows(acc_t* a_part, int64_t lda, int64_t col0, const scalar_t* a, int64_t k,
                  const StagedColumns<acc_t>& cols) {
  for (const auto& range : cols.ranges)
    for (int64_t c = range.first; c < range.second; ++c)
      for (int64_t i = 0; i < k; ++i) a_part[(c - col0) * lda + i] = static_cast<acc_t>(a[c * k + i]);
}


// What one part stages: the weight rows of the languages it has tokens of, [col0, col1) in rank
// order (the part's languages are consecutive), at these offsets of the staging buffers.
template <typename acc_t>
struct PartStage {
  StagedColumns<acc_t> cols;    // columns of B to stage
  // Rows of A to stage: only to convert a bf16/fp16 A; fp32/fp64 A is read in place. (A copy with
  // a padded stride was no faster at T=2048 and cost up to 25% of the op at T=160, where a language
  // has ~5 tokens: 4096->1024 forward 0.49 vs 0.37 ms, 1 thread.)
  StagedColumns<acc_t> a_rows;
  int64_t col0 = 0, col1 = 0;
  int64_t offset_a = 0, offset_b = 0;  // elements into the A and B^T staging buffers
};

// Each part stages what it uses: no barrier between staging and use, and the staged rows are in
// the L2 of the core that reads them. (Staging everything first, split by rows of B between the
// threads, needs a barrier before the tokens and moves every staged row across cores; at decoding
// sizes the op is short enough for that to show.)
template <typename acc_t>
std::vector<PartStage<acc_t>> plan_stages(const Problem& p, const WorkSplit& split, const std::vector<acc_t>& scale,
                                          bool a_is_acc, int64_t lda, int64_t ldb, int64_t& total_a,
                                          int64_t& total_b) {
  std::vector<PartStage<acc_t>> stages(split.pieces.size());
  total_a = total_b = 0;
  for (size_t part = 0; part < split.pieces.size(); ++part) {
    PartStage<acc_t>& st = stages[part];
    st.cols.scale = scale.data();
    auto append = [](StagedColumns<acc_t>& cols, int64_t c0, int64_t c1) {
      if (!cols.ranges.empty() && cols.ranges.back().second == c0)
        cols.ranges.back().second = c1;
      else
        cols.ranges.emplace_back(c0, c1);
    };
    for (const Piece& piece : split.pieces[part]) {
      if (piece.group == 0) continue;
      const int64_t c0 = p.rank_offsets[piece.group - 1], c1 = p.rank_offsets[piece.group];
      if (c0 == c1) continue;
      if (st.cols.ranges.empty()) st.col0 = c0;
      st.col1 = c1;
      append(st.cols, c0, c1);
      if (!a_is_acc) append(st.a_rows, c0, c1);
    }
    st.offset_a = total_a;
    st.offset_b = total_b;
    total_a += a_is_acc ? 0 : (st.col1 - st.col0) * lda;
    total_b += (st.col1 - st.col0) * ldb;
  }
  return stages;
}

// The scale of every column of B: s_l for the columns rank_offsets[l]:rank_offsets[l + 1].
template <typename acc_t>
std::vector<acc_t> column_scales(const std::vector<int64_t>& rank_offsets, const std::vector<double>& scales,
                                 int64_t R) {
  std::vector<acc_t> scale(R);
  for (size_t l = 0; l < scales.size(); ++l)
    for (int64_t c = rank_offsets[l]; c < rank_offsets[l + 1]; ++c) scale[c] = static_cast<acc_t>(scales[l]);
  return scale;
}

template <typename acc_t>
std::vector<acc_t> column_scales(const Problem& p) {
  return column_scales<acc_t>(p.rank_offsets, p.scales, p.R);
}

at::ScalarType accum_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// ------------------------------------------------------------------------------ ISA dispatch
// The kernels are instantiated for the baseline ISA and, on x86-64, for AVX2+FMA, picked at run time
// (setup.py passes no -march). On an AMD EPYC, fp32, T=2048, lang30 ranks, 1 thread, the AVX2+FMA
// variant is 1.7-2.4x faster (1024->1024: forward 4.74 -> 2.51 ms, backward 10.19 -> 4.53 ms).
#if defined(__x86_64__) && defined(__GNUC__)
#define LSLO_HAVE_AVX2 1
#else
#define LSLO_HAVE_AVX2 0
#endif

enum class Isa { kBaseline = 0, kAvx2 = 1 };

// The dtypes that matter for speed get the AVX2 variant; fp64 (gradcheck) and fp16 (no F16C in the
// baseline loads) run the baseline one, which keeps the build time down (each variant instantiates
// the kernels for ranks 1..8).
template <typename scalar_t>
constexpr bool kHasAvx2Variant = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

bool cpu_has_avx2() {
#if LSLO_HAVE_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::atomic<int>& isa_setting() {
  static std::atomic<int> isa{static_cast<int>(cpu_has_avx2() ? Isa::kAvx2 : Isa::kBaseline)};
  return isa;
}

Isa current_isa() { return static_cast<Isa>(isa_setting().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "baseline"; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas{"baseline"};
  if (cpu_has_avx2()) isas.emplace_back("avx2");
  return isas;
}

std::string get_isa() { return isa_name(current_isa()); }

std::string set_isa(const std::string& name) {
  Isa isa;
  if (name == "baseline") {
    isa = Isa::kBaseline;
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "lslo_kernels._C.set_isa: this CPU (or build) has no AVX2+FMA");
    isa = Isa::kAvx2;
  } else {
    TORCH_CHECK(false, "lslo_kernels._C.set_isa: unknown ISA '", name, "'; expected 'baseline' or 'avx2'");
  }
  return isa_name(static_cast<Isa>(isa_setting().exchange(static_cast<int>(isa))));
}

// -------------------------------------------------------------------------- streaming stores
// y (forward) and grad_x (backward) are written once and not read again by this op. Non-temporal
// stores skip reading every line before writing it (a quarter of the traffic of y = base + delta).
// Measured with the next op reading the output (relu_ on y, add_ on dx), 1 thread, AMD EPYC:
// at T=2048 (outputs of 8-32 MiB) they save 4-14% (1024->1024 forward 3.46 -> 3.12 ms, 4096->1024
// backward 17.0 -> 14.8 ms); at T=160 (0.6-2.6 MiB, still in cache for the next op) they cost up to
// 50%. Hence a size threshold, adjustable for other machines with _C.set_streaming_min_bytes.
std::atomic<int64_t>& streaming_min_bytes_setting() {
  static std::atomic<int64_t> bytes{int64_t(8) << 20};
  return bytes;
}

int64_t streaming_min_bytes() { return streaming_min_bytes_setting().load(std::memory_order_relaxed); }

int64_t set_streaming_min_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "lslo_kernels._C.set_streaming_min_bytes: expected bytes >= 0, got ", bytes);
  return streaming_min_bytes_setting().exchange(bytes);
}

bool use_streaming_stores(const at::Tensor& out, int64_t row_length) {
  const auto dtype = out.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  const int64_t bytes = out.numel() * out.element_size();
  const bool aligned =
      reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 && (row_length * out.element_size()) % 16 == 0;
  return aligned && bytes >= streaming_min_bytes();
}

// Non-temporal stores are weakly ordered: make them visible before the region's closing barrier.
inline void fence_streaming_stores() {
#if defined(__x86_64__)
  __builtin_ia32_sfence();
#endif
}

// ---------------------------------------------------------------------------- large outputs
// Outputs of at least kHugePageMinBytes (y, grad_x, grad_a, grad_b at training sizes) are allocated
// 2 MiB-aligned and advised MADV_HUGEPAGE, for the kernels write every page of them once and a
// fresh 4 KiB page costs a fault and a clear: with transparent huge pages in "madvise" mode (the
// default of many distributions), filling a fresh 32 MiB tensor took 23 ms with 4 KiB pages and
// 3.7-4.1 ms with 2 MiB pages (2-core AMD EPYC VM, 1 thread), next to a 200-300 ms base forward of
// 1024->4096 at T=2048. Where THP is "always" or "never" the advice changes nothing. The memory is
// reported to the profiler like the default CPU allocator's, so torch.profiler's memory view sees it.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugePageMinBytes = size_t(32) << 20;

struct HugePageBlock {
  void* ptr;
  size_t bytes;
};

void free_huge_page_block(void* ctx) {
  auto* block = static_cast<HugePageBlock*>(ctx);
  c10::reportMemoryUsageToProfiler(block->ptr, -static_cast<int64_t>(block->bytes), 0, 0, c10::Device(c10::kCPU));
  std::free(block->ptr);
  delete block;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &free_huge_page_block, c10::Device(c10::kCPU)};
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kHugePage, bytes) == 0 && ptr != nullptr, "lslo_cpp: out of memory allocating ",
                bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: a failure leaves 4 KiB pages
#endif
    c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(bytes), 0, 0, c10::Device(c10::kCPU));
    return {ptr, new HugePageBlock{ptr, bytes}, &free_huge_page_block, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// at::empty(sizes, options) for the op's outputs: large ones through HugePageAllocator.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kHugePageMinBytes) return at::empty(sizes, options);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

// ---------------------------------------------------------------------------- token pieces
// Heap storage for vec_t, 64-byte aligned. Not std::vector<vec_t>: the baseline ISA gives the
// 32-byte vector type 16-byte alignment, so its allocations are 16-byte aligned, while the AVX2
// kernels access it with aligned 32-byte moves (which fault on such an address).
struct FreeDeleter {
  void operator()(void* ptr) const { std::free(ptr); }
};
template <typename acc_t>
using VectorBuffer = std::unique_ptr<vec_t<acc_t>[], FreeDeleter>;

template <typename acc_t>
VectorBuffer<acc_t> aligned_vectors(int64_t count) {
  const size_t bytes = ((std::max<int64_t>(count, 1) * sizeof(vec_t<acc_t>) + 63) / 64) * 64;
  void* ptr = std::aligned_alloc(64, bytes);
  TORCH_CHECK(ptr != nullptr, "lslo_cpp: out of memory allocating ", bytes, " bytes");
  return VectorBuffer<acc_t>(static_cast<vec_t<acc_t>*>(ptr));
}

// Per-part buffers, allocated before the parallel region (nothing may throw inside it).
template <typename acc_t>
struct ChunkBuffers {
  // tokens: the most tokens of a chunk, min(chunk setting, T): a decoding call allocates and zeroes
  // only what its few tokens use.
  ChunkBuffers(int64_t tokens, int64_t max_rank, int64_t num_languages)
      : acc(aligned_vectors<acc_t>(tokens * max_rank)),
        coef(tokens * max_rank),
        hs(tokens * max_rank),
        grad_scales(num_languages, 0.0) {}
  VectorBuffer<acc_t> acc;  // lane-wise partial dots of the chunk (h or u), (token, rank)
  std::vector<acc_t> coef;  // the chunk's g, (token, rank)
  std::vector<acc_t> hs;    // the chunk's h (forward) or s * h (backward), (token, rank)
  std::vector<double> grad_scales;  // backward: this part's share of d s_l
};

// c[t * r + j] = the dots of the nt tokens x[0..nt) with the r rows of w (each of length n).
template <typename acc_t, typename scalar_t>
LSLO_INLINE void chunk_dots(const scalar_t* const* x, int nt, const acc_t* w, int64_t ldw, int64_t n, int64_t r,
                            vec_t<acc_t>* acc, acc_t* c) {
  for (int64_t e = 0; e < nt * r; ++e) acc[e] = vec_t<acc_t>{};
  dot_tokens<acc_t>(x, nt, w, ldw, n, r, acc);
  finish_dots<acc_t>(acc, nt * r, c);
}

// --------------------------------------------------------------------------- forward pieces
template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* x;
  const scalar_t* base;
  scalar_t* y;  // may be base (add_: in place)
  acc_t* h;     // null: not kept (add_)
  int64_t lda, ldb;
  const int64_t* sorted_token_idx;
  const int64_t* rank_offsets;
  int64_t k, d, max_rank;
  int64_t ldx, ldbase, ldy;  // row strides
  bool stream;  // write y with non-temporal stores
  TokenChunks chunks;
};

// A part's staged weights: rows c - col0 of A (lda) and of s (B * M)^T (ldb).
template <typename acc_t>
struct StagedWeights {
  const acc_t* a;
  const acc_t* bmt;
  int64_t col0;
  const acc_t* a_in_place;  // lora_a when it has the accumulation dtype (rows of length k), else null
};

// A chunk of tokens at a time: h = A_l x for the chunk, in token blocks of kTokenBlock, then
// y = base + s (B_l * M_l) h for the chunk, in tiles of the staged rows. Token by token (each token
// re-reading the language's weights) the forward of mixed ranks 2/8/64, 1024->4096, T=2048 took
// 88 ms next to a 206 ms base forward (fp32, 2 threads, 2-core AMD EPYC, shared).
template <typename scalar_t, typename acc_t>
LSLO_INLINE void forward_piece(const ForwardArgs<scalar_t, acc_t>& a, const StagedWeights<acc_t>& w, const Piece& piece,
                               ChunkBuffers<acc_t>& buf) {
  const int64_t k = a.k, d = a.d, max_rank = a.max_rank;
  const int64_t* sti = a.sorted_token_idx;
  if (piece.group == 0) {  // no adapter: y = base_out, h = 0
    for (int64_t pos = piece.begin; pos < piece.end; ++pos) {
      const int64_t tok = sti[pos];
      if (a.y != a.base)
        std::memcpy(static_cast<void*>(a.y + tok * a.ldy), a.base + tok * a.ldbase, sizeof(scalar_t) * d);
      if (a.h)
        for (int64_t j = 0; j < max_rank; ++j) a.h[tok * max_rank + j] = acc_t(0);
    }
    return;
  }
  const int64_t l = piece.group - 1;
  const int64_t r0 = a.rank_offsets[l], r = a.rank_offsets[l + 1] - r0;
  const bool staged_a = w.a_in_place == nullptr;
  const acc_t* a_l = staged_a ? w.a + (r0 - w.col0) * a.lda : w.a_in_place + r0 * k;
  const int64_t lda = staged_a ? a.lda : k;
  const acc_t* bmt_l = w.bmt + (r0 - w.col0) * a.ldb;
  acc_t* h = buf.hs.data();
  const scalar_t* x_rows[kMaxChunkTokens];
  const scalar_t* base_rows[kMaxChunkTokens];
  scalar_t* y_rows[kMaxChunkTokens];
  for (int64_t pos = piece.begin; pos < piece.end; pos += a.chunks.chunk) {
    const int nt = static_cast<int>(std::min<int64_t>(a.chunks.chunk, piece.end - pos));
    for (int t = 0; t < nt; ++t) {
      const int64_t tok = sti[pos + t];
      x_rows[t] = a.x + tok * a.ldx;
      base_rows[t] = a.base + tok * a.ldbase;
      y_rows[t] = a.y + tok * a.ldy;
    }
    chunk_dots<acc_t>(x_rows, nt, a_l, lda, k, r, buf.acc.get(), h);
    if (a.h) {
      for (int t = 0; t < nt; ++t) {
        acc_t* h_t = a.h + sti[pos + t] * max_rank;
        std::copy(h + t * r, h + (t + 1) * r, h_t);
        std::fill(h_t + r, h_t + max_rank, acc_t(0));
      }
    }
    combine_tokens<true, acc_t>(y_rows, base_rows, nt, h, r, bmt_l, a.ldb, d, r, a.stream);
  }
}

// -------------------------------------------------------------------------- backward pieces
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t* h;
  scalar_t* grad_x;
  acc_t* grad_a;     // (R, lda), accumulated here
  acc_t* grad_bt;    // (R, ldb), dB transposed, accumulated here
  acc_t* scratch;    // split languages' dA / dB^T rows
  int64_t lda, ldb;
  const int64_t* sorted_token_idx;
  const int64_t* rank_offsets;
  const double* scales;
  int64_t k, d, max_rank;
  bool stream;  // write grad_x with non-temporal stores
  TokenChunks chunks;
};

// A chunk of kChunkTokens tokens at a time: u = (B_l * M_l)^T dy (B staged unscaled), d s_l +=
// <u_t, h_t>, g = s u; then dB_l^T += (s h)^T dy while the chunk's dy rows are in cache;
// dx = A_l^T g; dA_l += g^T x. Every product runs in token blocks or over the whole chunk, so the
// language's weights and dA/dB^T rows are read (and written) once per chunk, not once per token.
template <typename scalar_t, typename acc_t>
LSLO_INLINE void backward_piece(const BackwardArgs<scalar_t, acc_t>& a, const StagedWeights<acc_t>& w,
                                const Piece& piece, ChunkBuffers<acc_t>& buf) {
  const int64_t k = a.k, d = a.d, max_rank = a.max_rank;
  const int64_t* sti = a.sorted_token_idx;
  if (piece.group == 0) {  // no adapter: zero dx
    for (int64_t pos = piece.begin; pos < piece.end; ++pos)
      std::memset(static_cast<void*>(a.grad_x + sti[pos] * k), 0, sizeof(scalar_t) * k);
    return;
  }
  const int64_t l = piece.group - 1;
  const int64_t r0 = a.rank_offsets[l], r = a.rank_offsets[l + 1] - r0;
  const acc_t s = static_cast<acc_t>(a.scales[l]);
  const bool staged_a = w.a_in_place == nullptr;
  const acc_t* a_l = staged_a ? w.a + (r0 - w.col0) * a.lda : w.a_in_place + r0 * k;
  const int64_t lda = staged_a ? a.lda : k;
  const acc_t* bmt_l = w.bmt + (r0 - w.col0) * a.ldb;
  // A language split across parts accumulates this part's share in scratch (summed afterwards).
  const bool split = piece.scratch_offset >= 0;
  acc_t* ga_l = split ? a.scratch + piece.scratch_offset : a.grad_a + r0 * a.lda;
  acc_t* gbt_l = split ? a.scratch + piece.scratch_offset + r * a.lda : a.grad_bt + r0 * a.ldb;
  std::fill(ga_l, ga_l + r * a.lda, acc_t(0));
  std::fill(gbt_l, gbt_l + r * a.ldb, acc_t(0));
  acc_t* g = buf.coef.data();
  acc_t* hs = buf.hs.data();
  const scalar_t* dy_rows[kMaxChunkTokens];
  const scalar_t* x_rows[kMaxChunkTokens];
  scalar_t* dx_rows[kMaxChunkTokens];
  for (int64_t pos = piece.begin; pos < piece.end; pos += a.chunks.chunk) {
    const int nt = static_cast<int>(std::min<int64_t>(a.chunks.chunk, piece.end - pos));
    for (int t = 0; t < nt; ++t) {
      const int64_t tok = sti[pos + t];
      dy_rows[t] = a.grad_out + tok * d;
      x_rows[t] = a.x + tok * k;
      dx_rows[t] = a.grad_x + tok * k;
    }
    chunk_dots<acc_t>(dy_rows, nt, bmt_l, a.ldb, d, r, buf.acc.get(), g);
    acc_t ds = 0;
    for (int t = 0; t < nt; ++t) {
      const acc_t* h_t = a.h + sti[pos + t] * max_rank;
      for (int64_t j = 0; j < r; ++j) {
        ds += g[t * r + j] * h_t[j];
        g[t * r + j] *= s;
        hs[t * r + j] = s * h_t[j];
      }
    }
    buf.grad_scales[l] += static_cast<double>(ds);
    const int update = static_cast<int>(std::max<int64_t>(a.chunks.update, r));
    for (int t = 0; t < nt; t += update)
      rank_update<acc_t>(gbt_l, a.ldb, dy_rows + t, hs + t * r, r, std::min(update, nt - t), d, r);
    combine_tokens<false, acc_t>(dx_rows, static_cast<const scalar_t* const*>(nullptr), nt, g, r, a_l, lda, k, r,
                                 a.stream);
    for (int t = 0; t < nt; t += update)
      rank_update<acc_t>(ga_l, a.lda, x_rows + t, g + t * r, r, std::min(update, nt - t), k, r);
  }
}

// ------------------------------------------------------------------------------ kernel table
// Everything that streams tokens or B through the vector units, compiled once per ISA: each entry
// inlines the always_inline kernels above, so the avx2 entries get AVX2+FMA code throughout.
template <typename scalar_t, typename acc_t>
struct Kernels {
  void (*forward_piece)(const ForwardArgs<scalar_t, acc_t>&, const StagedWeights<acc_t>&, const Piece&,
                        ChunkBuffers<acc_t>&);
  void (*backward_piece)(const BackwardArgs<scalar_t, acc_t>&, const StagedWeights<acc_t>&, const Piece&,
                         ChunkBuffers<acc_t>&);
  void (*stage_bmt)(acc_t*, int64_t, int64_t, const scalar_t*, const bool*, int64_t, const StagedColumns<acc_t>&,
                    int64_t, int64_t);
  void (*unstage_grad_b)(scalar_t*, const acc_t*, int64_t, const bool*, int64_t, int64_t, int64_t);
};

#define LSLO_KERNEL_VARIANT(NAME, TARGET)                                                                         \
  template <typename scalar_t, typename acc_t>                                                                     \
  TARGET void forward_piece_##NAME(const ForwardArgs<scalar_t, acc_t>& a, const StagedWeights<acc_t>& w,        \
                                   const Piece& piece, ChunkBuffers<acc_t>& buf) {                                 \
    forward_piece(a, w, piece, buf);                                                                               \
  }                                                                                                                \
  template <typename scalar_t, typename acc_t>                                                                     \
  TARGET void backward_piece_##NAME(const BackwardArgs<scalar_t, acc_t>& a, const StagedWeights<acc_t>& w,      \
                                    const Piece& piece, ChunkBuffers<acc_t>& buf) {                                \
    backward_piece(a, w, piece, buf);                                                                              \
  }                                                                                                                \
  template <typename scalar_t, typename acc_t>                                                                     \
  TARGET void stage_bmt_##NAME(acc_t* bmt, int64_t ldb, int64_t col0, const scalar_t* b, const bool* mask,         \
                               int64_t R, const StagedColumns<acc_t>& cols, int64_t i0, int64_t i1) {              \
    stage_bmt_rows(bmt, ldb, col0, b, mask, R, cols, i0, i1);                                                      \
  }                                                                                                                \
  template <typename scalar_t, typename acc_t>                                                                     \
  TARGET void unstage_grad_b_##NAME(scalar_t* grad_b, const acc_t* gbt, int64_t ldb, const bool* mask, int64_t R,  \
                                    int64_t i0, int64_t i1) {                                                      \
    unstage_grad_b_rows(grad_b, gbt, ldb, mask, R, i0, i1);                                                        \
  }

LSLO_KERNEL_VARIANT(baseline, )
#if LSLO_HAVE_AVX2
LSLO_KERNEL_VARIANT(avx2, __attribute__((target("avx2,fma"))))
#endif
#undef LSLO_KERNEL_VARIANT

template <typename scalar_t, typename acc_t>
Kernels<scalar_t, acc_t> select_kernels() {
#if LSLO_HAVE_AVX2
  if constexpr (kHasAvx2Variant<scalar_t>) {
    if (current_isa() == Isa::kAvx2)
      return {&forward_piece_avx2<scalar_t, acc_t>, &backward_piece_avx2<scalar_t, acc_t>,
              &stage_bmt_avx2<scalar_t, acc_t>, &unstage_grad_b_avx2<scalar_t, acc_t>};
  }
#endif
  return {&forward_piece_baseline<scalar_t, acc_t>, &backward_piece_baseline<scalar_t, acc_t>,
          &stage_bmt_baseline<scalar_t, acc_t>, &unstage_grad_b_baseline<scalar_t, acc_t>};
}

// ------------------------------------------------------------------------------------- forward
// Host scratch (staged weights, accumulators): aligned, not zeroed. A torch tensor per buffer cost
// an allocator round trip and a TensorImpl each, a few us per call at decoding sizes.
template <typename T>
using HostBuffer = std::unique_ptr<T[], FreeDeleter>;

template <typename T>
HostBuffer<T> host_buffer(int64_t count) {
  const size_t bytes = ((std::max<int64_t>(count, 1) * sizeof(T) + 63) / 64) * 64;
  void* ptr = std::aligned_alloc(64, bytes);
  TORCH_CHECK(ptr != nullptr, "lslo_cpp: out of memory allocating ", bytes, " bytes");
  return HostBuffer<T>(static_cast<T*>(ptr));
}

// y = base + LoRA term (y may be base: add_), h kept when non-null. Rows of x, base and y may be
// strided (ldx, ldbase, ldy). staged_bmt: s (B * M)^T of every language staged beforehand
// (stage_factors), rows of ldb = padded_ld(d), or null to stage the present languages' rows here.
template <typename scalar_t>
void forward_impl(const Problem& p, const scalar_t* x, const scalar_t* base, int64_t ldbase, scalar_t* y, int64_t ldy,
                  bool stream, const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& prune_mask,
                  typename std::conditional_t<std::is_same_v<scalar_t, double>, double, float>* h,
                  const typename std::conditional_t<std::is_same_v<scalar_t, double>, double, float>* staged_bmt =
                      nullptr) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t T = p.T, k = p.k, d = p.d;
  const int64_t lda = padded_ld<acc_t>(k), ldb = padded_ld<acc_t>(d);

  // Cost per token in streamed elements: read x and base_out, write y; the rank-r products run
  // from cache at roughly a quarter of the cost per element. Staging a language's weights: read
  // and write r rows of A and of B (only languages with tokens are staged).
  std::vector<double> cost(p.L + 1), fixed(p.L + 1, 0.0);
  cost[0] = y == base ? 0.0 : double(2 * d);
  for (int64_t l = 0; l < p.L; ++l) {
    const double r = double(p.rank_offsets[l + 1] - p.rank_offsets[l]);
    cost[l + 1] = double(k + 2 * d) + 0.25 * r * double(k + d);
    fixed[l + 1] = 2.0 * r * double(k + d);
  }
  const int parts = choose_parts(T * (k + 2 * d) + p.present_rank * (k + d));
  const WorkSplit split = split_work(p, cost, fixed, parts, std::vector<int64_t>(p.L, 0));
  const std::vector<acc_t> scale = column_scales<acc_t>(p);
  int64_t staged_a = 0, staged_b = 0;
  const bool a_is_acc = std::is_same_v<scalar_t, acc_t>;
  const auto stages = plan_stages<acc_t>(p, split, scale, a_is_acc, lda, ldb, staged_a, staged_b);
  HostBuffer<acc_t> a_buf = host_buffer<acc_t>(staged_a);
  HostBuffer<acc_t> b_buf = host_buffer<acc_t>(staged_bmt ? 0 : staged_b);
  std::vector<ChunkBuffers<acc_t>> buffers;  // allocated here: nothing may throw inside the region
  const TokenChunks chunks = token_chunks();
  const int64_t chunk_tokens = std::min<int64_t>(chunks.chunk, T);
  for (int part = 0; part < parts; ++part) buffers.emplace_back(chunk_tokens, p.max_rank, 0);

  const ForwardArgs<scalar_t, acc_t> args{x, base, y, h, lda, ldb, p.sorted_token_idx, p.rank_offsets.data(), k, d,
                                          p.max_rank, p.ldx, ldbase, ldy, stream, chunks};
  const Kernels<scalar_t, acc_t> kernels = select_kernels<scalar_t, acc_t>();
  const scalar_t* a_src = lora_a.data_ptr<scalar_t>();
  const acc_t* a_in_place = nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t>) a_in_place = a_src;
  const scalar_t* b_src = lora_b.data_ptr<scalar_t>();
  const bool* mask = prune_mask.data_ptr<bool>();
  acc_t* a_dst = a_buf.get();
  acc_t* b_dst = b_buf.get();

  auto run_part = [&](int part) {
    const PartStage<acc_t>& st = stages[part];
    stage_a_rows(a_dst + st.offset_a, lda, st.col0, a_src, k, st.a_rows);
    const acc_t* bmt = staged_bmt ? staged_bmt + st.col0 * ldb : b_dst + st.offset_b;
    if (!staged_bmt) kernels.stage_bmt(b_dst + st.offset_b, ldb, st.col0, b_src, mask, p.R, st.cols, 0, d);
    const StagedWeights<acc_t> w{a_dst + st.offset_a, bmt, st.col0, a_in_place};
    for (const Piece& piece : split.pieces[part]) kernels.forward_piece(args, w, piece, buffers[part]);
    fence_streaming_stores();
  };
  if (parts == 1) {  // no OpenMP region at all: even a team of one costs a call into the runtime
    run_part(0);
    return;
  }
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int part = 0; part < parts; ++part) run_part(part);
}

void check_output_like(const at::Tensor& t, const Problem& p, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " != x dtype ",
              x.scalar_type());
  TORCH_CHECK(t.size(0) == p.T && t.size(1) == p.d, op, ": ", name, " must be (T, d) = (", p.T, ", ", p.d,
              "), got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& base_out,
                                               const at::Tensor& lora_a, const at::Tensor& lora_b,
                                               const at::Tensor& prune_mask, const at::Tensor& scales,
                                               const at::Tensor& rank_offsets, const at::Tensor& sorted_token_idx,
                                               const at::Tensor& lang_offsets, int64_t max_rank) {
  constexpr const char* op = "lslo_cpp::forward";
  const Problem p = check_problem(op, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                                  lang_offsets, max_rank);
  check_activation(base_out, op, "base_out");
  check_output_like(base_out, p, x, op, "base_out");

  at::Tensor y = empty_output({p.T, p.d}, x.options());
  at::Tensor h = at::empty({p.T, p.max_rank}, x.options().dtype(accum_type(x.scalar_type())));
  if (p.T == 0) return {y, h};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lslo_cpp_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<scalar_t>(p, x.data_ptr<scalar_t>(), base_out.data_ptr<scalar_t>(), p.d, y.data_ptr<scalar_t>(),
                           p.d, use_streaming_stores(y, p.d), lora_a, lora_b, prune_mask, h.data_ptr<acc_t>());
  });
  return {y, h};
}

// out = base + LoRA term for a validated problem: base is out itself (in place) or, with base_row,
// one (d,) row of x's dtype read for every token (row stride 0). staged: the factors stage_factors
// returned ((R, padded_ld(d)), accumulation dtype), whose per-call staging is then skipped, or
// null. h: the (T, max_rank) accumulation-dtype tensor the forward keeps for a backward, or null.
void lora_pass(const char* op, const Problem& p, const at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
               const at::Tensor& lora_b, const at::Tensor& prune_mask, const at::Tensor* staged,
               const at::Tensor* base_row = nullptr, at::Tensor* h = nullptr) {
  if (staged) {
    const at::ScalarType acc_type = accum_type(x.scalar_type());
    TORCH_CHECK(staged->scalar_type() == acc_type && staged->device().is_cpu() && staged->is_contiguous() &&
                    staged->dim() == 2 && staged->size(0) == p.R,
                op, ": staged must be the contiguous (R, padded d) ", acc_type, " tensor stage_factors returns, got ",
                staged->scalar_type(), " ", staged->sizes());
  }
  if (p.T == 0 || (p.d == 0 && h == nullptr)) return;  // with d = 0, h = A x is still the backward's
  const int64_t ldo = p.T > 1 ? out.stride(0) : p.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lslo_cpp_lora_pass", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* staged_bmt = nullptr;
    if (staged) {
      TORCH_CHECK(staged->size(1) == padded_ld<acc_t>(p.d), op, ": staged has ", staged->size(1),
                  " columns, expected ", padded_ld<acc_t>(p.d), " (d padded to a cache line)");
      staged_bmt = staged->data_ptr<acc_t>();
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* base = base_row ? base_row->data_ptr<scalar_t>() : o;
    // Streaming stores: none in place (they would evict a line just read), none for a fresh output
    // the base GEMM reads next.
    forward_impl<scalar_t>(p, x.data_ptr<scalar_t>(), base, base_row ? 0 : ldo, o, ldo, false, lora_a, lora_b,
                           prune_mask, h ? h->data_ptr<acc_t>() : static_cast<acc_t*>(nullptr), staged_bmt);
  });
}

// Inference: out += LoRA term in place. out and x may be column slices (rows with a stride): the
// reduced LoRA widths of LSLoLinear need no copy.
void add_into(const char* op, const at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
              const at::Tensor& lora_b, const at::Tensor& prune_mask, const at::Tensor& scales,
              const at::Tensor& rank_offsets, const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets,
              int64_t max_rank, const at::Tensor* staged) {
  const Problem p = check_problem(op, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                                  lang_offsets, max_rank, /*strided_x=*/true);
  check_rows(out, op, "out");
  check_output_like(out, p, x, op, "out");
  lora_pass(op, p, out, x, lora_a, lora_b, prune_mask, staged);
}

void add_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
             const at::Tensor& prune_mask, const at::Tensor& scales, const at::Tensor& rank_offsets,
             const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets, int64_t max_rank) {
  add_into("lslo_cpp::add_", out, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
           lang_offsets, max_rank, nullptr);
}

// add_ with the factors staged by stage_factors: the same result as add_, without its staging.
void add_staged_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    const at::Tensor& prune_mask, const at::Tensor& scales, const at::Tensor& rank_offsets,
                    const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets, int64_t max_rank,
                    const at::Tensor& staged) {
  add_into("lslo_cpp::add_staged_", out, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
           lang_offsets, max_rank, &staged);
}

// Inference factors staged once: (R, padded_ld(d)) rows s_l (B_l * M_l)^T in the accumulation
// dtype, what add_ otherwise stages on every call for the languages present. For a decoding loop,
// where B, the mask and the scales do not change between calls (the caller keys its cache on them).
at::Tensor stage_factors_cpu(const at::Tensor& lora_b, const at::Tensor& prune_mask, const at::Tensor& scales,
                             const at::Tensor& rank_offsets) {
  constexpr const char* op = "lslo_cpp::stage_factors";
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.is_contiguous() && lora_b.device().is_cpu(), op,
              ": lora_b must be a contiguous (d, R) CPU tensor");
  TORCH_CHECK(prune_mask.sizes() == lora_b.sizes() && prune_mask.scalar_type() == at::kBool && prune_mask.is_contiguous(),
              op, ": prune_mask must be a contiguous bool tensor of lora_b's shape");
  TORCH_CHECK(rank_offsets.dim() == 1 && rank_offsets.scalar_type() == at::kLong && rank_offsets.device().is_cpu(),
              op, ": rank_offsets must be a 1-D int64 CPU tensor");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == rank_offsets.size(0) - 1, op,
              ": scales must have one entry per language");
  const int64_t d = lora_b.size(0), R = lora_b.size(1), L = scales.size(0);
  const at::Tensor offsets = rank_offsets.contiguous();
  const std::vector<int64_t> ro(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + L + 1);
  TORCH_CHECK(ro[0] == 0 && ro[L] == R, op, ": rank_offsets must run from 0 to R=", R);
  for (int64_t l = 0; l < L; ++l) TORCH_CHECK(ro[l + 1] >= ro[l], op, ": rank_offsets must not decrease");
  const at::Tensor s64 = scales.to(at::kDouble).contiguous();
  const std::vector<double> s(s64.data_ptr<double>(), s64.data_ptr<double>() + L);
  const at::ScalarType acc_type = accum_type(lora_b.scalar_type());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lora_b.scalar_type(), "lslo_cpp_stage_factors", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t ldb = padded_ld<acc_t>(d);
    out = at::empty({R, ldb}, lora_b.options().dtype(acc_type));
    const std::vector<acc_t> scale = column_scales<acc_t>(ro, s, R);
    StagedColumns<acc_t> cols;
    cols.scale = scale.data();
    if (R > 0) cols.ranges.emplace_back(0, R);
    acc_t* dst = out.data_ptr<acc_t>();
    if (R > 0 && d > 0)
      select_kernels<scalar_t, acc_t>().stage_bmt(dst, ldb, 0, lora_b.data_ptr<scalar_t>(),
                                                   prune_mask.data_ptr<bool>(), R, cols, 0, d);
    for (int64_t c = 0; c < R; ++c)  // the padding past d: zeros, never read as weights
      for (int64_t i = d; i < ldb; ++i) dst[c * ldb + i] = acc_t(0);
  });
  return out;
}

void check_weight(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Problem& p,
                  const at::Tensor& x, const char* op) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.size(0) == p.d && weight.size(1) == p.k, op,
              ": weight must be a (d, k) = (", p.d, ", ", p.k, ") CPU tensor, got ", weight.sizes(), " on ",
              weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(), " != x dtype ",
              x.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == p.d, op,
                ": bias must be a (d,) = (", p.d, ",) CPU tensor, got ", bias->sizes(), " on ", bias->device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(), " != x dtype ",
                x.scalar_type());
  }
}

// The row every token's output starts from: the bias, or zeros.
at::Tensor bias_row(const std::optional<at::Tensor>& bias, const Problem& p, const at::Tensor& x) {
  return bias.has_value() && bias->defined() ? bias->contiguous() : at::zeros({p.d}, x.options());
}

// y = x W^T + bias + LoRA term for a validated problem (weight checked), the order of both linear
// ops: the LoRA pass runs first and writes bias + LoRA term into the fresh y (the bias row read with
// row stride 0, or a zero row), then the base GEMM accumulates x W^T into y (beta = 1). A separate
// pass after the GEMM (lora: y = base_out + LoRA term) reads the whole base output again once the
// GEMM has evicted it from the caches; here y is read inside the GEMM, which addmm with a bias does
// anyway. Measured on the project's 2-core EPYC (fp32, lang30, 2 threads), fwd+bwd over the base
// Linear at T=2048, with the backward's x W of linear_lora: 1024->1024 1.066x -> 1.003x, 4096->1024
// 1.014x -> 0.925x (medians of interleaved rounds; a Python prototype of this order). staged and h
// as lora_pass's.
at::Tensor lora_then_base(const char* op, const Problem& p, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                          const at::Tensor& prune_mask, const at::Tensor* staged, at::Tensor* h) {
  at::Tensor y = empty_output({p.T, p.d}, x.options());
  const at::Tensor row = bias_row(bias, p, x);
  lora_pass(op, p, y, x, lora_a, lora_b, prune_mask, staged, &row, h);
  if (p.T > 0) y.addmm_(x, weight.t());
  return y;
}

// Training's forward: the base Linear and the LoRA term in one op (lora_then_base), h kept.
std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, const at::Tensor& prune_mask,
                                                      const at::Tensor& scales, const at::Tensor& rank_offsets,
                                                      const at::Tensor& sorted_token_idx,
                                                      const at::Tensor& lang_offsets, int64_t max_rank) {
  constexpr const char* op = "lslo_cpp::linear_forward";
  const Problem p = check_problem(op, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                                  lang_offsets, max_rank);
  check_weight(weight, bias, p, x, op);
  at::Tensor h = at::empty({p.T, p.max_rank}, x.options().dtype(accum_type(x.scalar_type())));
  at::Tensor y = lora_then_base(op, p, x, weight, bias, lora_a, lora_b, prune_mask, nullptr, &h);
  return {y, h};
}

// Decoding: y = x W^T + bias + LoRA term in one call, nothing kept for a backward (inference only),
// through lora_then_base. staged: the factors stage_factors returned (a decoding loop's cache),
// or None to stage those of the languages present, as add_ does. x may have strided rows.
at::Tensor linear_decode_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& prune_mask,
                             const at::Tensor& scales, const at::Tensor& rank_offsets,
                             const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets, int64_t max_rank,
                             const std::optional<at::Tensor>& staged) {
  constexpr const char* op = "lslo_cpp::linear_decode";
  const Problem p = check_problem(op, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                                  lang_offsets, max_rank, /*strided_x=*/true);
  check_weight(weight, bias, p, x, op);
  const bool has_staged = staged.has_value() && staged->defined();
  return lora_then_base(op, p, x, weight, bias, lora_a, lora_b, prune_mask, has_staged ? &*staged : nullptr,
                        nullptr);
}

// ------------------------------------------------------------------------------------ backward
template <typename scalar_t>
void backward_impl(const Problem& p, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h,
                   const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& prune_mask,
                   at::Tensor& grad_x, at::Tensor& grad_a, at::Tensor& grad_b, std::vector<double>& grad_scales) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t k = p.k, d = p.d, R = p.R;
  const int64_t lda = padded_ld<acc_t>(k), ldb = padded_ld<acc_t>(d);

  // Cost per token: read grad_out and x, write dx; four rank-r products per token from cache.
  // Languages split across parts accumulate their dA and dB^T rows in scratch: r * (lda + ldb) each.
  std::vector<double> cost(p.L + 1), fixed(p.L + 1, 0.0);
  std::vector<int64_t> scratch_per_lang(p.L);
  cost[0] = double(k);  // zero dx rows
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t r = p.rank_offsets[l + 1] - p.rank_offsets[l];
    cost[l + 1] = double(d + 2 * k) + 0.5 * double(r) * double(k + d);
    fixed[l + 1] = 3.0 * double(r) * double(k + d);
    scratch_per_lang[l] = r * (lda + ldb);
  }
  const int parts = choose_parts(p.T * (d + 2 * k) + R * (k + d));
  const WorkSplit split = split_work(p, cost, fixed, parts, scratch_per_lang);
  // B^T is staged without the scales: the kernel needs (B * M)^T dy unscaled for d s_l, and
  // applies s_l to the r-wide result instead.
  const std::vector<acc_t> scale(R, acc_t(1));
  int64_t staged_a = 0, staged_b = 0;
  const bool a_is_acc = std::is_same_v<scalar_t, acc_t>;
  const auto stages = plan_stages<acc_t>(p, split, scale, a_is_acc, lda, ldb, staged_a, staged_b);
  HostBuffer<acc_t> a_buf = host_buffer<acc_t>(staged_a);
  HostBuffer<acc_t> b_buf = host_buffer<acc_t>(staged_b);
  // dA and dB^T accumulate in the accumulation type, with the staged strides; dB transposed so that
  // each language's rows are contiguous, like dA's. Every row is written before it is read: by the
  // part that owns the language, by the sum of a split language's scratch, or zeroed (no tokens).
  HostBuffer<acc_t> ga = host_buffer<acc_t>(R * lda);
  HostBuffer<acc_t> gbt = host_buffer<acc_t>(R * ldb);
  HostBuffer<acc_t> scratch = host_buffer<acc_t>(split.scratch_size);
  std::vector<ChunkBuffers<acc_t>> buffers;  // allocated here: nothing may throw inside the region
  const TokenChunks chunks = token_chunks();
  const int64_t chunk_tokens = std::min<int64_t>(chunks.chunk, p.T);
  for (int part = 0; part < parts; ++part) buffers.emplace_back(chunk_tokens, p.max_rank, p.L);
  std::vector<int64_t> unwritten_langs = split.shared_langs;  // summed from scratch, or zeroed
  for (int64_t l = 0; l < p.L; ++l)
    if (p.group_bounds[l + 2] == p.group_bounds[l + 1]) unwritten_langs.push_back(l);

  const BackwardArgs<scalar_t, acc_t> args{grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                           h.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(),
                                           ga.get(), gbt.get(), scratch.get(),
                                           lda, ldb, p.sorted_token_idx, p.rank_offsets.data(), p.scales.data(), k, d,
                                           p.max_rank, use_streaming_stores(grad_x, k), chunks};
  const Kernels<scalar_t, acc_t> kernels = select_kernels<scalar_t, acc_t>();
  const scalar_t* a_src = lora_a.data_ptr<scalar_t>();
  const acc_t* a_in_place = nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t>) a_in_place = a_src;
  const scalar_t* b_src = lora_b.data_ptr<scalar_t>();
  const bool* mask = prune_mask.data_ptr<bool>();
  acc_t* a_dst = a_buf.get();
  acc_t* b_dst = b_buf.get();
  acc_t* ga_ptr = ga.get();
  acc_t* gbt_ptr = gbt.get();
  const acc_t* scratch_ptr = scratch.get();
  scalar_t* grad_a_ptr = grad_a.data_ptr<scalar_t>();
  scalar_t* grad_b_ptr = grad_b.data_ptr<scalar_t>();
  const int64_t b_tasks = (d + kTransposeRows - 1) / kTransposeRows;
  const int64_t num_unwritten = static_cast<int64_t>(unwritten_langs.size());

#pragma omp parallel num_threads(parts) if (parts > 1)
  {
#pragma omp for schedule(static, 1)
    for (int part = 0; part < parts; ++part) {
      const PartStage<acc_t>& st = stages[part];
      stage_a_rows(a_dst + st.offset_a, lda, st.col0, a_src, k, st.a_rows);
      kernels.stage_bmt(b_dst + st.offset_b, ldb, st.col0, b_src, mask, p.R, st.cols, 0, d);
      const StagedWeights<acc_t> w{a_dst + st.offset_a, b_dst + st.offset_b, st.col0, a_in_place};
      for (const Piece& piece : split.pieces[part]) kernels.backward_piece(args, w, piece, buffers[part]);
      fence_streaming_stores();
    }

#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_unwritten; ++i) {
      const int64_t l = unwritten_langs[i];
      const int64_t r0 = p.rank_offsets[l], r = p.rank_offsets[l + 1] - r0;
      acc_t* ga_l = ga_ptr + r0 * lda;
      acc_t* gbt_l = gbt_ptr + r0 * ldb;
      std::fill(ga_l, ga_l + r * lda, acc_t(0));
      std::fill(gbt_l, gbt_l + r * ldb, acc_t(0));
      for (const int64_t offset : split.shared_pieces[l]) {
        const acc_t* src = scratch_ptr + offset;
        for (int64_t e = 0; e < r * lda; ++e) ga_l[e] += src[e];
        for (int64_t e = 0; e < r * ldb; ++e) gbt_l[e] += src[r * lda + e];
      }
    }

    // dA in A's dtype; dB = (dB^T)^T * M in B's dtype.
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < R; ++c)
      for (int64_t i = 0; i < k; ++i) grad_a_ptr[c * k + i] = static_cast<scalar_t>(ga_ptr[c * lda + i]);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < b_tasks; ++task) {
      const int64_t i0 = task * kTransposeRows;
      kernels.unstage_grad_b(grad_b_ptr, gbt_ptr, ldb, mask, R, i0, std::min(d, i0 + kTransposeRows));
    }
  }
  // Parts in a fixed order: the sum does not depend on scheduling.
  for (int part = 0; part < parts; ++part)
    for (int64_t l = 0; l < p.L; ++l) grad_scales[l] += buffers[part].grad_scales[l];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& prune_mask, const at::Tensor& scales, const at::Tensor& rank_offsets,
    const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets, int64_t max_rank) {
  constexpr const char* op = "lslo_cpp::backward";
  const Problem p = check_problem(op, x, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                                  lang_offsets, max_rank);
  check_activation(grad_out, op, "grad_out");
  check_activation(h, op, "h");
  check_output_like(grad_out, p, x, op, "grad_out");
  const auto acc = accum_type(x.scalar_type());
  TORCH_CHECK(h.scalar_type() == acc, op, ": h must be ", acc, " (the forward's intermediate), got ",
              h.scalar_type());
  TORCH_CHECK(h.size(0) == p.T && h.size(1) == p.max_rank, op, ": h must be (T, max_rank) = (", p.T, ", ",
              p.max_rank, "), got ", h.sizes());

  at::Tensor grad_x = empty_output({p.T, p.k}, x.options());
  at::Tensor grad_a = empty_output({p.R, p.k}, lora_a.options());
  at::Tensor grad_b = empty_output({p.d, p.R}, lora_b.options());
  std::vector<double> grad_scales(p.L, 0.0);
  if (p.T == 0) {  // nothing routed: zero dA, dB
    grad_a.zero_();
    grad_b.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lslo_cpp_backward", [&] {
      backward_impl<scalar_t>(p, grad_out, x, h, lora_a, lora_b, prune_mask, grad_x, grad_a, grad_b, grad_scales);
    });
  }
  at::Tensor gs = at::empty({p.L}, scales.options());
  if (scales.scalar_type() == at::kDouble) {
    double* ptr = gs.data_ptr<double>();
    for (int64_t l = 0; l < p.L; ++l) ptr[l] = grad_scales[l];
  } else {
    float* ptr = gs.data_ptr<float>();
    for (int64_t l = 0; l < p.L; ++l) ptr[l] = static_cast<float>(grad_scales[l]);
  }
  return {grad_x, grad_a, grad_b, gs};
}

// ------------------------------------------------------------------------------ training entry
// lslo_cpp::backward through the dispatcher, for the autograd nodes below.
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lslo_cpp::backward", "").typed<BackwardSignature>();
  return op;
}

// y = forward(...)[0] with the backward as a C++ autograd node: a training call reaches the kernels
// without a Python custom-op or autograd.Function layer. forward/backward are called through the
// dispatcher (not directly), so that tracing (torch.compile, opcheck) sees them and uses their
// fake implementations.
class LoraFunction : public torch::autograd::Function<LoraFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& base_out,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& prune_mask,
                            const at::Tensor& scales, const at::Tensor& rank_offsets,
                            const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets, int64_t max_rank) {
    static const auto fwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("lslo_cpp::forward", "")
                                .typed<std::tuple<at::Tensor, at::Tensor>(
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h] = fwd.call(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                           lang_offsets, max_rank);
    ctx->save_for_backward({x, h, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets});
    ctx->saved_data["max_rank"] = max_rank;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto& bwd = backward_op();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad_y = grads[0].contiguous();
    at::Tensor grad_x, grad_a, grad_b, grad_scales;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3) ||
        ctx->needs_input_grad(5)) {
      std::tie(grad_x, grad_a, grad_b, grad_scales) =
          bwd.call(grad_y, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], saved[8],
                   ctx->saved_data["max_rank"].toInt());
    }
    auto keep = [&](int i, const at::Tensor& g) { return ctx->needs_input_grad(i) ? g : at::Tensor(); };
    // y = base_out + LoRA term: the gradient of base_out is grad_y itself.
    return {keep(0, grad_x), keep(1, grads[0]), keep(2, grad_a), keep(3, grad_b), at::Tensor(),
            keep(5, grad_scales), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lora_autograd(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, const at::Tensor& prune_mask, const at::Tensor& scales,
                         const at::Tensor& rank_offsets, const at::Tensor& sorted_token_idx,
                         const at::Tensor& lang_offsets, int64_t max_rank) {
  return LoraFunction::apply(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                             lang_offsets, max_rank);
}

at::Tensor lora_cpu(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_a,
                    const at::Tensor& lora_b, const at::Tensor& prune_mask, const at::Tensor& scales,
                    const at::Tensor& rank_offsets, const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets,
                    int64_t max_rank) {
  return std::get<0>(forward_cpu(x, base_out, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                                 lang_offsets, max_rank));
}


// linear_forward with its backward as a C++ autograd node: grad_x = (LoRA part, written by the
// backward kernel) + grad_y W accumulated into it by the GEMM (beta = 1), so autograd does not add
// two (T, k) gradients of x in a separate pass. The weight and bias get gradients only when they
// require them (a frozen base does not).
class LinearLoraFunction : public torch::autograd::Function<LinearLoraFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& prune_mask, const at::Tensor& scales,
                            const at::Tensor& rank_offsets, const at::Tensor& sorted_token_idx,
                            const at::Tensor& lang_offsets, int64_t max_rank) {
    static const auto fwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("lslo_cpp::linear_forward", "")
                                .typed<std::tuple<at::Tensor, at::Tensor>(
                                    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h] = fwd.call(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx,
                           lang_offsets, max_rank);
    ctx->save_for_backward(
        {x, h, weight, lora_a, lora_b, prune_mask, scales, rank_offsets, sorted_token_idx, lang_offsets});
    ctx->saved_data["max_rank"] = max_rank;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto& bwd = backward_op();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[2];
    const at::Tensor grad_y = grads[0].contiguous();
    // needs_input_grad counts the tensor inputs that were given: an absent bias has no edge.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int shift = has_bias ? 1 : 0;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(2);
    const bool need_a = ctx->needs_input_grad(2 + shift), need_b = ctx->needs_input_grad(3 + shift);
    const bool need_scales = ctx->needs_input_grad(5 + shift);
    at::Tensor grad_x, grad_a, grad_b, grad_scales, grad_w, grad_bias;
    if (need_x || need_a || need_b || need_scales) {
      std::tie(grad_x, grad_a, grad_b, grad_scales) =
          bwd.call(grad_y, x, saved[1], saved[3], saved[4], saved[5], saved[6], saved[7], saved[8], saved[9],
                   ctx->saved_data["max_rank"].toInt());
      if (need_x) grad_x.addmm_(grad_y, weight);
    }
    if (need_w) grad_w = grad_y.t().mm(x);
    if (need_bias) grad_bias = grad_y.sum(0);
    auto keep = [](bool need, const at::Tensor& g) { return need ? g : at::Tensor(); };
    return {keep(need_x, grad_x), keep(need_w, grad_w),   keep(need_bias, grad_bias), keep(need_a, grad_a),
            keep(need_b, grad_b), at::Tensor(),            keep(need_scales, grad_scales), at::Tensor(),
            at::Tensor(),         at::Tensor(),            at::Tensor()};
  }
};

at::Tensor linear_lora_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& prune_mask,
                                const at::Tensor& scales, const at::Tensor& rank_offsets,
                                const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets,
                                int64_t max_rank) {
  return LinearLoraFunction::apply(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets,
                                   sorted_token_idx, lang_offsets, max_rank);
}

at::Tensor linear_lora_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& prune_mask,
                           const at::Tensor& scales, const at::Tensor& rank_offsets,
                           const at::Tensor& sorted_token_idx, const at::Tensor& lang_offsets, int64_t max_rank) {
  return std::get<0>(linear_forward_cpu(x, weight, bias, lora_a, lora_b, prune_mask, scales, rank_offsets,
                                        sorted_token_idx, lang_offsets, max_rank));
}

}  // namespace
}  // namespace lslo

// The schemas are lslo_kernels/spec.py's FORWARD, BACKWARD, ADD and LORA (tests/test_contract.py).
TORCH_LIBRARY(lslo_cpp, m) {
  m.def(
      "forward(Tensor x, Tensor base_out, Tensor lora_a, Tensor lora_b, Tensor prune_mask, Tensor scales, "
      "Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor x, Tensor h, Tensor lora_a, Tensor lora_b, Tensor prune_mask, "
      "Tensor scales, Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_(Tensor(a!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor prune_mask, Tensor scales, "
      "Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank) -> ()");
  m.def(
      "lora(Tensor x, Tensor base_out, Tensor lora_a, Tensor lora_b, Tensor prune_mask, Tensor scales, "
      "Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank) -> Tensor");
  m.def("stage_factors(Tensor lora_b, Tensor prune_mask, Tensor scales, Tensor rank_offsets) -> Tensor");
  m.def(
      "add_staged_(Tensor(a!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor prune_mask, Tensor scales, "
      "Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank, Tensor staged) -> ()");
  m.def(
      "linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor prune_mask, "
      "Tensor scales, Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank) "
      "-> (Tensor, Tensor)");
  m.def(
      "linear_decode(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor prune_mask, "
      "Tensor scales, Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank, "
      "Tensor? staged) -> Tensor");
  m.def(
      "linear_lora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor prune_mask, "
      "Tensor scales, Tensor rank_offsets, Tensor sorted_token_idx, Tensor lang_offsets, int max_rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(lslo_cpp, CPU, m) {
  m.impl("forward", &lslo::forward_cpu);
  m.impl("backward", &lslo::backward_cpu);
  m.impl("add_", &lslo::add_cpu);
  m.impl("lora", &lslo::lora_cpu);
  m.impl("stage_factors", &lslo::stage_factors_cpu);
  m.impl("add_staged_", &lslo::add_staged_cpu);
  m.impl("linear_forward", &lslo::linear_forward_cpu);
  m.impl("linear_lora", &lslo::linear_lora_cpu);
  m.impl("linear_decode", &lslo::linear_decode_cpu);
}

TORCH_LIBRARY_IMPL(lslo_cpp, Autograd, m) {
  m.impl("lora", &lslo::lora_autograd);
  m.impl("linear_lora", &lslo::linear_lora_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of the grouped language-specific LoRA op; registers torch.ops.lslo_cpp.*";
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
  }, "omp_get_max_threads() as seen by the extension; 0 when it was built without OpenMP.");
  m.def("supported_isas", &lslo::supported_isas, "Kernel variants this CPU can run, e.g. ['baseline', 'avx2'].");
  m.def("get_isa", &lslo::get_isa, "Kernel variant in use: 'avx2' when the CPU has AVX2+FMA, else 'baseline'.");
  m.def("set_isa", &lslo::set_isa, pybind11::arg("isa"),
        "Pick the kernel variant ('baseline' or 'avx2'; for tests and benchmarks). Returns the previous one.");
  m.def("set_streaming_min_bytes", &lslo::set_streaming_min_bytes, pybind11::arg("bytes"),
        "Outputs (y, grad_x) of at least this many bytes are written with non-temporal stores "
        "(default 8 MiB). Returns the previous threshold.");
  m.def("set_token_chunks", &lslo::set_token_chunks, pybind11::arg("chunk"), pybind11::arg("update"),
        "Tokens of one language per chunk of the kernels (1..128, default 64), and per load/store of a rank-r "
        "language's dA/dB rows: max(update, r) (update 1..chunk, default 8). Returns the previous pair.");
  m.def("set_min_parallel_work", &lslo::set_min_parallel_work, pybind11::arg("work"),
        "Calls with less estimated work (streamed elements) than this run on the calling thread, without an "
        "OpenMP fork. Returns the previous threshold.");
}
