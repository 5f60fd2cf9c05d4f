// The CUDA kernels of every pass, on the chunking engine (multi_tensor.cuh) and the shared
// math (salsa_math.h). No torch: nvcc compiles this header alone (benchmarks/cuda_audit.py),
// and the thin binding salsa_cuda.cu launches it where CUDA torch exists.
//
// W: weight (and saved copy) type, G: gradient type (float, salsa::bf16_bits, salsa::fp16_bits);
// moments fp32; D: the direction (salsa::Direction). Bytes per parameter with fp32 streams
// (reads + writes): slope 8 along the gradient (12 along the momentum), plain step 28, first
// trial 32 with a saved copy (28 without), retrial 16, restore 8 from the copy (16 in place).
// Along raw (d = g; m, v neither read nor written): slope 4, plain step 12, first trial 16
// (12 without a copy), retrial 12, restore 8 (12 in place).
#pragma once

#include "multi_tensor.cuh"

namespace salsa_cuda {

using salsa::Direction;
using salsa::Scalars;

// Device-side inputs of a launch; optional pointers are null when absent.
struct Args {
  const TensorRow* rows;
  int n_tensors;
  const float* grad_scale;          // g = grad / *grad_scale
  const float* loss;                // plain step: nothing happens unless finite
  const float* found_inf;           // plain step: nothing happens unless 0
  unsigned long long* nonfinite;    // plain step: += elements skipped for a non-finite g
  float* partials;                  // slope: one sum per block
  Scalars s;
};

template <bool VECTOR, class G>
__device__ __forceinline__ void load_grads(const Work& w, const Args& a, int64_t i, float (&g)[PACK]) {
  load_pack<VECTOR>(static_cast<const G*>(w.row->ptr[GRAD]), i, g, w.end);
  if (a.grad_scale != nullptr) {
    const float scale = *a.grad_scale;
#pragma unroll
    for (int k = 0; k < PACK; ++k) g[k] = salsa::div(g[k], scale);
  }
}

template <bool V> struct Path { static constexpr bool VECTOR = V; };

// Visit this thread's packs of the block: fn(first element, Path<vector?>{}); full packs of
// an aligned row take the vector path, the rest (a ragged end, a misaligned view) the other.
template <class Fn>
__device__ __forceinline__ void for_each_pack(const Work& w, Fn&& fn) {
#pragma unroll 1
  for (int64_t i = w.begin + int64_t(threadIdx.x) * PACK; i < w.end; i += int64_t(THREADS) * PACK) {
    if (w.aligned && i + PACK <= w.end) fn(i, Path<true>{});
    else fn(i, Path<false>{});
  }
}

// q partial sums: partials[block] = sum over the block of g * d (this step's moments, not written).
template <class G, Direction D>
__global__ void __launch_bounds__(THREADS) slope_kernel(Args a) {
  const Work w = locate(a.rows, a.n_tensors);
  float sum = 0.0f;
  for_each_pack(w, [&](int64_t i, auto path) {
    constexpr bool V = decltype(path)::VECTOR;
    float g[PACK], m[PACK], v[PACK];
    load_grads<V, G>(w, a, i, g);
    if (D == Direction::momentum) load_pack<V>(static_cast<const float*>(w.row->ptr[EXP_AVG]), i, m, w.end);
    if (D != Direction::raw) load_pack<V>(static_cast<const float*>(w.row->ptr[EXP_AVG_SQ]), i, v, w.end);
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      const float term = salsa::slope_term<D>(g[k], D == Direction::momentum ? m[k] : 0.0f,
                                              D == Direction::raw ? 0.0f : v[k], a.s);
      sum = salsa::add(sum, i + k < w.end ? term : 0.0f);
    }
  });
  const float total = block_sum(sum);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
}

// q = sum of the partials (one block, double accumulation): each thread sums partials i, i + THREADS, ..., then
// block_sum adds the threads' sums in its fixed tree order; rounded to fp32. Deterministic, not index order.
__global__ void __launch_bounds__(THREADS) slope_finish_kernel(const float* __restrict__ partials, int64_t n,
                                                               float* __restrict__ q) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += THREADS) sum += double(partials[i]);
  const double total = block_sum(sum);
  if (threadIdx.x == 0) *q = float(total);
}

// Pass A of a search step: m, v (not along raw), the saved copy, w = w_dec - step * d.
template <class W, class G, Direction D>
__global__ void __launch_bounds__(THREADS) first_trial_kernel(Args a) {
  const Work w = locate(a.rows, a.n_tensors);
  W* weight = static_cast<W*>(w.row->ptr[WEIGHT]);
  W* saved = static_cast<W*>(w.row->ptr[SAVED]);
  float* exp_avg = static_cast<float*>(w.row->ptr[EXP_AVG]);
  float* exp_avg_sq = static_cast<float*>(w.row->ptr[EXP_AVG_SQ]);
  for_each_pack(w, [&](int64_t i, auto path) {
    constexpr bool V = decltype(path)::VECTOR;
    float g[PACK], x[PACK];
    load_grads<V, G>(w, a, i, g);
    if constexpr (D == Direction::raw) {
      load_pack<V>(weight, i, x, w.end);
      // w0, exact back in W for every finite value, +-0, inf and subnormal; a 16-bit NaN weight comes back as the
      // canonical quiet NaN (salsa::from_float), its payload dropped: a bit copy would read the weight twice.
      if (saved != nullptr) store_pack<V>(saved, i, x, w.end);
#pragma unroll
      for (int k = 0; k < PACK; ++k) x[k] = salsa::trial_weight(x[k], g[k], a.s);
    } else {
      float m[PACK], v[PACK];
      load_pack<V>(exp_avg, i, m, w.end);
      load_pack<V>(exp_avg_sq, i, v, w.end);
      load_pack<V>(weight, i, x, w.end);
      if (saved != nullptr) store_pack<V>(saved, i, x, w.end);
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        const salsa::Moments next = salsa::new_moments(g[k], m[k], v[k], a.s);
        m[k] = next.exp_avg;
        v[k] = next.exp_avg_sq;
        const float d = salsa::direction<D>(salsa::preconditioner(v[k], a.s), g[k], m[k], a.s);
        x[k] = salsa::trial_weight(x[k], d, a.s);
      }
      store_pack<V>(exp_avg, i, m, w.end);
      store_pack<V>(exp_avg_sq, i, v, w.end);
    }
    store_pack<V>(weight, i, x, w.end);
  });
}

// d from the stored moments: reads v and g (gradient), v and m (momentum), or g alone (raw).
template <bool V, class G, Direction D>
__device__ __forceinline__ void stored_direction(const Work& w, const Args& a, int64_t i, float (&d)[PACK]) {
  if constexpr (D == Direction::raw) {
    load_grads<V, G>(w, a, i, d);
  } else {
    float v[PACK], x[PACK];
    load_pack<V>(static_cast<const float*>(w.row->ptr[EXP_AVG_SQ]), i, v, w.end);
    if (D == Direction::momentum) load_pack<V>(static_cast<const float*>(w.row->ptr[EXP_AVG]), i, x, w.end);
    else load_grads<V, G>(w, a, i, x);
#pragma unroll
    for (int k = 0; k < PACK; ++k) d[k] = salsa::direction<D>(salsa::preconditioner(v[k], a.s), x[k], x[k], a.s);
  }
}

// Pass B: w = decay(saved) - step * d, or in place w += (previous - step) * d.
template <class W, class G, Direction D>
__global__ void __launch_bounds__(THREADS) retrial_kernel(Args a) {
  const Work w = locate(a.rows, a.n_tensors);
  W* weight = static_cast<W*>(w.row->ptr[WEIGHT]);
  const W* saved = static_cast<const W*>(w.row->ptr[SAVED]);
  for_each_pack(w, [&](int64_t i, auto path) {
    constexpr bool V = decltype(path)::VECTOR;
    float d[PACK], x[PACK];
    stored_direction<V, G, D>(w, a, i, d);
    load_pack<V>(saved != nullptr ? saved : weight, i, x, w.end);
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      x[k] = saved != nullptr ? salsa::trial_weight(x[k], d[k], a.s) : salsa::retrial_in_place(x[k], d[k], a.s);
    }
    store_pack<V>(weight, i, x, w.end);
  });
}

// The weights from before the step: w = saved, or in place (w + previous * d) / decay_factor.
template <class W, class G, Direction D>
__global__ void __launch_bounds__(THREADS) restore_kernel(Args a) {
  const Work w = locate(a.rows, a.n_tensors);
  W* weight = static_cast<W*>(w.row->ptr[WEIGHT]);
  const W* saved = static_cast<const W*>(w.row->ptr[SAVED]);
  for_each_pack(w, [&](int64_t i, auto path) {
    constexpr bool V = decltype(path)::VECTOR;
    if (saved != nullptr) {
      copy_pack<V>(weight, saved, i, w.end);
      return;
    }
    float d[PACK], x[PACK];
    stored_direction<V, G, D>(w, a, i, d);
    load_pack<V>(weight, i, x, w.end);
#pragma unroll
    for (int k = 0; k < PACK; ++k) x[k] = salsa::restore_in_place(x[k], d[k], a.s);
    store_pack<V>(weight, i, x, w.end);
  });
}

// The plain step, guarded on the device: nothing is written unless the loss is finite and
// found_inf is 0; an element with a non-finite g keeps w, m, v and is counted. D: momentum
// (Adam's update, m and v written) or raw (w_dec - step * g, m and v neither read nor written).
template <class W, class G, Direction D>
__global__ void __launch_bounds__(THREADS) plain_step_kernel(Args a) {
  if (!salsa::is_finite(*a.loss) || (a.found_inf != nullptr && *a.found_inf != 0.0f)) return;
  const Work w = locate(a.rows, a.n_tensors);
  W* weight = static_cast<W*>(w.row->ptr[WEIGHT]);
  float* exp_avg = static_cast<float*>(w.row->ptr[EXP_AVG]);
  float* exp_avg_sq = static_cast<float*>(w.row->ptr[EXP_AVG_SQ]);
  unsigned long long skipped = 0;
  for_each_pack(w, [&](int64_t i, auto path) {
    constexpr bool V = decltype(path)::VECTOR;
    float g[PACK], x[PACK];
    load_grads<V, G>(w, a, i, g);
    if constexpr (D == Direction::raw) {
      load_pack<V>(weight, i, x, w.end);
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        const int32_t skips = salsa::raw_plain_update<W>(g[k], x[k], a.s);
        skipped += i + k < w.end ? skips : 0;
      }
    } else {
      float m[PACK], v[PACK];
      load_pack<V>(exp_avg, i, m, w.end);
      load_pack<V>(exp_avg_sq, i, v, w.end);
      load_pack<V>(weight, i, x, w.end);
#pragma unroll
      for (int k = 0; k < PACK; ++k) {
        const int32_t skips = salsa::plain_update<W>(g[k], x[k], m[k], v[k], a.s);
        skipped += i + k < w.end ? skips : 0;
      }
      store_pack<V>(exp_avg, i, m, w.end);
      store_pack<V>(exp_avg_sq, i, v, w.end);
    }
    store_pack<V>(weight, i, x, w.end);
  });
  if (a.nonfinite != nullptr) {
    const unsigned long long total = block_sum(skipped);
    if (threadIdx.x == 0 && total != 0) atomicAdd(a.nonfinite, total);
  }
}

}  // namespace salsa_cuda
