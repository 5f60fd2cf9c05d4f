// The salsa_fused torch ops and their CPU kernels.
//
// Every op takes a whole bucket (TensorLists: weights, gradients, fp32 moments, saved
// copies) and runs one at::parallel_for over fixed-size chunks of all its tensors, so a
// pass is one call from Python, allocates no tensor (but q's 0-dim result), and gives the
// same bits with any number of threads. Semantics: salsa_fused/backends/torch_backend.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../salsa_math.h"
#include "../tensor_layout.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "span.h"

// The span kernels, once per instruction set; x86 gets an AVX2+FMA build beside the baseline.
#define SALSA_CPU_ISA baseline
namespace salsa_cpu {
#include "span_kernels.h"
}
#undef SALSA_CPU_ISA

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SALSA_HAS_AVX2_BUILD 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define SALSA_CPU_ISA avx2
#define SALSA_CPU_STREAMING_STORES 1
#define SALSA_CPU_F16C 1
namespace salsa_cpu {
#include "span_kernels.h"
}
#undef SALSA_CPU_F16C
#undef SALSA_CPU_STREAMING_STORES
#undef SALSA_CPU_ISA
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace salsa_cpu {

using salsa::Scalars;
using salsa::make_scalars;

struct Kernels {
  double (*slope)(const Span&, const Kinds&, const Scalars&);
  void (*first_trial)(const Span&, const Kinds&, const Scalars&);
  void (*retrial)(const Span&, const Kinds&, const Scalars&);
  void (*restore)(const Span&, const Kinds&, const Scalars&);
  int64_t (*plain)(const Span&, const Kinds&, const Scalars&);
  const char* isa;
};

Kernels pick_kernels() {
#ifdef SALSA_HAS_AVX2_BUILD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return {avx2::slope_span, avx2::first_trial_span, avx2::retrial_span, avx2::restore_span,
            avx2::plain_span, "avx2"};
  }
#endif
  return {baseline::slope_span, baseline::first_trial_span, baseline::retrial_span,
          baseline::restore_span, baseline::plain_span, "baseline"};
}

const Kernels& kernels() {
  static const Kernels chosen = pick_kernels();
  return chosen;
}

// Elements per chunk: the unit of work of a thread and of q's fixed-order partial sums.
constexpr int64_t CHUNK = 1 << 15;

Dtype dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kBFloat16: return Dtype::bf16;
    case at::kHalf: return Dtype::f16;
    default: TORCH_CHECK(false, "salsa_fused cpp backend: ", what, " must be fp32, bf16 or fp16, got ", t.scalar_type());
  }
}

// The validated streams of one bucket and the chunk layout over them.
struct Bucket {
  at::TensorList weights, grads, exp_avg, exp_avg_sq, saved;  // saved and grads may be empty
  Kinds kinds{};
  std::vector<int64_t> first_chunk;  // first_chunk[i]: index of tensor i's first chunk; back() = total

  Span span(int64_t chunk) const {
    const auto it = std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk) - 1;
    const int64_t index = it - first_chunk.begin();
    const int64_t start = (chunk - *it) * CHUNK;
    const at::Tensor& ref = !weights.empty() ? weights[index] : grads[index];
    const int64_t n = std::min(CHUNK, ref.numel() - start);
    auto offset = [&](const at::Tensor& t) { return static_cast<char*>(t.data_ptr()) + start * t.element_size(); };
    Span s{};
    s.weight = weights.empty() ? nullptr : offset(weights[index]);
    s.grad = grads.empty() ? nullptr : offset(grads[index]);
    s.exp_avg = reinterpret_cast<float*>(offset(exp_avg[index]));
    s.exp_avg_sq = reinterpret_cast<float*>(offset(exp_avg_sq[index]));
    s.saved = saved.empty() ? nullptr : offset(saved[index]);
    s.n = n;
    return s;
  }

  int64_t chunks() const { return first_chunk.back(); }
};

// Same numel, device, and a dense layout shared by every stream of a tensor (strides apart on
// size-1 dimensions only are one layout: tensor_layout.h), so that element i of the flat storage
// span is the same element in every stream.
void check_same_layout(const at::Tensor& ref, const at::Tensor& t, int64_t index, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), "salsa_fused cpp backend: tensor ", index, ": ", what,
              " is on ", t.device(), ", the bucket on ", ref.device());
  TORCH_CHECK(t.numel() == ref.numel(), "salsa_fused cpp backend: tensor ", index, ": ", what, " has ",
              t.numel(), " elements, the weight ", ref.numel());
  TORCH_CHECK(t.is_non_overlapping_and_dense() &&
                  (salsa_layout::same_element_offsets(t, ref) || (t.is_contiguous() && ref.is_contiguous())),
              "salsa_fused cpp backend: tensor ", index, ": ", what,
              " must be dense with the weight's memory layout");
}

// Only the slope reads no weights (needs_weights false): every other pass writes them.
Bucket make_bucket(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg,
                   at::TensorList exp_avg_sq, at::TensorList saved, bool needs_grads, bool needs_weights = true) {
  const size_t n = exp_avg_sq.size();
  TORCH_CHECK((weights.size() == n || (!needs_weights && weights.empty())) && exp_avg.size() == n &&
                  (grads.size() == n || (!needs_grads && grads.empty())) && (saved.empty() || saved.size() == n),
              "salsa_fused cpp backend: the lists of a bucket must have one entry per parameter");
  Bucket b{weights, grads, exp_avg, exp_avg_sq, saved};
  b.kinds.weight = Dtype::f32;
  b.kinds.grad = Dtype::f32;
  b.first_chunk.resize(n + 1);
  b.first_chunk[0] = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = weights.empty() ? exp_avg_sq[i] : weights[i];
    TORCH_CHECK(ref.device().is_cpu(), "salsa_fused cpp backend: tensor ", i, " is on ", ref.device(), ", not the CPU");
    TORCH_CHECK(ref.is_non_overlapping_and_dense(), "salsa_fused cpp backend: tensor ", i, " must be dense");
    if (!weights.empty()) {
      const Dtype w = dtype_of(weights[i], "weights");
      TORCH_CHECK(i == 0 || w == b.kinds.weight, "salsa_fused cpp backend: all weights of a bucket must share one dtype");
      b.kinds.weight = w;
    }
    if (!grads.empty()) {
      const Dtype g = dtype_of(grads[i], "gradients");
      TORCH_CHECK(i == 0 || g == b.kinds.grad, "salsa_fused cpp backend: all gradients of a bucket must share one dtype");
      b.kinds.grad = g;
      check_same_layout(ref, grads[i], i, "gradient");
    }
    TORCH_CHECK(exp_avg[i].scalar_type() == at::kFloat && exp_avg_sq[i].scalar_type() == at::kFloat,
                "salsa_fused cpp backend: exp_avg and exp_avg_sq must be fp32");
    check_same_layout(ref, exp_avg[i], i, "exp_avg");
    check_same_layout(ref, exp_avg_sq[i], i, "exp_avg_sq");
    if (!saved.empty()) {
      TORCH_CHECK(saved[i].scalar_type() == weights[i].scalar_type(),
                  "salsa_fused cpp backend: saved copies must have the weights' dtype");
      check_same_layout(ref, saved[i], i, "saved copy");
    }
    b.first_chunk[i + 1] = b.first_chunk[i] + (ref.numel() + CHUNK - 1) / CHUNK;
  }
  if (!weights.empty() && !grads.empty()) {
    TORCH_CHECK(b.kinds.grad == Dtype::f32 || b.kinds.grad == b.kinds.weight,
                "salsa_fused cpp backend: gradients must be fp32 or in the weights' dtype");
  }
  if (weights.empty()) b.kinds.weight = b.kinds.grad;  // q reads no weights
  return b;
}

// The value of a one-element tensor; read from memory on the CPU (no op dispatched).
double scalar_value(const at::Tensor& t) {
  if (t.device().is_cpu() && t.numel() == 1) {
    switch (t.scalar_type()) {
      case at::kFloat: return *t.const_data_ptr<float>();
      case at::kDouble: return *t.const_data_ptr<double>();
      case at::kBFloat16: return static_cast<float>(*t.const_data_ptr<c10::BFloat16>());
      case at::kHalf: return static_cast<float>(*t.const_data_ptr<c10::Half>());
      default: break;
    }
  }
  return t.item().toDouble();
}

// The ops' `direction` argument: 0 gradient, 1 momentum, 2 raw (salsa::Direction).
salsa::Direction direction_of(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 2, "salsa_fused cpp backend: direction must be 0 (gradient), 1 (momentum) "
              "or 2 (raw), got ", code);
  return static_cast<salsa::Direction>(code);
}

void set_grad_scale(Kinds& k, const std::optional<at::Tensor>& grad_scale) {
  k.has_scale = grad_scale.has_value();
  k.grad_scale = k.has_scale ? static_cast<float>(scalar_value(*grad_scale)) : 1.0f;
}

template <class Fn>
void for_each_chunk(const Bucket& b, Fn&& fn) {
  at::parallel_for(0, b.chunks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c, b.span(c));
  });
}

at::Tensor slope(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq, double beta1,
                 double beta2, double bias_correction1, double bias_correction2, double eps, int64_t direction,
                 const std::optional<at::Tensor>& grad_scale) {
  Bucket b = make_bucket({}, grads, exp_avg, exp_avg_sq, {}, true, false);
  b.kinds.direction = direction_of(direction);
  set_grad_scale(b.kinds, grad_scale);
  const Scalars s = make_scalars(beta1, beta2, bias_correction1, bias_correction2, eps, 1.0, 0.0, 0.0);
  std::vector<double> partials(b.chunks());
  const auto kernel = kernels().slope;
  for_each_chunk(b, [&](int64_t c, const Span& span) { partials[c] = kernel(span, b.kinds, s); });
  double total = 0.0;  // chunk order: fixed, whatever the threads did
  for (double p : partials) total += p;
  at::Tensor q = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *q.data_ptr<float>() = float(total);
  return q;
}

void first_trial(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                 at::TensorList saved, double beta1, double beta2, double bias_correction1, double bias_correction2,
                 double eps, double decay_factor, double step_size, int64_t direction,
                 const std::optional<at::Tensor>& grad_scale) {
  Bucket b = make_bucket(weights, grads, exp_avg, exp_avg_sq, saved, true);
  b.kinds.direction = direction_of(direction);
  set_grad_scale(b.kinds, grad_scale);
  const Scalars s = make_scalars(beta1, beta2, bias_correction1, bias_correction2, eps, decay_factor, step_size, 0.0);
  const auto kernel = kernels().first_trial;
  for_each_chunk(b, [&](int64_t, const Span& span) { kernel(span, b.kinds, s); });
}

void retrial(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
             at::TensorList saved, double bias_correction1, double bias_correction2, double eps, double decay_factor,
             double step_size, double previous_step_size, int64_t direction,
             const std::optional<at::Tensor>& grad_scale) {
  Bucket b = make_bucket(weights, grads, exp_avg, exp_avg_sq, saved, true);
  b.kinds.direction = direction_of(direction);
  set_grad_scale(b.kinds, grad_scale);
  const Scalars s = make_scalars(0.0, 0.0, bias_correction1, bias_correction2, eps, decay_factor, step_size,
                                 previous_step_size);
  const auto kernel = kernels().retrial;
  for_each_chunk(b, [&](int64_t, const Span& span) { kernel(span, b.kinds, s); });
}

void restore(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
             at::TensorList saved, double bias_correction1, double bias_correction2, double eps, double decay_factor,
             double previous_step_size, int64_t direction, const std::optional<at::Tensor>& grad_scale) {
  Bucket b = make_bucket(weights, grads, exp_avg, exp_avg_sq, saved, true);
  b.kinds.direction = direction_of(direction);
  set_grad_scale(b.kinds, grad_scale);
  const Scalars s = make_scalars(0.0, 0.0, bias_correction1, bias_correction2, eps, decay_factor, 0.0,
                                 previous_step_size);
  const auto kernel = kernels().restore;
  for_each_chunk(b, [&](int64_t, const Span& span) { kernel(span, b.kinds, s); });
}

void plain_step(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                double beta1, double beta2, double bias_correction1, double bias_correction2, double eps,
                double decay_factor, double step_size, int64_t direction, const at::Tensor& loss,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& nonfinite_count) {
  // Adam's update (m_hat * precond) unless the direction is raw.
  const salsa::Direction along =
      direction_of(direction) == salsa::Direction::raw ? salsa::Direction::raw : salsa::Direction::momentum;
  TORCH_CHECK(loss.numel() == 1, "salsa_fused cpp backend: plain_step needs a one-element loss tensor");
  if (nonfinite_count.has_value()) {
    TORCH_CHECK(nonfinite_count->scalar_type() == at::kLong && nonfinite_count->numel() == 1 &&
                    nonfinite_count->device().is_cpu(),
                "salsa_fused cpp backend: nonfinite_count must be a one-element int64 CPU tensor");
  }
  Bucket b = make_bucket(weights, grads, exp_avg, exp_avg_sq, {}, true);
  // The guards, as the reference: nothing changes for a non-finite (fp32) loss or a set found_inf.
  if (!std::isfinite(static_cast<float>(scalar_value(loss)))) return;  // 1e39 overflows fp32: skipped
  if (found_inf.has_value() && scalar_value(*found_inf) != 0.0) return;
  b.kinds.direction = along;
  set_grad_scale(b.kinds, grad_scale);
  const Scalars s = make_scalars(beta1, beta2, bias_correction1, bias_correction2, eps, decay_factor, step_size, 0.0);
  const auto kernel = kernels().plain;
  std::atomic<int64_t> skipped{0};
  for_each_chunk(b, [&](int64_t, const Span& span) {
    const int64_t count = kernel(span, b.kinds, s);
    if (count != 0) skipped += count;
  });
  if (nonfinite_count.has_value() && skipped.load() != 0) {
    *nonfinite_count->data_ptr<int64_t>() += skipped.load();
  }
}

std::string cpu_isa() { return kernels().isa; }

}  // namespace salsa_cpu

// Schemas: the Python side is salsa_fused/backends/cpp_backend.py. An empty `saved`
// list means "no saved copy" (restore in place). `direction`: 0 gradient, 1 momentum, 2 raw;
// the plain step moves along Adam's update for 0 and 1.
TORCH_LIBRARY(salsa_fused, m) {
  m.def("slope(Tensor[] grads, Tensor[] exp_avg, Tensor[] exp_avg_sq, float beta1, float beta2, "
        "float bias_correction1, float bias_correction2, float eps, int direction, Tensor? grad_scale) -> Tensor");
  m.def("first_trial_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor(d!)[] saved, float beta1, float beta2, float bias_correction1, float bias_correction2, float eps, "
        "float decay_factor, float step_size, int direction, Tensor? grad_scale) -> ()");
  m.def("retrial_(Tensor(a!)[] weights, Tensor[] grads, Tensor[] exp_avg, Tensor[] exp_avg_sq, Tensor[] saved, "
        "float bias_correction1, float bias_correction2, float eps, float decay_factor, float step_size, "
        "float previous_step_size, int direction, Tensor? grad_scale) -> ()");
  m.def("restore_(Tensor(a!)[] weights, Tensor[] grads, Tensor[] exp_avg, Tensor[] exp_avg_sq, Tensor[] saved, "
        "float bias_correction1, float bias_correction2, float eps, float decay_factor, float previous_step_size, "
        "int direction, Tensor? grad_scale) -> ()");
  m.def("plain_step_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "float beta1, float beta2, float bias_correction1, float bias_correction2, float eps, float decay_factor, "
        "float step_size, int direction, Tensor loss, Tensor? found_inf, Tensor? grad_scale, Tensor(d!)? nonfinite_count) -> ()");
  m.def("cpu_isa() -> str", &salsa_cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(salsa_fused, CPU, m) {
  m.impl("slope", &salsa_cpu::slope);
  m.impl("first_trial_", &salsa_cpu::first_trial);
  m.impl("retrial_", &salsa_cpu::retrial);
  m.impl("restore_", &salsa_cpu::restore);
  m.impl("plain_step_", &salsa_cpu::plain_step);
}
