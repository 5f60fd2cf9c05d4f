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
// Along raw (d = g, no moments): q 4, plain step 12, first trial 12 (+4), retrial 12,
//   restore 8 from the copy, 12 in place.
// With AVX2, the streams a pass only writes (the saved copy in pass A, the weights in pass B
// from the copy) are stored non-temporally, so no read for ownership adds 4 more.

namespace SALSA_CPU_ISA {

using salsa::Direction;
using salsa::Scalars;

template <class G, bool SCALE>
inline __attribute__((always_inline)) float load_grad(const G* __restrict grad, int64_t i, float grad_scale) {
  const float g = salsa::to_float(grad[i]);
  return SCALE ? salsa::div(g, grad_scale) : g;
}

// Lanes of the q sum: each lane adds every LANES-th term in order, so the sum of a span
// is a fixed function of its elements (any thread count gives the same bits).
constexpr int LANES = 16;

// One term of q at element i: reads m only along the momentum, v not along raw.
template <class G, Direction D, bool SCALE>
inline __attribute__((always_inline)) float slope_at(const G* __restrict grad, const float* __restrict exp_avg,
                                                     const float* __restrict exp_avg_sq, int64_t i, const Scalars& s,
                                                     float grad_scale) {
  const float g = load_grad<G, SCALE>(grad, i, grad_scale);
  return salsa::slope_term<D>(g, D == Direction::momentum ? exp_avg[i] : 0.0f,
                              D == Direction::raw ? 0.0f : exp_avg_sq[i], s);
}

// The q terms of elements [0, n), n a multiple of LANES, added into lanes: element i into lane i % LANES.
template <class G, Direction D, bool SCALE>
inline __attribute__((always_inline)) void add_slope_lanes(const G* __restrict grad, const float* __restrict exp_avg,
                                                           const float* __restrict exp_avg_sq, int64_t n,
                                                           const Scalars& s, float grad_scale,
                                                           float* __restrict lanes) {
  for (int64_t i = 0; i + LANES <= n; i += LANES) {
    for (int l = 0; l < LANES; ++l) {
      lanes[l] += slope_at<G, D, SCALE>(grad, exp_avg, exp_avg_sq, i + l, s, grad_scale);
    }
  }
}

// The span's q: the lanes over its whole multiples of LANES, summed in lane order, then the tail
// terms in order. grad, exp_avg, exp_avg_sq point at the span's first element; ``add_whole`` adds
// the terms of [0, whole) into the lanes (in registers with F16C, for fp16 gradients).
template <class G, Direction D, bool SCALE, class AddWhole>
inline __attribute__((always_inline)) double slope_in_order(const G* __restrict grad, const float* __restrict exp_avg,
                                                            const float* __restrict exp_avg_sq, int64_t n,
                                                            const Scalars& s, float grad_scale, AddWhole&& add_whole) {
  float lanes[LANES] = {};
  const int64_t whole = n - n % LANES;
  add_whole(whole, lanes);
  double total = 0.0;
  for (int l = 0; l < LANES; ++l) total += lanes[l];
  for (int64_t i = whole; i < n; ++i) total += slope_at<G, D, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
  return total;
}

template <class G, Direction D, bool SCALE>
double slope_loop(const G* __restrict grad, const float* __restrict exp_avg,
                  const float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  return slope_in_order<G, D, SCALE>(grad, exp_avg, exp_avg_sq, n, s, grad_scale, [&](int64_t whole, float* lanes) {
    add_slope_lanes<G, D, SCALE>(grad, exp_avg, exp_avg_sq, whole, s, grad_scale, lanes);
  });
}

// Pass A's direction at element i, m and v written (along raw: g, the moments untouched).
template <class G, Direction D, bool SCALE>
inline __attribute__((always_inline)) float first_trial_direction(const G* __restrict grad, float* __restrict exp_avg,
                                                                  float* __restrict exp_avg_sq, int64_t i,
                                                                  const Scalars& s, float grad_scale) {
  const float g = load_grad<G, SCALE>(grad, i, grad_scale);
  if constexpr (D == Direction::raw) {
    return g;
  } else {
    const salsa::Moments next = salsa::new_moments(g, exp_avg[i], exp_avg_sq[i], s);
    exp_avg[i] = next.exp_avg;
    exp_avg_sq[i] = next.exp_avg_sq;
    return salsa::direction<D>(salsa::preconditioner(next.exp_avg_sq, s), g, next.exp_avg, s);
  }
}

#if defined(SALSA_CPU_STREAMING_STORES) || defined(SALSA_CPU_F16C)
// Adam on 8 lanes by hand in AVX2, for the loops GCC does not write as wanted (a streaming store, F16C
// conversions in registers): the operations of salsa::new_moments, preconditioner, direction, slope_term,
// trial_weight, retrial_in_place and restore_in_place, element for element (the backend tests compare every
// pass with the reference bit for bit).
struct AdamLanes {
  __m256 beta1, beta2, one_minus_beta1, one_minus_beta2, one, bc1, bc2, eps, decay, neg_step, step_change,
      previous_step, scale;

  AdamLanes(const Scalars& s, float grad_scale)
      : beta1(_mm256_set1_ps(s.beta1)), beta2(_mm256_set1_ps(s.beta2)),
        one_minus_beta1(_mm256_set1_ps(s.one_minus_beta1)), one_minus_beta2(_mm256_set1_ps(s.one_minus_beta2)),
        one(_mm256_set1_ps(1.0f)), bc1(_mm256_set1_ps(s.bias_correction1)),
        bc2(_mm256_set1_ps(s.bias_correction2)), eps(_mm256_set1_ps(s.eps)), decay(_mm256_set1_ps(s.decay_factor)),
        neg_step(_mm256_set1_ps(s.neg_step)), step_change(_mm256_set1_ps(s.step_change)),
        previous_step(_mm256_set1_ps(s.previous_step)), scale(_mm256_set1_ps(grad_scale)) {}

  // v = beta2 v0 + (1 - beta2) g2 (g2 = g * g).
  inline __attribute__((always_inline)) __m256 second_moment(__m256 g2, __m256 v0) const {
    return _mm256_add_ps(_mm256_mul_ps(v0, beta2), _mm256_mul_ps(g2, one_minus_beta2));
  }

  // m = beta1 m0 + (1 - beta1) g, v = beta2 v0 + (1 - beta2) g2 (g2 = g * g); returns 1 / (sqrt(v / bc2) + eps).
  inline __attribute__((always_inline)) __m256 moments(__m256 g, __m256 g2, __m256 m0, __m256 v0, __m256& m,
                                                       __m256& v) const {
    m = _mm256_add_ps(_mm256_mul_ps(m0, beta1), _mm256_mul_ps(g, one_minus_beta1));
    v = second_moment(g2, v0);
    return preconditioner(v);
  }

  // 1 / (sqrt(v / bc2) + eps)
  inline __attribute__((always_inline)) __m256 preconditioner(__m256 v) const {
    return _mm256_div_ps(one, _mm256_add_ps(_mm256_sqrt_ps(_mm256_div_ps(v, bc2)), eps));
  }

  // precond * m / bc1: the step's direction along the momentum.
  inline __attribute__((always_inline)) __m256 momentum(__m256 precond, __m256 m) const {
    return _mm256_mul_ps(precond, _mm256_div_ps(m, bc1));
  }

  // w * decay - step * d, as one fused multiply-add.
  inline __attribute__((always_inline)) __m256 moved(__m256 w, __m256 d) const {
    return _mm256_fmadd_ps(d, neg_step, _mm256_mul_ps(w, decay));
  }

  // Pass A's direction from 8 gradients g (already divided by the scale), as first_trial_direction: m and v
  // at exp_avg, exp_avg_sq read and written (along raw d is g, the moments untouched).
  template <Direction D>
  inline __attribute__((always_inline)) __m256 first_trial_direction(__m256 g, float* __restrict exp_avg,
                                                                     float* __restrict exp_avg_sq) const {
    if constexpr (D == Direction::raw) {
      return g;
    } else {
      __m256 m, v;
      const __m256 precond = moments(g, _mm256_mul_ps(g, g), _mm256_loadu_ps(exp_avg), _mm256_loadu_ps(exp_avg_sq),
                                     m, v);
      _mm256_storeu_ps(exp_avg, m);
      _mm256_storeu_ps(exp_avg_sq, v);
      return D == Direction::momentum ? momentum(precond, m) : _mm256_mul_ps(precond, g);
    }
  }

  // d from the moments pass A wrote, as stored_direction; ``grad()`` gives the 8 gradients divided by the
  // scale, called only where d reads them (along the gradient and raw).
  template <Direction D, class Grad>
  inline __attribute__((always_inline)) __m256 stored_direction(Grad&& grad, const float* __restrict exp_avg,
                                                                const float* __restrict exp_avg_sq) const {
    if constexpr (D == Direction::raw) {
      return grad();
    } else if constexpr (D == Direction::momentum) {
      return momentum(preconditioner(_mm256_loadu_ps(exp_avg_sq)), _mm256_loadu_ps(exp_avg));
    } else {
      return _mm256_mul_ps(preconditioner(_mm256_loadu_ps(exp_avg_sq)), grad());
    }
  }

  // In place: w + (previous_step - step) * d, the product rounded first (retrial_in_place).
  inline __attribute__((always_inline)) __m256 retrial_in_place(__m256 w, __m256 d) const {
    return _mm256_add_ps(w, _mm256_mul_ps(d, step_change));
  }

  // In place: (w + previous_step * d) / decay_factor, one rounding for the move (restore_in_place).
  inline __attribute__((always_inline)) __m256 restore_in_place(__m256 w, __m256 d) const {
    return _mm256_div_ps(_mm256_fmadd_ps(d, previous_step, w), decay);
  }

  // q's terms of 8 gradients g (already divided by the scale), as salsa::slope_term: this step's moments from
  // those at exp_avg, exp_avg_sq, only read (m only along the momentum, neither along raw).
  template <Direction D>
  inline __attribute__((always_inline)) __m256 slope_term(__m256 g, const float* __restrict exp_avg,
                                                          const float* __restrict exp_avg_sq) const {
    const __m256 g2 = _mm256_mul_ps(g, g);
    if constexpr (D == Direction::raw) {
      return g2;
    } else if constexpr (D == Direction::momentum) {
      __m256 m, v;
      const __m256 precond = moments(g, g2, _mm256_loadu_ps(exp_avg), _mm256_loadu_ps(exp_avg_sq), m, v);
      // where g * g overflows, v_hat is inf and precond 0: the term is NaN, as (g * g) * precond is
      const __m256 finite = _mm256_cmp_ps(precond, _mm256_setzero_ps(), _CMP_GT_OQ);
      return _mm256_blendv_ps(_mm256_set1_ps(__builtin_nanf("")), _mm256_mul_ps(g, momentum(precond, m)), finite);
    } else {
      return _mm256_mul_ps(g2, preconditioner(second_moment(g2, _mm256_loadu_ps(exp_avg_sq))));
    }
  }
};

// 8 gradients as fp32 from fp32 or fp16 (converted by F16C), divided by the scale as load_grad does.
template <class G, bool SCALE>
inline __attribute__((always_inline)) __m256 load_grad8(const G* __restrict grad, int64_t i, __m256 grad_scale) {
  __m256 g;
  if constexpr (std::is_same_v<G, float>) {
    g = _mm256_loadu_ps(grad + i);
  } else {
    g = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(grad + i)));
  }
  return SCALE ? _mm256_div_ps(g, grad_scale) : g;
}
#endif

#ifdef SALSA_CPU_STREAMING_STORES
// Pass A with a saved copy, fp32 weights and gradients, by hand in AVX2: the saved copy is only
// written, so it is stored non-temporally (32 bytes per parameter move instead of 36). The same
// operations as first_trial_loop below, element for element.
template <Direction D, bool SCALE>
void first_trial_streaming(float* __restrict weight, const float* __restrict grad, float* __restrict exp_avg,
                           float* __restrict exp_avg_sq, float* __restrict saved, int64_t n, const Scalars s,
                           float grad_scale) {
  auto element = [&](int64_t i) {
    const float d = first_trial_direction<float, D, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
    saved[i] = weight[i];
    weight[i] = salsa::trial_weight(weight[i], d, s);
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(saved + i) & 31) != 0; ++i) element(i);
  const AdamLanes a(s, grad_scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 d = a.first_trial_direction<D>(load_grad8<float, SCALE>(grad, i, a.scale), exp_avg + i,
                                                exp_avg_sq + i);
    const __m256 w = _mm256_loadu_ps(weight + i);
    _mm256_stream_ps(saved + i, w);
    _mm256_storeu_ps(weight + i, a.moved(w, d));
  }
  _mm_sfence();
  for (; i < n; ++i) element(i);
}
#endif

// The element loop of pass A, with or without the saved copy as a compile-time switch (GCC left
// a run-time test inside the loop, unvectorized, for some dtypes).
template <class W, class G, Direction D, bool SCALE, bool SAVE>
void first_trial_elements(W* __restrict weight, const G* __restrict grad, float* __restrict exp_avg,
                          float* __restrict exp_avg_sq, W* __restrict saved, int64_t n, const Scalars& s,
                          float grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = first_trial_direction<G, D, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
    const W w = weight[i];
    if constexpr (SAVE) saved[i] = w;
    weight[i] = salsa::from_float<W>(salsa::trial_weight(salsa::to_float(w), d, s));
  }
}

template <class W, class G, Direction D, bool SCALE>
void first_trial_loop(W* __restrict weight, const G* __restrict grad, float* __restrict exp_avg,
                      float* __restrict exp_avg_sq, W* __restrict saved, int64_t n, const Scalars s,
                      float grad_scale) {
#ifdef SALSA_CPU_STREAMING_STORES
  if constexpr (std::is_same_v<W, float> && std::is_same_v<G, float>) {
    if (saved != nullptr) {
      first_trial_streaming<D, SCALE>(weight, grad, exp_avg, exp_avg_sq, saved, n, s, grad_scale);
      return;
    }
  }
#endif
  if (saved != nullptr) {
    first_trial_elements<W, G, D, SCALE, true>(weight, grad, exp_avg, exp_avg_sq, saved, n, s, grad_scale);
  } else {
    first_trial_elements<W, G, D, SCALE, false>(weight, grad, exp_avg, exp_avg_sq, saved, n, s, grad_scale);
  }
}

// d from the moments pass A wrote (reads v and g, or v and m; g alone along raw).
template <class G, Direction D, bool SCALE>
inline __attribute__((always_inline)) float stored_direction(const G* __restrict grad, const float* __restrict exp_avg,
                                                             const float* __restrict exp_avg_sq, int64_t i,
                                                             const Scalars& s, float grad_scale) {
  if constexpr (D == Direction::raw) {
    return load_grad<G, SCALE>(grad, i, grad_scale);
  } else {
    const float precond = salsa::preconditioner(exp_avg_sq[i], s);
    if (D == Direction::momentum) return salsa::direction<D>(precond, 0.0f, exp_avg[i], s);
    return salsa::direction<D>(precond, load_grad<G, SCALE>(grad, i, grad_scale), 0.0f, s);
  }
}

#ifdef SALSA_CPU_STREAMING_STORES
// Pass B from the saved copy with fp32 weights and gradients, by hand in AVX2: the weights are
// only written here, so they are stored non-temporally (no read for ownership: 16 bytes per
// parameter move instead of 20). The same operations as the loop below, element for element.
template <Direction D, bool SCALE>
void retrial_from_saved_streaming(float* __restrict weight, const float* __restrict grad,
                                  const float* __restrict exp_avg, const float* __restrict exp_avg_sq,
                                  const float* __restrict saved, int64_t n, const Scalars s, float grad_scale) {
  auto element = [&](int64_t i) {
    const float d = stored_direction<float, D, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
    weight[i] = salsa::trial_weight(saved[i], d, s);
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(weight + i) & 31) != 0; ++i) element(i);
  const AdamLanes a(s, grad_scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 d = a.stored_direction<D>([&] { return load_grad8<float, SCALE>(grad, i, a.scale); }, exp_avg + i,
                                           exp_avg_sq + i);
    _mm256_stream_ps(weight + i, a.moved(_mm256_loadu_ps(saved + i), d));
  }
  _mm_sfence();
  for (; i < n; ++i) element(i);
}
#endif

template <class W, class G, Direction D, bool SCALE>
void retrial_loop(W* __restrict weight, const G* __restrict grad, const float* __restrict exp_avg,
                  const float* __restrict exp_avg_sq, const W* __restrict saved, int64_t n, const Scalars s,
                  float grad_scale) {
#ifdef SALSA_CPU_STREAMING_STORES
  if constexpr (std::is_same_v<W, float> && std::is_same_v<G, float>) {
    if (saved != nullptr) {
      retrial_from_saved_streaming<D, SCALE>(weight, grad, exp_avg, exp_avg_sq, saved, n, s, grad_scale);
      return;
    }
  }
#endif
  if (saved != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float d = stored_direction<G, D, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
      weight[i] = salsa::from_float<W>(salsa::trial_weight(salsa::to_float(saved[i]), d, s));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float d = stored_direction<G, D, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
      weight[i] = salsa::from_float<W>(salsa::retrial_in_place(salsa::to_float(weight[i]), d, s));
    }
  }
}

template <class W, class G, Direction D, bool SCALE>
void restore_loop(W* __restrict weight, const G* __restrict grad, const float* __restrict exp_avg,
                  const float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = stored_direction<G, D, SCALE>(grad, exp_avg, exp_avg_sq, i, s, grad_scale);
    weight[i] = salsa::from_float<W>(salsa::restore_in_place(salsa::to_float(weight[i]), d, s));
  }
}

// Returns the number of elements skipped for a non-finite gradient. D: momentum (Adam's
// update, m and v written) or raw (w_dec - step * g, m and v untouched).
template <class W, class G, Direction D, bool SCALE>
int64_t plain_loop(W* __restrict weight, const G* __restrict grad, float* __restrict exp_avg,
                   float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  int32_t skipped = 0;
  if constexpr (D == Direction::raw) {
    for (int64_t i = 0; i < n; ++i) {
      float w = salsa::to_float(weight[i]);
      skipped += salsa::raw_plain_update<W>(load_grad<G, SCALE>(grad, i, grad_scale), w, s);
      weight[i] = salsa::from_float<W>(w);
    }
    return skipped;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float g = load_grad<G, SCALE>(grad, i, grad_scale);
    float w = salsa::to_float(weight[i]);
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    skipped += salsa::plain_update<W>(g, w, m, v, s);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    weight[i] = salsa::from_float<W>(w);
  }
  return skipped;
}

// --- dispatch on the span's dtypes and switches -------------------------------------

// Call fn(direction, scale) with both as compile-time constants (std::integral_constant).
template <class Fn>
auto with_switches(Direction direction, bool scale, Fn&& fn) {
  auto with_scale = [&](auto d) { return scale ? fn(d, std::true_type()) : fn(d, std::false_type()); };
  switch (direction) {
    case Direction::momentum: return with_scale(std::integral_constant<Direction, Direction::momentum>());
    case Direction::raw: return with_scale(std::integral_constant<Direction, Direction::raw>());
    default: return with_scale(std::integral_constant<Direction, Direction::gradient>());
  }
}

template <class W, class G>
struct Typed {
  static double slope(const Span& a, const Kinds& k, const Scalars& s) {
    const G* g = static_cast<const G*>(a.grad);
    return with_switches(k.direction, k.has_scale, [&](auto d, auto scale) {
      return slope_loop<G, decltype(d)::value, decltype(scale)::value>(g, a.exp_avg, a.exp_avg_sq, a.n, s,
                                                                      k.grad_scale);
    });
  }

  static void first_trial(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    const G* g = static_cast<const G*>(a.grad);
    W* saved = static_cast<W*>(a.saved);
    with_switches(k.direction, k.has_scale, [&](auto d, auto scale) {
      first_trial_loop<W, G, decltype(d)::value, decltype(scale)::value>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n,
                                                                         s, k.grad_scale);
    });
  }

  // Along the momentum d reads no gradient: the scale is not needed.
  static bool reads_scale(const Kinds& k) { return k.has_scale && k.direction != Direction::momentum; }

  static void retrial(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    const G* g = static_cast<const G*>(a.grad);
    const W* saved = static_cast<const W*>(a.saved);
    with_switches(k.direction, reads_scale(k), [&](auto d, auto scale) {
      retrial_loop<W, G, decltype(d)::value, decltype(scale)::value>(w, g, a.exp_avg, a.exp_avg_sq, saved, a.n, s,
                                                                     k.grad_scale);
    });
  }

  static void restore(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    if (a.saved != nullptr) {
      memcpy(w, a.saved, sizeof(W) * a.n);
      return;
    }
    const G* g = static_cast<const G*>(a.grad);
    with_switches(k.direction, reads_scale(k), [&](auto d, auto scale) {
      restore_loop<W, G, decltype(d)::value, decltype(scale)::value>(w, g, a.exp_avg, a.exp_avg_sq, a.n, s,
                                                                     k.grad_scale);
    });
  }

  // k.direction is momentum (Adam's update) or raw here.
  static int64_t plain(const Span& a, const Kinds& k, const Scalars& s) {
    W* w = static_cast<W*>(a.weight);
    const G* g = static_cast<const G*>(a.grad);
    auto step = [&](auto d, auto scale) {
      return plain_loop<W, G, decltype(d)::value, decltype(scale)::value>(w, g, a.exp_avg, a.exp_avg_sq, a.n, s,
                                                                          k.grad_scale);
    };
    if (k.direction == Direction::raw) {
      using Raw = std::integral_constant<Direction, Direction::raw>;
      return k.has_scale ? step(Raw(), std::true_type()) : step(Raw(), std::false_type());
    }
    using Adam = std::integral_constant<Direction, Direction::momentum>;
    return k.has_scale ? step(Adam(), std::true_type()) : step(Adam(), std::false_type());
  }
};

#ifdef SALSA_CPU_F16C
// fp16 spans with F16C: 8 elements converted an instruction, in registers, so each weight, gradient and
// moment is loaded and stored once. salsa_math.h's portable bit arithmetic takes about 20 vector operations
// each way (the fp16 passes ran at 2.3-2.6x fused AdamW); converted through fp32 blocks in passes of their
// own, the plain step sat at 1.23x-1.26x fused AdamW where fp32's sat at 0.9x, pass A at 1.31x at 2 threads.
// The same bits as the portable conversions: both read fp16 exactly and round to nearest even on the way
// back (no pass stores a NaN weight), and the plain step checks the fp16 range as before. Each pass's last
// n % 8 elements (n % 16 for the slope) go through the portable element loop.
using salsa::fp16_bits;

// The plain step on fp16 weights in one pass, 8 elements at a time: each weight, gradient and
// moment is loaded and stored once, converted in registers. Through fp32 blocks (three more passes
// over each block) the step took 0.93 ns an element on data in L1, fp32's 0.65; this 0.71. The same
// operations as plain_update / raw_plain_update with W = fp16, element for element; the last
// n % 8 elements go through plain_loop itself.
template <class G, Direction D, bool SCALE>
int64_t plain_halves(fp16_bits* __restrict weight, const G* __restrict grad, float* __restrict exp_avg,
                     float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  const AdamLanes a(s, grad_scale);
  const __m256 infinity = _mm256_set1_ps(__builtin_inff());
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fp16_overflow = _mm256_set1_ps(65520.0f);  // stays_finite<fp16_bits>
  __m256i skipped = _mm256_setzero_si256();  // per lane: minus the count of elements skipped
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = load_grad8<G, SCALE>(grad, i, a.scale);
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + i)));
    __m256 moved, finite;
    if constexpr (D == Direction::raw) {
      moved = a.moved(w, g);
      finite = _mm256_cmp_ps(_mm256_and_ps(g, magnitude), infinity, _CMP_LT_OQ);  // is_finite(g)
    } else {
      const __m256 m0 = _mm256_loadu_ps(exp_avg + i), v0 = _mm256_loadu_ps(exp_avg_sq + i);
      const __m256 g2 = _mm256_mul_ps(g, g);
      __m256 m, v;
      const __m256 precond = a.moments(g, g2, m0, v0, m, v);
      moved = a.moved(w, a.momentum(precond, m));
      finite = _mm256_cmp_ps(g2, infinity, _CMP_LT_OQ);  // is_finite(g * g): g * g is not negative
      _mm256_storeu_ps(exp_avg + i, _mm256_blendv_ps(m0, m, finite));
      _mm256_storeu_ps(exp_avg_sq + i, _mm256_blendv_ps(v0, v, finite));
    }
    const __m256 stays = _mm256_cmp_ps(_mm256_and_ps(moved, magnitude), fp16_overflow, _CMP_LT_OQ);
    const __m256 taken = _mm256_and_ps(finite, stays);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(weight + i),
                     _mm256_cvtps_ph(_mm256_blendv_ps(w, moved, taken), _MM_FROUND_TO_NEAREST_INT));
    skipped = _mm256_add_epi32(skipped, _mm256_castps_si256(taken));  // -1 per element taken
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), skipped);
  int64_t count = 0;
  for (int l = 0; l < 8; ++l) count += lanes[l];
  count += i;  // i elements, minus those taken
  if (i < n) {
    count += plain_loop<fp16_bits, G, D, SCALE>(weight + i, grad + i, exp_avg + i, exp_avg_sq + i, n - i, s,
                                                grad_scale);
  }
  return count;
}

// Pass A on fp16 weights in one pass, as plain_halves: 8 weights (and fp16 gradients) converted in
// registers, the saved copy written from the halves loaded. The same operations as first_trial_loop with
// W = fp16, element for element; the last n % 8 elements go through first_trial_loop itself.
template <class G, Direction D, bool SCALE>
void first_trial_halves(fp16_bits* __restrict weight, const G* __restrict grad, float* __restrict exp_avg,
                        float* __restrict exp_avg_sq, fp16_bits* __restrict saved, int64_t n, const Scalars s,
                        float grad_scale) {
  const AdamLanes a(s, grad_scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = a.first_trial_direction<D>(load_grad8<G, SCALE>(grad, i, a.scale), exp_avg + i,
                                                exp_avg_sq + i);
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + i));
    if (saved != nullptr) _mm_storeu_si128(reinterpret_cast<__m128i*>(saved + i), w);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(weight + i),
                     _mm256_cvtps_ph(a.moved(_mm256_cvtph_ps(w), d), _MM_FROUND_TO_NEAREST_INT));
  }
  if (i < n) {
    first_trial_loop<fp16_bits, G, D, SCALE>(weight + i, grad + i, exp_avg + i, exp_avg_sq + i,
                                             saved != nullptr ? saved + i : nullptr, n - i, s, grad_scale);
  }
}

// Pass B on fp16 weights in one pass, converted in registers as first_trial_halves: from the saved copy
// or in place. The same operations as retrial_loop with W = fp16, element for element; the last n % 8
// elements go through retrial_loop itself.
template <class G, Direction D, bool SCALE>
void retrial_halves(fp16_bits* __restrict weight, const G* __restrict grad, const float* __restrict exp_avg,
                    const float* __restrict exp_avg_sq, const fp16_bits* __restrict saved, int64_t n,
                    const Scalars s, float grad_scale) {
  const AdamLanes a(s, grad_scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = a.stored_direction<D>([&] { return load_grad8<G, SCALE>(grad, i, a.scale); }, exp_avg + i,
                                           exp_avg_sq + i);
    const __m256 w = _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(saved != nullptr ? saved + i : weight + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(weight + i),
                     _mm256_cvtps_ph(saved != nullptr ? a.moved(w, d) : a.retrial_in_place(w, d),
                                     _MM_FROUND_TO_NEAREST_INT));
  }
  if (i < n) {
    retrial_loop<fp16_bits, G, D, SCALE>(weight + i, grad + i, exp_avg + i, exp_avg_sq + i,
                                         saved != nullptr ? saved + i : nullptr, n - i, s, grad_scale);
  }
}

// The in-place restore on fp16 weights in one pass, as retrial_halves. The same operations as restore_loop
// with W = fp16, element for element; the last n % 8 elements go through restore_loop itself.
template <class G, Direction D, bool SCALE>
void restore_halves(fp16_bits* __restrict weight, const G* __restrict grad, const float* __restrict exp_avg,
                    const float* __restrict exp_avg_sq, int64_t n, const Scalars s, float grad_scale) {
  const AdamLanes a(s, grad_scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = a.stored_direction<D>([&] { return load_grad8<G, SCALE>(grad, i, a.scale); }, exp_avg + i,
                                           exp_avg_sq + i);
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(weight + i),
                     _mm256_cvtps_ph(a.restore_in_place(w, d), _MM_FROUND_TO_NEAREST_INT));
  }
  if (i < n) {
    restore_loop<fp16_bits, G, D, SCALE>(weight + i, grad + i, exp_avg + i, exp_avg_sq + i, n - i, s, grad_scale);
  }
}

// q's terms of fp16 gradients over [0, n), n a multiple of LANES, converted in registers, as add_slope_lanes:
// lanes 0-7 and 8-15 in one vector each, every term added to its lane in the same order.
template <Direction D, bool SCALE>
void add_slope_lanes_halves(const fp16_bits* __restrict grad, const float* __restrict exp_avg,
                            const float* __restrict exp_avg_sq, int64_t n, const Scalars& s, float grad_scale,
                            float* __restrict lanes) {
  static_assert(LANES == 16, "two vectors of 8 lanes");
  const AdamLanes a(s, grad_scale);
  __m256 low = _mm256_loadu_ps(lanes), high = _mm256_loadu_ps(lanes + 8);
  for (int64_t i = 0; i + LANES <= n; i += LANES) {
    low = _mm256_add_ps(low, a.slope_term<D>(load_grad8<fp16_bits, SCALE>(grad, i, a.scale), exp_avg + i,
                                             exp_avg_sq + i));
    high = _mm256_add_ps(high, a.slope_term<D>(load_grad8<fp16_bits, SCALE>(grad, i + 8, a.scale),
                                               exp_avg + i + 8, exp_avg_sq + i + 8));
  }
  _mm256_storeu_ps(lanes, low);
  _mm256_storeu_ps(lanes + 8, high);
}

// fp16 weights with fp16 (G = fp16_bits) or fp32 gradients: every pass converts in registers.
template <class G>
struct HalfWeights {
  static double slope(const Span& a, const Kinds& k, const Scalars& s) {
    if constexpr (std::is_same_v<G, float>) {
      return Typed<fp16_bits, float>::slope(a, k, s);  // reads no fp16
    } else {
      return with_switches(k.direction, k.has_scale, [&](auto d, auto scale) {
        constexpr Direction D = decltype(d)::value;
        constexpr bool SCALE = decltype(scale)::value;
        const fp16_bits* grad = static_cast<const fp16_bits*>(a.grad);
        return slope_in_order<fp16_bits, D, SCALE>(
            grad, a.exp_avg, a.exp_avg_sq, a.n, s, k.grad_scale, [&](int64_t whole, float* lanes) {
              add_slope_lanes_halves<D, SCALE>(grad, a.exp_avg, a.exp_avg_sq, whole, s, k.grad_scale, lanes);
            });
      });
    }
  }

  static void first_trial(const Span& a, const Kinds& k, const Scalars& s) {
    fp16_bits* weight = static_cast<fp16_bits*>(a.weight);
    fp16_bits* saved = static_cast<fp16_bits*>(a.saved);
    with_switches(k.direction, k.has_scale, [&](auto d, auto scale) {
      first_trial_halves<G, decltype(d)::value, decltype(scale)::value>(weight, static_cast<const G*>(a.grad),
                                                                         a.exp_avg, a.exp_avg_sq, saved, a.n, s,
                                                                         k.grad_scale);
    });
  }

  static void retrial(const Span& a, const Kinds& k, const Scalars& s) {
    fp16_bits* weight = static_cast<fp16_bits*>(a.weight);
    const fp16_bits* saved = static_cast<const fp16_bits*>(a.saved);
    with_switches(k.direction, Typed<fp16_bits, G>::reads_scale(k), [&](auto d, auto scale) {
      retrial_halves<G, decltype(d)::value, decltype(scale)::value>(weight, static_cast<const G*>(a.grad),
                                                                     a.exp_avg, a.exp_avg_sq, saved, a.n, s,
                                                                     k.grad_scale);
    });
  }

  static void restore(const Span& a, const Kinds& k, const Scalars& s) {
    if (a.saved != nullptr) {
      Typed<fp16_bits, G>::restore(a, k, s);  // a copy of the saved halves
      return;
    }
    fp16_bits* weight = static_cast<fp16_bits*>(a.weight);
    with_switches(k.direction, Typed<fp16_bits, G>::reads_scale(k), [&](auto d, auto scale) {
      restore_halves<G, decltype(d)::value, decltype(scale)::value>(weight, static_cast<const G*>(a.grad),
                                                                     a.exp_avg, a.exp_avg_sq, a.n, s,
                                                                     k.grad_scale);
    });
  }

  static int64_t plain(const Span& a, const Kinds& k, const Scalars& s) {
    fp16_bits* weight = static_cast<fp16_bits*>(a.weight);
    auto step = [&](auto d, auto scale) {
      return plain_halves<G, decltype(d)::value, decltype(scale)::value>(weight, static_cast<const G*>(a.grad),
                                                                          a.exp_avg, a.exp_avg_sq, a.n, s,
                                                                          k.grad_scale);
    };
    using Raw = std::integral_constant<Direction, Direction::raw>;
    using Adam = std::integral_constant<Direction, Direction::momentum>;
    if (k.direction == Direction::raw) {
      return k.has_scale ? step(Raw(), std::true_type()) : step(Raw(), std::false_type());
    }
    return k.has_scale ? step(Adam(), std::true_type()) : step(Adam(), std::false_type());
  }
};
#endif

// Weights fp32, bf16 or fp16; gradients in the weights' dtype or fp32.
template <class Fn>
auto dispatch(const Kinds& k, Fn&& fn) {
  if (k.weight == Dtype::f32) return fn(Typed<float, float>());
  if (k.weight == Dtype::bf16) {
    return k.grad == Dtype::f32 ? fn(Typed<salsa::bf16_bits, float>()) : fn(Typed<salsa::bf16_bits, salsa::bf16_bits>());
  }
#ifdef SALSA_CPU_F16C
  return k.grad == Dtype::f32 ? fn(HalfWeights<float>()) : fn(HalfWeights<salsa::fp16_bits>());
#else
  return k.grad == Dtype::f32 ? fn(Typed<salsa::fp16_bits, float>()) : fn(Typed<salsa::fp16_bits, salsa::fp16_bits>());
#endif
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
