// The CUDA implementations of the salsa_fused ops (schemas: csrc/cpu/salsa_cpu.cpp): a thin
// binding that validates the bucket, writes its tensor table and launches one kernel of
// salsa_kernels.cuh per pass. Compiled only where a CUDA torch and nvcc exist.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "salsa_kernels.cuh"
#include "../tensor_layout.h"

namespace salsa_cuda {

namespace {

struct Table {
  at::Tensor rows;  // the TensorRows on the device (kept alive until the launch is queued)
  int n_tensors = 0;
  int64_t n_chunks = 0;
  at::ScalarType weight = at::kFloat, grad = at::kFloat;
};

void check_stream(const at::Tensor& ref, const at::Tensor& t, size_t i, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), "salsa_fused cuda backend: tensor ", i, ": ", what, " is on ",
              t.device(), ", the bucket on ", ref.device());
  TORCH_CHECK(t.numel() == ref.numel() && t.is_non_overlapping_and_dense() &&
                  (salsa_layout::same_element_offsets(t, ref) || (t.is_contiguous() && ref.is_contiguous())),
              "salsa_fused cuda backend: tensor ", i, ": ", what, " must be dense with the weight's layout and numel");
}

// Validate the bucket and copy its table to the device (pinned host buffer, async copy).
// Only the slope reads no weights (needs_weights false): every other pass writes them.
Table make_table(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                 at::TensorList saved, bool needs_weights = true) {
  const size_t n = exp_avg_sq.size();
  TORCH_CHECK((weights.size() == n || (!needs_weights && weights.empty())) && grads.size() == n && exp_avg.size() == n &&
                  (saved.empty() || saved.size() == n),
              "salsa_fused cuda backend: the lists of a bucket must have one entry per parameter");
  Table table;
  if (n == 0) return table;
  table.weight = weights.empty() ? grads[0].scalar_type() : weights[0].scalar_type();
  table.grad = grads[0].scalar_type();
  TORCH_CHECK(table.weight == at::kFloat || table.weight == at::kBFloat16 || table.weight == at::kHalf,
              "salsa_fused cuda backend: weights must be fp32, bf16 or fp16");
  TORCH_CHECK(table.grad == at::kFloat || table.grad == table.weight,
              "salsa_fused cuda backend: gradients must be fp32 or in the weights' dtype");
  at::Tensor host = at::empty({int64_t(n * sizeof(TensorRow))}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* rows = reinterpret_cast<TensorRow*>(host.data_ptr());
  int64_t chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = weights.empty() ? exp_avg_sq[i] : weights[i];
    TORCH_CHECK(ref.is_cuda(), "salsa_fused cuda backend: tensor ", i, " is on ", ref.device());
    TORCH_CHECK(ref.device() == exp_avg_sq[0].device(), "salsa_fused cuda backend: tensor ", i, " is on ",
                ref.device(), ", the bucket's first on ", exp_avg_sq[0].device(), ": a bucket is on one device");
    TORCH_CHECK(ref.is_non_overlapping_and_dense(), "salsa_fused cuda backend: tensor ", i, " must be dense");
    if (!weights.empty()) TORCH_CHECK(weights[i].scalar_type() == table.weight,
                                      "salsa_fused cuda backend: all weights of a bucket must share one dtype");
    TORCH_CHECK(grads[i].scalar_type() == table.grad,
                "salsa_fused cuda backend: all gradients of a bucket must share one dtype");
    TORCH_CHECK(exp_avg[i].scalar_type() == at::kFloat && exp_avg_sq[i].scalar_type() == at::kFloat,
                "salsa_fused cuda backend: exp_avg and exp_avg_sq must be fp32");
    check_stream(ref, grads[i], i, "gradient");
    check_stream(ref, exp_avg[i], i, "exp_avg");
    check_stream(ref, exp_avg_sq[i], i, "exp_avg_sq");
    if (!saved.empty()) {
      TORCH_CHECK(saved[i].scalar_type() == table.weight, "salsa_fused cuda backend: saved copies must have the weights' dtype");
      check_stream(ref, saved[i], i, "saved copy");
    }
    TensorRow& row = rows[i];
    row.numel = ref.numel();
    row.first_chunk = chunks;
    row.ptr[WEIGHT] = weights.empty() ? nullptr : weights[i].data_ptr();
    row.ptr[GRAD] = grads[i].data_ptr();
    row.ptr[EXP_AVG] = exp_avg[i].data_ptr();
    row.ptr[EXP_AVG_SQ] = exp_avg_sq[i].data_ptr();
    row.ptr[SAVED] = saved.empty() ? nullptr : saved[i].data_ptr();
    chunks += (ref.numel() + CHUNK - 1) / CHUNK;
  }
  TORCH_CHECK(chunks < (int64_t(1) << 31), "salsa_fused cuda backend: bucket too large for one launch");
  table.rows = host.to(exp_avg_sq[0].device(), at::kByte, /*non_blocking=*/true);
  table.n_tensors = int(n);
  table.n_chunks = chunks;
  return table;
}

// A one-element tensor as fp32 on the bucket's device: t itself, or its copy there (GradScaler keeps found_inf on
// its own device, which a model split over GPUs does not share; the reference moves it likewise). The caller keeps
// it until the launch is queued.
std::optional<at::Tensor> on_bucket_device(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* what) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, "salsa_fused cuda backend: ", what, " must be a one-element tensor, got ", t->numel(),
              " elements");
  return t->to(like.device(), at::kFloat);
}

const float* float_data(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

Args make_args(const Table& table, const salsa::Scalars& s) {
  Args a{};
  a.rows = reinterpret_cast<const TensorRow*>(table.rows.data_ptr());
  a.n_tensors = table.n_tensors;
  a.s = s;
  return a;
}

using salsa::make_scalars;

// Call fn with a (W, G) pair of kernel storage types: fn(W{}, G{}).
template <class Fn>
void dispatch_types(const Table& t, Fn&& fn) {
  using salsa::bf16_bits;
  using salsa::fp16_bits;
  if (t.weight == at::kFloat) return fn(float{}, float{});
  if (t.weight == at::kBFloat16) {
    if (t.grad == at::kFloat) return fn(bf16_bits{}, float{});
    return fn(bf16_bits{}, bf16_bits{});
  }
  if (t.grad == at::kFloat) return fn(fp16_bits{}, float{});
  return fn(fp16_bits{}, fp16_bits{});
}

// Call fn with the ops' `direction` argument as a compile-time salsa::Direction:
// fn(std::integral_constant<salsa::Direction, D>{}).
template <class Fn>
void dispatch_direction(int64_t code, Fn&& fn) {
  using salsa::Direction;
  TORCH_CHECK(code >= 0 && code <= 2, "salsa_fused cuda backend: direction must be 0 (gradient), 1 (momentum) "
              "or 2 (raw), got ", code);
  if (code == int64_t(Direction::momentum)) return fn(std::integral_constant<Direction, Direction::momentum>());
  if (code == int64_t(Direction::raw)) return fn(std::integral_constant<Direction, Direction::raw>());
  return fn(std::integral_constant<Direction, Direction::gradient>());
}

template <class Kernel>
void launch(Kernel kernel, const Table& table, const Args& args) {
  kernel<<<unsigned(table.n_chunks), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor slope(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq, double beta1, double beta2,
                 double bias_correction1, double bias_correction2, double eps, int64_t direction,
                 const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(!exp_avg_sq.empty(), "salsa_fused cuda backend: empty bucket");
  c10::cuda::CUDAGuard guard(exp_avg_sq[0].device());
  const Table table = make_table({}, grads, exp_avg, exp_avg_sq, {}, false);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(exp_avg_sq[0].device());
  at::Tensor q = at::empty({}, options);
  at::Tensor partials = at::empty({std::max<int64_t>(table.n_chunks, 1)}, options);
  Args args = make_args(table, make_scalars(beta1, beta2, bias_correction1, bias_correction2, eps, 1.0, 0.0, 0.0));
  const std::optional<at::Tensor> scale32 = on_bucket_device(grad_scale, exp_avg_sq[0], "grad_scale");
  args.grad_scale = float_data(scale32);
  args.partials = partials.data_ptr<float>();
  if (table.n_chunks > 0) {
    dispatch_types(table, [&](auto, auto g) {
      using G = decltype(g);
      dispatch_direction(direction, [&](auto d) { launch(slope_kernel<G, decltype(d)::value>, table, args); });
    });
  }
  slope_finish_kernel<<<1, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(args.partials, table.n_chunks,
                                                                              q.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

void first_trial(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                 at::TensorList saved, double beta1, double beta2, double bias_correction1, double bias_correction2,
                 double eps, double decay_factor, double step_size, int64_t direction,
                 const std::optional<at::Tensor>& grad_scale) {
  if (exp_avg_sq.empty()) return;
  c10::cuda::CUDAGuard guard(exp_avg_sq[0].device());
  const Table table = make_table(weights, grads, exp_avg, exp_avg_sq, saved);
  if (table.n_chunks == 0) return;
  Args args = make_args(table, make_scalars(beta1, beta2, bias_correction1, bias_correction2, eps, decay_factor,
                                            step_size, 0.0));
  const std::optional<at::Tensor> scale32 = on_bucket_device(grad_scale, exp_avg_sq[0], "grad_scale");
  args.grad_scale = float_data(scale32);
  dispatch_types(table, [&](auto w, auto g) {
    using W = decltype(w);
    using G = decltype(g);
    dispatch_direction(direction, [&](auto d) { launch(first_trial_kernel<W, G, decltype(d)::value>, table, args); });
  });
}

void retrial(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
             at::TensorList saved, double bias_correction1, double bias_correction2, double eps, double decay_factor,
             double step_size, double previous_step_size, int64_t direction,
             const std::optional<at::Tensor>& grad_scale) {
  if (exp_avg_sq.empty()) return;
  c10::cuda::CUDAGuard guard(exp_avg_sq[0].device());
  const Table table = make_table(weights, grads, exp_avg, exp_avg_sq, saved);
  if (table.n_chunks == 0) return;
  Args args = make_args(table, make_scalars(0.0, 0.0, bias_correction1, bias_correction2, eps, decay_factor,
                                            step_size, previous_step_size));
  const std::optional<at::Tensor> scale32 = on_bucket_device(grad_scale, exp_avg_sq[0], "grad_scale");
  args.grad_scale = float_data(scale32);
  dispatch_types(table, [&](auto w, auto g) {
    using W = decltype(w);
    using G = decltype(g);
    dispatch_direction(direction, [&](auto d) { launch(retrial_kernel<W, G, decltype(d)::value>, table, args); });
  });
}

void restore(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
             at::TensorList saved, double bias_correction1, double bias_correction2, double eps, double decay_factor,
             double previous_step_size, int64_t direction, const std::optional<at::Tensor>& grad_scale) {
  if (exp_avg_sq.empty()) return;
  c10::cuda::CUDAGuard guard(exp_avg_sq[0].device());
  const Table table = make_table(weights, grads, exp_avg, exp_avg_sq, saved);
  if (table.n_chunks == 0) return;
  Args args = make_args(table, make_scalars(0.0, 0.0, bias_correction1, bias_correction2, eps, decay_factor, 0.0,
                                            previous_step_size));
  const std::optional<at::Tensor> scale32 = on_bucket_device(grad_scale, exp_avg_sq[0], "grad_scale");
  args.grad_scale = float_data(scale32);
  dispatch_types(table, [&](auto w, auto g) {
    using W = decltype(w);
    using G = decltype(g);
    dispatch_direction(direction, [&](auto d) { launch(restore_kernel<W, G, decltype(d)::value>, table, args); });
  });
}

void plain_step(at::TensorList weights, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                double beta1, double beta2, double bias_correction1, double bias_correction2, double eps,
                double decay_factor, double step_size, int64_t direction, const at::Tensor& loss,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& nonfinite_count) {
  TORCH_CHECK(direction >= 0 && direction <= 2, "salsa_fused cuda backend: direction must be 0 (gradient), "
              "1 (momentum) or 2 (raw), got ", direction);
  if (exp_avg_sq.empty()) return;
  c10::cuda::CUDAGuard guard(exp_avg_sq[0].device());
  TORCH_CHECK(loss.numel() == 1, "salsa_fused cuda backend: plain_step needs a one-element loss tensor");
  if (nonfinite_count.has_value()) {
    TORCH_CHECK(nonfinite_count->scalar_type() == at::kLong && nonfinite_count->numel() == 1 &&
                    nonfinite_count->device() == exp_avg_sq[0].device(),
                "salsa_fused cuda backend: nonfinite_count must be a one-element int64 tensor on the bucket's device");
  }
  const Table table = make_table(weights, grads, exp_avg, exp_avg_sq, {});
  if (table.n_chunks == 0) return;
  // The guard reads the loss as fp32 on the device (a copy only when it is not fp32 there already).
  const at::Tensor loss32 = loss.to(exp_avg_sq[0].device(), at::kFloat);
  Args args = make_args(table, make_scalars(beta1, beta2, bias_correction1, bias_correction2, eps, decay_factor,
                                            step_size, 0.0));
  args.loss = loss32.data_ptr<float>();
  const std::optional<at::Tensor> found_inf32 = on_bucket_device(found_inf, exp_avg_sq[0], "found_inf");
  args.found_inf = float_data(found_inf32);
  const std::optional<at::Tensor> scale32 = on_bucket_device(grad_scale, exp_avg_sq[0], "grad_scale");
  args.grad_scale = float_data(scale32);
  args.nonfinite = nonfinite_count.has_value()
                       ? reinterpret_cast<unsigned long long*>(nonfinite_count->data_ptr<int64_t>()) : nullptr;
  dispatch_types(table, [&](auto w, auto g) {
    using W = decltype(w);
    using G = decltype(g);
    // Adam's update (m_hat * precond) unless the direction is raw.
    if (direction == int64_t(salsa::Direction::raw)) launch(plain_step_kernel<W, G, salsa::Direction::raw>, table, args);
    else launch(plain_step_kernel<W, G, salsa::Direction::momentum>, table, args);
  });
}

}  // namespace salsa_cuda

TORCH_LIBRARY_IMPL(salsa_fused, CUDA, m) {
  m.impl("slope", &salsa_cuda::slope);
  m.impl("first_trial_", &salsa_cuda::first_trial);
  m.impl("retrial_", &salsa_cuda::retrial);
  m.impl("restore_", &salsa_cuda::restore);
  m.impl("plain_step_", &salsa_cuda::plain_step);
}
