// SaLSa's per-element math, shared by the CPU kernels (g++) and the CUDA kernels (nvcc).
//
// No torch here: nvcc compiles this header without ATen. The formulas are those of
// salsa_fused/backends/base.py, in the operation forms of the torch reference backend
// (salsa_fused/backends/torch_backend.py), so that a kernel rounds where the reference
// rounds and nowhere else:
//
//   g       = grad / grad_scale                          (with a GradScaler)
//   v_new   = v * beta2 + (g * g) * (1 - beta2)
//   m_new   = m * beta1 + g * (1 - beta1)
//   precond = 1 / (sqrt(v_new / bc2) + eps)              bc2 = 1 - beta2^(k+1)
//   d       = precond * g  |  precond * (m_new / bc1)  |  g
//                                                        direction gradient | momentum | raw
//   w       = fma(d, -step, w * decay_factor)            one rounding, as w.add(d, alpha=-step)
//
// Every product, sum, quotient and square root below is one IEEE round-to-nearest
// operation: on the device through the _rn intrinsics (nvcc would otherwise contract
// a*b+c), on the host by compiling with -ffp-contract=off. fused_mul_add is used only
// where the reference makes a single rounding.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SALSA_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define SALSA_HD inline __attribute__((always_inline))
#endif

namespace salsa {

// --- storage types: 16-bit weights are carried as their bits --------------------------

struct bf16_bits { uint16_t bits; };
struct fp16_bits { uint16_t bits; };

SALSA_HD uint32_t float_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
SALSA_HD float bits_float(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

// |x| < inf and not NaN, from the bits (independent of compiler flags about NaN).
SALSA_HD bool is_finite(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }

SALSA_HD float to_float(float x) { return x; }
SALSA_HD float to_float(bf16_bits x) { return bits_float(uint32_t(x.bits) << 16); }

SALSA_HD float to_float(fp16_bits x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  // Magnitude bits shifted into place and rebiased 15 -> 127; inf/NaN rebiased once more to the
  // all-ones exponent; a subnormal or zero h reads as (1 + mantissa * 2^-10) * 2^-14, and 2^-14 is
  // then taken off: mantissa * 2^-24, exact. Masks, not selects: GCC would not vectorize those
  // once a finiteness test of the result was folded into them.
  const uint32_t h = x.bits;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t subnormal = 0u - uint32_t(exponent == 0);
  const uint32_t special = 0u - uint32_t(exponent == 31);
  const uint32_t bits = ((h & 0x7fffu) << 13) + (112u << 23) + (special & (112u << 23)) + (subnormal & (1u << 23));
  const float magnitude = bits_float(bits) - bits_float(subnormal & 0x38800000u);
  return bits_float(float_bits(magnitude) | ((h & 0x8000u) << 16));
#endif
}

template <typename T> SALSA_HD T from_float(float x);

template <> SALSA_HD float from_float<float>(float x) { return x; }

// Round to nearest even; a NaN becomes the quiet NaN 0x7fc0, sign and payload dropped (torch keeps
// them; no pass stores a NaN weight: a non-finite move is refused or masked before the store).
template <> SALSA_HD bf16_bits from_float<bf16_bits>(float x) {
#if defined(__CUDA_ARCH__)
  return bf16_bits{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16_bits{uint16_t(x != x ? 0x7fc0u : rounded)};
#endif
}

// Round to nearest even; overflow to inf, NaN to the quiet NaN 0x7e00 with its sign (payload dropped).
template <> SALSA_HD fp16_bits from_float<fp16_bits>(float x) {
#if defined(__CUDA_ARCH__)
  return fp16_bits{__half_as_ushort(__float2half_rn(x))};
#else
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t magnitude = u & 0x7fffffffu;
  // Normal range (|x| >= 2^-14): drop 13 mantissa bits, rebias 127 -> 15, round half to even;
  // a carry out of the mantissa correctly bumps the exponent (up to inf).
  // (Written as one add, as for bf16: a comparison on the dropped bits kept GCC from vectorizing.)
  const uint32_t normal = (magnitude - 0x38000000u + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
  // Subnormal range: adding 0.5 leaves ulp 2^-24, the fp16 subnormal unit, so the hardware
  // add rounds |x| to it (to nearest even) and the low bits are the fp16 subnormal.
  const uint32_t subnormal = float_bits(bits_float(magnitude) + 0.5f) - 0x3f000000u;
  uint32_t h = magnitude < 0x38800000u ? subnormal : normal;
  h = magnitude >= 0x477ff000u ? 0x7c00u : h;  // rounds to >= 65520: inf
  h = magnitude > 0x7f800000u ? 0x7e00u : h;   // NaN
  return fp16_bits{uint16_t(sign | h)};
#endif
}

// --- single-rounding arithmetic -----------------------------------------------------

SALSA_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SALSA_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

SALSA_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

SALSA_HD float square_root(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// a * b + c with one rounding.
SALSA_HD float fused_mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// --- the update ---------------------------------------------------------------------

// The search direction d; the values are those of the ops' `direction` argument
// (salsa_fused/backends/cpp_backend.py). Along raw no pass reads or writes m, v.
enum class Direction : int { gradient = 0, momentum = 1, raw = 2 };

// Scalars of one pass, rounded to fp32 once on the host (the reference's scalar operands).
struct Scalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  float bias_correction1, bias_correction2, eps;
  float decay_factor;   // 1 - weight_decay * decay_step_size (exactly 1 without decay)
  float neg_step;       // -step_size
  float step_change;    // previous_step_size - step_size (in-place retrial)
  float previous_step;  // previous_step_size (in-place restore)
};

struct Moments { float exp_avg, exp_avg_sq; };

// 1 - beta etc. are formed in double and rounded once, as Python scalars reach torch ops.
// Host-only: both extensions build their launch scalars here.
inline Scalars make_scalars(double beta1, double beta2, double bias_correction1, double bias_correction2,
                            double eps, double decay_factor, double step_size, double previous_step_size) {
  Scalars s{};
  s.beta1 = float(beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.bias_correction1 = float(bias_correction1);
  s.bias_correction2 = float(bias_correction2);
  s.eps = float(eps);
  s.decay_factor = float(decay_factor);
  s.neg_step = float(-step_size);
  s.step_change = float(previous_step_size - step_size);
  s.previous_step = float(previous_step_size);
  return s;
}

// m_new = m * beta1 + g * (1 - beta1);  v_new = v * beta2 + (g * g) * (1 - beta2).
SALSA_HD Moments new_moments(float g, float exp_avg, float exp_avg_sq, const Scalars& s) {
  return Moments{add(mul(exp_avg, s.beta1), mul(g, s.one_minus_beta1)),
                 add(mul(exp_avg_sq, s.beta2), mul(mul(g, g), s.one_minus_beta2))};
}

// 1 / (sqrt(v / bc2) + eps).
SALSA_HD float preconditioner(float exp_avg_sq, const Scalars& s) {
  return div(1.0f, add(square_root(div(exp_avg_sq, s.bias_correction2)), s.eps));
}

// d = precond * (m / bc1) (momentum) or precond * g (gradient); along raw d is g itself.
template <Direction D>
SALSA_HD float direction(float precond, float g, float exp_avg, const Scalars& s) {
  static_assert(D != Direction::raw, "along raw d = g: no preconditioner");
  return D == Direction::momentum ? mul(precond, div(exp_avg, s.bias_correction1)) : mul(precond, g);
}

// One term of q = sum g * d, with this step's moments: (g * g) * precond, or g * d; g * g along raw.
template <Direction D>
SALSA_HD float slope_term(float g, float exp_avg, float exp_avg_sq, const Scalars& s) {
  if constexpr (D == Direction::raw) {
    return mul(g, g);
  } else {
    const Moments next = new_moments(g, exp_avg, exp_avg_sq, s);
    const float precond = preconditioner(next.exp_avg_sq, s);
    if constexpr (D == Direction::momentum) {
      // where g * g overflows, v_hat is inf and precond 0: the term is NaN, as (g * g) * precond is
      return precond > 0.0f ? mul(g, direction<D>(precond, g, next.exp_avg, s)) : bits_float(0x7fc00000u);
    } else {
      return mul(mul(g, g), precond);
    }
  }
}

// w_dec - step * d, one rounding for the move (w * decay_factor is exact without decay).
SALSA_HD float trial_weight(float w, float d, const Scalars& s) {
  return fused_mul_add(d, s.neg_step, mul(w, s.decay_factor));
}

// In place: w + (previous_step - step) * d, the product rounded first.
SALSA_HD float retrial_in_place(float w, float d, const Scalars& s) {
  return add(w, mul(d, s.step_change));
}

// In place: (w + previous_step * d) / decay_factor.
SALSA_HD float restore_in_place(float w, float d, const Scalars& s) {
  return div(fused_mul_add(d, s.previous_step, w), s.decay_factor);
}

// Whether a new weight stays finite once stored as W: a 16-bit weight overflows where its fp32 value
// does not (float16 at |x| >= 65520). fp32 weights are not checked (the torch reference does not).
// |x| below the smallest magnitude that rounds (to nearest even) to inf: bf16 0x1.ffp+127 (bits
// 0x7f7f8000), fp16 65520 (0x477ff000); NaN fails the comparison.
template <class W> SALSA_HD bool stays_finite(float x);
template <> SALSA_HD bool stays_finite<float>(float) { return true; }
template <> SALSA_HD bool stays_finite<bf16_bits>(float x) { return fabsf(x) < 0x1.ffp+127f; }
template <> SALSA_HD bool stays_finite<fp16_bits>(float x) { return fabsf(x) < 65520.0f; }

// One element of the plain step; returns 1 when the element is skipped, else 0 (an int, not a bool:
// GCC vectorized the callers' count of a returned bool poorly, 1.6x slower for bf16). Skipped: g not
// finite or g * g overflowing fp32 (|g| above ~1.8e19, which would write v = inf): w, m, v left
// alone; the new weight overflowing a 16-bit W: w left alone (m, v take the finite g).
template <class W>
SALSA_HD int32_t plain_update(float g, float& w, float& exp_avg, float& exp_avg_sq, const Scalars& s) {
  const Moments next = new_moments(g, exp_avg, exp_avg_sq, s);
  const float update = direction<Direction::momentum>(preconditioner(next.exp_avg_sq, s), g, next.exp_avg, s);
  const float moved = trial_weight(w, update, s);
  const bool finite = is_finite(g * g);
  const bool stays = stays_finite<W>(moved);
  exp_avg = finite ? next.exp_avg : exp_avg;
  exp_avg_sq = finite ? next.exp_avg_sq : exp_avg_sq;
  w = stays ? (finite ? moved : w) : w;  // two selects, not one on (finite && stays): GCC vectorizes these
  return (finite & stays) ? 0 : 1;
}

// One element of the plain step along raw: w_dec - step * g. Returns 1 (and leaves w alone) when g
// is not finite or the new weight would overflow a 16-bit W, else 0.
template <class W>
SALSA_HD int32_t raw_plain_update(float g, float& w, const Scalars& s) {
  const float moved = trial_weight(w, g, s);
  const bool finite = is_finite(g);
  const bool stays = stays_finite<W>(moved);
  w = stays ? (finite ? moved : w) : w;  // as in plain_update
  return (finite & stays) ? 0 : 1;
}

}  // namespace salsa
