// The CPU passes over one span (a contiguous run of elements of one tensor).
//
// Deliberately without an include guard: salsa_cpu.cpp includes this file once per
// instruction set, each time inside its own namespace SALSA_CPU_ISA and under a target
// pragma, and picks one set at load time. The loops are plain element loops over raw
// pointers (restrict-qualified, branch-free bodies) that the compiler vectorizes at the
// set's width; the math is salsa_math.h's, shared with the CUDA kernels.
//
// Bytes per parameter with fp32 weights and gradients (reads + writes):
//   slope (q) 8 along the gradient, 12 along the momentum; plain step 28;
//   first trial 28 (+4 for the saved copy); retrial 16; restore 8 from the copy, 16 in place.
// With AVX2, the streams a pass only writes (the saved copy in pass A, the weights in pass B
// from the copy) are stored non-temporally, so no read for ownership adds 4 more.

namespace SALSA_CPU_ISA {

using salsa::Scalars;

template <class G, bool SCALE>
inline __attribute__((always_inline)) float load_grad(const G* __restrict grad, int64_t i, float grad_scale) {
  const float g = salsa::to_float(grad[i]);
  return SCALE ? salsa::div(g, grad_scale) : g;
}

// Lanes of the q sum: each lane adds every LANES-th term in order, so the sum of a span
// is a fixed function of its elements (any thread count gives the same bits).
constexpr int LANES = 16;

template <class G, bool MOMENTUM, bool SCALE>
double slope_loop(const G* __restrict grad, const float* __restrict exp_avg,
                  const float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  float lanes[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int l = 0; l < LANES; ++l) {
      const float g = load_grad<G, SCALE>(grad, i + l, grad_scale);
      lanes[l] += salsa::slope_term<MOMENTUM>(g, MOMENTUM ? exp_avg[i + l] : 0.0f, exp_avg_sq[i + l], s);
    }
  }
  double total = 0.0;
  for (int l = 0; l < LANES; ++l) total += lanes[l];
  for (; i < n; ++i) {
    const float g = load_grad<G, SCALE>(grad, i, grad_scale);
    total += salsa::slope_term<MOMENTUM>(g, MOMENTUM ? exp_avg[i] : 0.0f, exp_avg_sq[i], s);
  }
  return total;
}

#ifdef SALSA_CPU_STREAMING_STORES
// Pass A with a saved copy, fp32 weights and gradients, by hand in AVX2: the saved copy is only
// written, so it is stored non-temporally (32 bytes per parameter move instead of 36). The same
// operations as first_trial_loop below, element for element.
template <bool MOMENTUM, bool SCALE>
void first_trial_streaming(float* __restrict weight, const float* __restrict grad, float* __restrict exp_avg,
                           float* __restrict exp_avg_sq, float* __restrict saved, int64_t n, const Scalars s,
                           float grad_scale) {
  auto element = [&](int64_t i) {
    const float g = load_grad<float, SCALE>(grad, i, grad_scale);
    const salsa::Moments next = salsa::new_moments(g, exp_avg[i], exp_avg_sq[i], s);
    exp_avg[i] = next.exp_avg;
    exp_avg_sq[i] = next.exp_avg_sq;
    const float d = salsa::direction<MOMENTUM>(salsa::preconditioner(next.exp_avg_sq, s), g, next.exp_avg, s);
    saved[i] = weight[i];
    weight[i] = salsa::trial_weight(weight[i], d, s);
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(saved + i) & 31) != 0; ++i) element(i);
  const __m256 beta1 = _mm256_set1_ps(s.beta1), beta2 = _mm256_set1_ps(s.beta2);
  const __m256 one_minus_beta1 = _mm256_set1_ps(s.one_minus_beta1), one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 one = _mm256_set1_ps(1.0f), bc1 = _mm256_set1_ps(s.bias_correction1);
  const __m256 bc2 = _mm256_set1_ps(s.bias_correction2), eps = _mm256_set1_ps(s.eps);
  const __m256 decay = _mm256_set1_ps(s.decay_factor), neg_step = _mm256_set1_ps(s.neg_step);
  const __m256 scale = _mm256_set1_ps(grad_scale);
  for (; i + 8 <= n; i += 8) {
    __m256 g = _mm256_loadu_ps(grad + i);
    if (SCALE) g = _mm256_div_ps(g, scale);
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(exp_avg + i), beta1), _mm256_mul_ps(g, one_minus_beta1));
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(exp_avg_sq + i), beta2),
                                   _mm256_mul_ps(_mm256_mul_ps(g, g), one_minus_beta2));
    _mm256_storeu_ps(exp_avg + i, m);
    _mm256_storeu_ps(exp_avg_sq + i, v);
    const __m256 precond = _mm256_div_ps(one, _mm256_add_ps(_mm256_sqrt_ps(_mm256_div_ps(v, bc2)), eps));
    const __m256 d = MOMENTUM ? _mm256_mul_ps(precond, _mm256_div_ps(m, bc1)) : _mm256_mul_ps(precond, g);
    const __m256 w = _mm256_loadu_ps(weight + i);
    _mm256_stream_ps(saved + i, w);
    _mm256_storeu_ps(weight + i, _mm256_fmadd_ps(d, neg_step, _mm256_mul_ps(w, decay)));
  }
  _mm_sfence();
  for (; i < n; ++i) element(i);
}
#endif

template <class W, class G, bool MOMENTUM, bool SCALE>
void first_trial_loop(W* __restrict weight, const G* __restrict grad, float* __restrict exp_avg,
                      float* __restrict exp_avg_sq, W* __restrict saved, int64_t n, const Scalars s,
                      float grad_scale) {
#ifdef SALSA_CPU_STREAMING_STORES
  if constexpr (std::is_same_v<W, float> && std::is_same_v<G, float>) {
    if (saved != nullptr) {
      first_trial_streaming<MOMENTUM, SCALE>(weight, grad, exp_avg, exp_avg_sq, saved, n, s, grad_scale);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float g = load_grad<G, SCALE>(grad, i, grad_scale);
    const salsa::Moments next = salsa::new_moments(g, exp_avg[i], exp_avg_sq[i], s);
    exp_avg[i] = next.exp_avg;
    exp_avg_sq[i] = next.exp_avg_sq;
    const float d = salsa::direction<MOMENTUM>(salsa::preconditioner(next.exp_avg_sq, s), g, next.exp_avg, s);
    const W w = weight[i];
    if (saved != nullptr) saved[i] = w;
    weight[i] = salsa::from_float<W>(salsa::trial_weight(salsa::to_float(w), d, s));
  }
}

// d from the moments pass A wrote (reads v and g, or v and m).
template <class G, bool MOMENTUM, bool SCALE>
inline __attribute__((always_inline)) float stored_direction(const G* __restrict grad, const float* __restrict exp_avg,
                                                             const float* __restrict exp_avg_sq, int64_t i,
                                                             const Scalars& s, float grad_scale) {
  const float precond = salsa::preconditioner(exp_avg_sq[i], s);
  if (MOMENTUM) return salsa::direction<true>(precond, 0.0f, exp_avg[i], s);
  return salsa::direction<false>(precond, load_grad<G, SCALE>(grad, i, grad_scale), 0.0f, s);
}

#ifdef SALSA_CPU_STREAMING_STORES
// Pass B from the saved copy with fp32 weights and gradients, by hand in AVX2: the weights are
// only written here, so they are stored non-temporally (no read for ownership: 16 bytes per
// parameter move instead of 20). The same operations as the loop below, element for element.
template <bool MOMENTUM, bool SCALE>
void retrial_from_saved_streaming(float* __restrict weight, const float* __restrict grad,
                                  const float* __restrict exp_avg, const float* __restrict exp_avg_sq,
                                  const float* __restrict saved, int64_t n, const Scalars s, float grad_scale) {
  auto element = [&](int64_t i) {
    const float d = stored_direction<float, MOMENTUM, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
    weight[i] = salsa::trial_weight(saved[i], d, s);
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(weight + i) & 31) != 0; ++i) element(i);
  const __m256 one = _mm256_set1_ps(1.0f), bc1 = _mm256_set1_ps(s.bias_correction1);
  const __m256 bc2 = _mm256_set1_ps(s.bias_correction2), eps = _mm256_set1_ps(s.eps);
  const __m256 decay = _mm256_set1_ps(s.decay_factor), neg_step = _mm256_set1_ps(s.neg_step);
  const __m256 scale = _mm256_set1_ps(grad_scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 precond =
        _mm256_div_ps(one, _mm256_add_ps(_mm256_sqrt_ps(_mm256_div_ps(_mm256_loadu_ps(exp_avg_sq + i), bc2)), eps));
    __m256 d;
    if (MOMENTUM) {
      d = _mm256_mul_ps(precond, _mm256_div_ps(_mm256_loadu_ps(exp_avg + i), bc1));
    } else {
      __m256 g = _mm256_loadu_ps(grad + i);
      if (SCALE) g = _mm256_div_ps(g, scale);
      d = _mm256_mul_ps(precond, g);
    }
    _mm256_stream_ps(weight + i, _mm256_fmadd_ps(d, neg_step, _mm256_mul_ps(_mm256_loadu_ps(saved + i), decay)));
  }
  _mm_sfence();
  for (; i < n; ++i) element(i);
}
#endif

template <class W, class G, bool MOMENTUM, bool SCALE>
void retrial_loop(W* __restrict weight, const G* __restrict grad, const float* __restrict exp_avg,
                  const float* __restrict exp_avg_sq, const W* __restrict saved, int64_t n, const Scalars s,
                  float grad_scale) {
#ifdef SALSA_CPU_STREAMING_STORES
  if constexpr (std::is_same_v<W, float> && std::is_same_v<G, float>) {
    if (saved != nullptr) {
      retrial_from_saved_streaming<MOMENTUM, SCALE>(weight, grad, exp_avg, exp_avg_sq, saved, n, s, grad_scale);
      return;
    }
  }
#endif
  if (saved != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float d = stored_direction<G, MOMENTUM, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
      weight[i] = salsa::from_float<W>(salsa::trial_weight(salsa::to_float(saved[i]), d, s));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float d = stored_direction<G, MOMENTUM, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
      weight[i] = salsa::from_float<W>(salsa::retrial_in_place(salsa::to_float(weight[i]), d, s));
    }
  }
}

template <class W, class G, bool MOMENTUM, bool SCALE>
void restore_loop(W* __restrict weight, const G* __restrict grad, const float* __restrict exp_avg,
                  const float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = stored_direction<G, MOMENTUM, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
    weight[i] = salsa::from_float<W>(salsa::restore_in_place(salsa::to_float(weight[i]), d, s));
  }
}

// Returns the number of elements skipped for a non-finite gradient.
template <class W, class G, bool SCALE>
int64_t plain_loop(W* __restrict weight, const G* __restrict grad, float* __restrict exp_avg,
                   float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  int32_t skipped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float g = load_grad<G, SCALE>(grad, i, grad_scale);
    float w = salsa::to_float(weight[i]);
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    skipped += salsa::plain_update(g, w, m, v, s) ? 0 : 1;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    weight[i] = salsa::from_float<W>(w);
  }
  return skipped;
}

// --- dispatch on the span's dtypes and switches -------------------------------------

template <class W, class G>
struct Typed {
  static double slope(const Span& a, const Kinds& k, const Scalars& s) {
    const G* g = static_cast<const G*>(a.grad);
    if (k.momentum) {
      return k.has_scale ? slope_loop<G, true, true>(g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale)
                         : slope_loop<G, true, false>(g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale);
    }
    return k.has_scale ? slope_loop<G, false, true>(g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale)
                       : slope_loop<G, false, false>(g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale);
  }

  static void first_trial(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    const G* g = static_cast<const G*>(a.grad);
    W* saved = static_cast<W*>(a.saved);
    if (k.momentum) {
      if (k.has_scale) first_trial_loop<W, G, true, true>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s, k.grad_scale);
      else first_trial_loop<W, G, true, false>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s, k.grad_scale);
    } else {
      if (k.has_scale) first_trial_loop<W, G, false, true>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s, k.grad_scale);
      else first_trial_loop<W, G, false, false>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s, k.grad_scale);
    }
  }

  static void retrial(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    const G* g = static_cast<const G*>(a.grad);
    const W* saved = static_cast<const W*>(a.saved);
    if (k.momentum) retrial_loop<W, G, true, false>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s, k.grad_scale);
    else if (k.has_scale) retrial_loop<W, G, false, true>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s, k.grad_scale);
    else retrial_loop<W, G, false, false>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s, k.grad_scale);
  }

  static void restore(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    if (a.saved != nullptr) {
      memcpy(w, a.saved, sizeof(W) * a.n);
      return;
    }
    const G* g = static_cast<const G*>(a.grad);
    if (k.momentum) restore_loop<W, G, true, false>(w, g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale);
    else if (k.has_scale) restore_loop<W, G, false, true>(w, g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale);
    else restore_loop<W, G, false, false>(w, g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale);
  }

  static int64_t plain(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    const G* g = static_cast<const G*>(a.grad);
    return k.has_scale ? plain_loop<W, G, true>(w, g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale)
                       : plain_loop<W, G, false>(w, g, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale);
  }
};

// Weights fp32, bf16 or fp16; gradients in the weights' dtype or fp32.
template <class Fn>
auto dispatch(const Kinds& k, Fn&& fn) {
  if (k.weight == Dtype::f32) return fn(Typed<float, float>());
  if (k.weight == Dtype::bf16) {
    return k.grad == Dtype::f32 ? fn(Typed<salsa::bf16_bits, float>()) : fn(Typed<salsa::bf16_bits, salsa::bf16_bits>());
  }
  return k.grad == Dtype::f32 ? fn(Typed<salsa::fp16_bits, float>()) : fn(Typed<salsa::fp16_bits, salsa::fp16_bits>());
}

double slope_span(const Span& a, const Kinds& k, const Scalars& s) {
  return dispatch(k, [&](auto t) { return decltype(t)::slope(a, k, s); });
}
void first_trial_span(const Span& a, const Kinds& k, const Scalars& s) {
  dispatch(k, [&](auto t) { decltype(t)::first_trial(a, k, s); });
}
void retrial_span(const Span& a, const Kinds& k, const Scalars& s) {
  dispatch(k, [&](auto t) { decltype(t)::retrial(a, k, s); });
}
void restore_span(const Span& a, const Kinds& k, const Scalars& s) {
  dispatch(k, [&](auto t) { decltype(t)::restore(a, k, s); });
}
int64_t plain_span(const Span& a, const Kinds& k, const Scalars& s) {
  return dispatch(k, [&](auto t) { return decltype(t)::plain(a, k, s); });
}

}  // namespace SALSA_CPU_ISA
