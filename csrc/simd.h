// Portable short vectors for the grouped-LoRA CPU kernels.
//
// GCC/Clang vector extensions instead of intrinsics: one source that the compiler lowers to the
// instruction set of the function it is inlined into. grouped_lora.cpp instantiates the kernels
// twice, for the build's baseline ISA (SSE2 on x86-64, NEON on aarch64) and inside functions
// marked target("avx2,fma"), picked at run time; so setup.py needs no -march flag. Every helper
// here and in kernels.h is always_inline for that reason: a helper left out of line would be
// compiled once, for the baseline ISA.
//
// Inner loops run over independent lanes, never as a scalar reduction, because float reductions
// only vectorise under -ffast-math, which we do not use.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#define LSLO_INLINE inline __attribute__((always_inline))

namespace lslo {

// 32 bytes = one AVX register, two SSE/NEON registers.
constexpr int kVectorBytes = 32;

template <typename acc_t>
struct Simd;

template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(kVectorBytes)));
  typedef uint32_t bits __attribute__((vector_size(kVectorBytes)));
  static constexpr int width = kVectorBytes / sizeof(float);
};

template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(kVectorBytes)));
  static constexpr int width = kVectorBytes / sizeof(double);
};

template <typename acc_t>
using vec_t = typename Simd<acc_t>::vec;

// Lane by lane, not vec_t{} + value: without -ffast-math the compiler may not fold 0 + value
// (-0.0 + 0 is +0), and emitted a scalar add and a register broadcast instead of one broadcast
// load for every coefficient in the kernels' inner loops.
template <typename acc_t>
LSLO_INLINE vec_t<acc_t> broadcast(acc_t value) {
  vec_t<acc_t> v;
  for (int i = 0; i < Simd<acc_t>::width; ++i) v[i] = value;
  return v;
}

// ------------------------------------------------------------------ loads
template <typename acc_t, typename scalar_t>
LSLO_INLINE vec_t<acc_t> load(const scalar_t* src) {
  constexpr int W = Simd<acc_t>::width;
  vec_t<acc_t> v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, src, sizeof(v));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // bf16 is the upper half of an fp32: widen by a 16-bit shift, no rounding involved.
    typedef uint16_t half_bits __attribute__((vector_size(kVectorBytes / 2)));
    half_bits raw;
    std::memcpy(&raw, src, sizeof(raw));
    typename Simd<float>::bits wide = __builtin_convertvector(raw, typename Simd<float>::bits) << 16;
    std::memcpy(&v, &wide, sizeof(v));
  } else {
    acc_t tmp[W];
    for (int i = 0; i < W; ++i) tmp[i] = static_cast<acc_t>(src[i]);
    std::memcpy(&v, tmp, sizeof(v));
  }
  return v;
}

// First n (< width) lanes from src, the others zero: the tail of a row without reading past it.
template <typename acc_t, typename scalar_t>
LSLO_INLINE vec_t<acc_t> load_partial(const scalar_t* src, int64_t n) {
  constexpr int W = Simd<acc_t>::width;
  acc_t tmp[W] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(src[i]);
  vec_t<acc_t> v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

// ----------------------------------------------------------------- stores
template <typename acc_t, typename scalar_t>
LSLO_INLINE void store(scalar_t* dst, vec_t<acc_t> v) {
  constexpr int W = Simd<acc_t>::width;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, &v, sizeof(v));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // Round to nearest even, NaN -> 0x7FC0: bit for bit what c10::BFloat16(float) does.
    using bits_t = typename Simd<float>::bits;
    typedef uint16_t half_bits __attribute__((vector_size(kVectorBytes / 2)));
    bits_t u;
    std::memcpy(&u, &v, sizeof(u));
    bits_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits_t is_nan = (bits_t)((u & 0x7FFFFFFFu) > 0x7F800000u);  // lanes: all ones or zero
    rounded = (rounded & ~is_nan) | (is_nan & 0x7FC0u);
    half_bits narrow = __builtin_convertvector(rounded, half_bits);
    std::memcpy(dst, &narrow, sizeof(narrow));
  } else {
    acc_t tmp[W];
    std::memcpy(tmp, &v, sizeof(v));
    for (int i = 0; i < W; ++i) dst[i] = static_cast<scalar_t>(tmp[i]);
  }
}

// store() with a non-temporal hint where the ISA baseline has one (x86-64 SSE/SSE2 movnt, 16-byte
// aligned dst), for fp32 and bf16 outputs: the line is written without first being read.
template <typename acc_t, typename scalar_t>
LSLO_INLINE void store_stream(scalar_t* dst, vec_t<acc_t> v) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    typedef float quad __attribute__((vector_size(16)));
    quad lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    __builtin_ia32_movntps(dst, lo);
    __builtin_ia32_movntps(dst + 4, hi);
    return;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    typedef long long pair __attribute__((vector_size(16)));
    scalar_t narrow[Simd<float>::width];
    store<acc_t>(narrow, v);
    pair bits;
    std::memcpy(&bits, narrow, sizeof(bits));
    __builtin_ia32_movntdq(reinterpret_cast<pair*>(dst), bits);
    return;
  }
#endif
  store<acc_t>(dst, v);
}

template <typename acc_t, typename scalar_t>
LSLO_INLINE void store_partial(scalar_t* dst, vec_t<acc_t> v, int64_t n) {
  constexpr int W = Simd<acc_t>::width;
  acc_t tmp[W];
  std::memcpy(tmp, &v, sizeof(v));
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(tmp[i]);
}

template <typename acc_t>
LSLO_INLINE acc_t sum_lanes(vec_t<acc_t> v) {
  constexpr int W = Simd<acc_t>::width;
  acc_t s = 0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

}  // namespace lslo
