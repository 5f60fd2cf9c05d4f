// Runs the CUDA kernels of csrc/cuda/salsa_kernels.cuh on the CPU (cuda_shim.h) and checks every element they
// write, bit for bit, against the per-element formulas of csrc/salsa_math.h, which the CPU backend shares and
// which tests/backends/test_cpp_backend.py holds to the torch reference. So the kernels' chunking, packing,
// vector and scalar paths, tails, reductions and non-finite counts are checked without a GPU; the hardware's
// own arithmetic (its cvt and fma) is not.
//
// Usage: kernels_on_cpu [--perturb | --bounds | --overread | --divergent]. Prints "failures N" and exits 1 if N > 0.
// --perturb changes one expected bit, so that a run of the check itself must fail. Built with
// -fsanitize=address, the bytes around each tensor are poisoned while the kernels run, so a read past a
// tensor's end (or a write) stops the run with ASan's report; --bounds runs each dtype, direction and saved
// copy once for that build (no GradScaler, no injected non-finite values: those change what is computed, not
// where it is read); --overread reads one float past a tensor's end itself, which that build must stop;
// --divergent launches a block in which only thread 0 reaches a __syncthreads, which the shim must stop.
#include <array>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "cuda_shim.h"
#include "cuda/salsa_kernels.cuh"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define GUARD_POISON(begin, bytes) ASAN_POISON_MEMORY_REGION(begin, bytes)
#define GUARD_UNPOISON(begin, bytes) ASAN_UNPOISON_MEMORY_REGION(begin, bytes)
#else
#define GUARD_POISON(begin, bytes) ((void)(begin), (void)(bytes))
#define GUARD_UNPOISON(begin, bytes) ((void)(begin), (void)(bytes))
#endif

using namespace salsa_cuda;
using salsa::Direction;

static_assert(THREADS * 8 <= int(sizeof(shuffle_slots)), "the shim's shuffle slots hold one 8-byte value per thread");

namespace {

int failures = 0;
bool perturb = false;
bool bounds_only = false;  // --bounds: every dtype, direction and saved copy once (the ASan build's run)

template <class Kernel> void launch(Kernel kernel, int64_t blocks, const Args& args) {
  cuda_shim::launch_blocks(THREADS, blocks, [&] { kernel(args); });
}

template <class T> T from(float x) { return salsa::from_float<T>(x); }
template <class T> uint32_t bits(T x) {
  if constexpr (sizeof(T) == 4) return salsa::float_bits(x);
  else return x.bits;
}

// Each tensor in a buffer of its own, at an element offset from a 64-byte boundary (a row whose streams are all
// 16-byte aligned takes the vector path; one misaligned stream sends it to the scalar path), with guard bytes
// around it that no kernel may write, nor, under ASan, read (poisoned; ASan tracks 8-byte granules, so the bytes
// before a tensor that starts inside a granule stay readable, and those after its end are all poisoned).
constexpr char GUARD = char(0x5a);
struct Buffer {
  std::vector<char> memory;
  char* begin;  // the tensor's first byte
  size_t bytes;

  void poison() const {
    GUARD_POISON(memory.data(), size_t(begin - memory.data()));
    GUARD_POISON(begin + bytes, size_t(memory.data() + memory.size() - (begin + bytes)));
  }
  void unpoison() const { GUARD_UNPOISON(memory.data(), memory.size()); }
};

template <class T> T* allocate(std::vector<Buffer>& buffers, int64_t numel, int offset) {
  buffers.push_back(Buffer{std::vector<char>((numel + 64) * sizeof(T) + 128, GUARD), nullptr, size_t(numel) * sizeof(T)});
  Buffer& b = buffers.back();
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(b.memory.data()) + 63) & ~uintptr_t(63);
  T* p = reinterpret_cast<T*>(aligned) + offset;
  b.begin = reinterpret_cast<char*>(p);
  b.poison();
  return p;
}

bool guards_intact(const std::vector<Buffer>& buffers) {
  bool intact = true;
  for (const Buffer& b : buffers) {
    b.unpoison();
    for (const char* c = b.memory.data(); c != b.memory.data() + b.memory.size(); ++c) {
      if ((c < b.begin || c >= b.begin + b.bytes) && *c != GUARD) intact = false;
    }
    b.poison();
  }
  return intact;
}

// The expected state of one tensor, updated element by element with salsa_math.h.
template <class W, class G> struct Expected {
  std::vector<W> weight, saved;
  std::vector<G> grad;
  std::vector<float> exp_avg, exp_avg_sq;
};

salsa::Scalars scalars(double step_size, double previous_step_size) {
  return salsa::make_scalars(0.9, 0.999, 1 - std::pow(0.9, 4), 1 - std::pow(0.999, 4), 1e-8, 0.97, step_size,
                             previous_step_size);
}

// The element offsets of one row's streams: weight, gradient, exp_avg, exp_avg_sq, saved copy.
using Offsets = std::array<int, N_STREAMS>;

// The slope's q as slope_finish_kernel sums the blocks' partials: per thread in double over partials
// t, t + THREADS, ...; then block_sum's order (a shuffle tree within each warp, the warps in order).
float finished_q(const std::vector<float>& partials, int64_t n) {
  double lanes[THREADS] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i % THREADS] += double(partials[i]);
  double total = 0.0;
  for (int warp = 0; warp < THREADS / 32; ++warp) {
    double* v = lanes + warp * 32;
    for (int offset = 16; offset > 0; offset >>= 1) {
      for (int lane = 0; lane + offset < 32; ++lane) v[lane] += v[lane + offset];  // lane 0's chain reads these only
    }
    total += v[0];
  }
  return float(total);
}

// One bucket of tensors of the given sizes and offsets through every pass in order: slope (and its finish),
// first trial, retrial, restore, plain step, and the plain step again under a found_inf and a non-finite loss. With `inject`, some gradients are NaN or inf and some 16-bit weights sit near
// their overflow, and only the plain step's writes and count are checked (the search passes take no
// non-finite gradient: the optimizer refuses them before).
template <class W, class G, Direction D>
void run_case(const std::vector<int64_t>& sizes, const std::vector<Offsets>& offsets, bool with_saved, bool scaled,
              unsigned seed, bool inject) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal;
  std::vector<Buffer> buffers;
  const int n = int(sizes.size());
  std::vector<TensorRow> rows(n);
  std::vector<Expected<W, G>> expected(n);
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t numel = sizes[i];
    W* w = allocate<W>(buffers, numel, offsets[i][WEIGHT]);
    G* g = allocate<G>(buffers, numel, offsets[i][GRAD]);
    float* m = allocate<float>(buffers, numel, offsets[i][EXP_AVG]);
    float* v = allocate<float>(buffers, numel, offsets[i][EXP_AVG_SQ]);
    W* s = with_saved ? allocate<W>(buffers, numel, offsets[i][SAVED]) : nullptr;
    for (int64_t k = 0; k < numel; ++k) {
      const float gradient = normal(generator);
      w[k] = from<W>(normal(generator));
      g[k] = from<G>(scaled ? gradient * 1024.f : gradient);
      m[k] = 0.1f * gradient + 0.05f * normal(generator);
      v[k] = 0.002f * gradient * gradient + 1e-3f * std::fabs(normal(generator));
      if (s != nullptr) s[k] = from<W>(normal(generator));
      if (inject && k % 997 == 5) g[k] = from<G>(k % 2 ? NAN : INFINITY);
      if (inject && k % 1009 == 7) w[k] = from<W>(sizeof(W) == 2 ? 65000.f : 1.f);
    }
    expected[i] = Expected<W, G>{std::vector<W>(w, w + numel), s ? std::vector<W>(s, s + numel) : std::vector<W>(),
                                 std::vector<G>(g, g + numel), std::vector<float>(m, m + numel),
                                 std::vector<float>(v, v + numel)};
    rows[i] = TensorRow{numel, chunks, {w, g, m, v, s}};
    chunks += (numel + CHUNK - 1) / CHUNK;
  }
  float grad_scale = 1024.f, loss = 1.f, found_inf = 1.f;
  unsigned long long nonfinite = 0;
  std::vector<float> partials(std::max<int64_t>(chunks, 1));
  Args args{};
  args.rows = rows.data();
  args.n_tensors = n;
  args.grad_scale = scaled ? &grad_scale : nullptr;
  args.loss = &loss;
  args.nonfinite = &nonfinite;
  args.partials = partials.data();
  args.s = scalars(0.3, 0.0);

  auto gradient = [&](const Expected<W, G>& e, int64_t k) {
    const float g = salsa::to_float(e.grad[k]);
    return scaled ? salsa::div(g, grad_scale) : g;
  };
  auto fail = [&](const char* pass, const char* what, int tensor, int64_t k) {
    std::printf("FAIL %s: %s, W %zu bytes, G %zu bytes, direction %d, saved %d, scaled %d, tensor %d element %lld\n",
                pass, what, sizeof(W), sizeof(G), int(D), int(with_saved), int(scaled), tensor, (long long)k);
    failures++;
  };
  auto check = [&](const char* pass, bool saved_too) {
    if (!guards_intact(buffers)) return fail(pass, "a byte outside the tensors was written", -1, -1);
    for (int i = 0; i < n; ++i) {
      const TensorRow& r = rows[i];
      for (int64_t k = 0; k < r.numel; ++k) {
        bool same = bits(static_cast<W*>(r.ptr[WEIGHT])[k]) == bits(expected[i].weight[k]);
        if (D != Direction::raw) {
          same = same && salsa::float_bits(static_cast<float*>(r.ptr[EXP_AVG])[k]) == salsa::float_bits(expected[i].exp_avg[k]) &&
                 salsa::float_bits(static_cast<float*>(r.ptr[EXP_AVG_SQ])[k]) == salsa::float_bits(expected[i].exp_avg_sq[k]);
        }
        if (saved_too) same = same && bits(static_cast<W*>(r.ptr[SAVED])[k]) == bits(expected[i].saved[k]);
        if (!same) return fail(pass, "an element differs from salsa_math.h's", i, k);
      }
    }
  };

  if (!inject) {
    // slope: the blocks' partial sums (fp32 trees) within 1e-5 of a double sum of the terms; the finish kernel's
    // q bit for bit as its fixed order sums those partials
    launch(slope_kernel<G, D>, chunks, args);
    double blocks = 0, terms = 0;
    for (int64_t b = 0; b < chunks; ++b) blocks += partials[b];
    for (int i = 0; i < n; ++i) {
      for (int64_t k = 0; k < sizes[i]; ++k) {
        terms += salsa::slope_term<D>(gradient(expected[i], k), expected[i].exp_avg[k], expected[i].exp_avg_sq[k], args.s);
      }
    }
    if (std::fabs(float(blocks) - terms) > 1e-5 * std::fabs(terms) + 1e-30) fail("slope", "the partials' sum differs", -1, -1);
    float q = NAN;
    launch([&](const Args&) { slope_finish_kernel(partials.data(), chunks, &q); }, 1, args);
    if (salsa::float_bits(q) != salsa::float_bits(finished_q(partials, chunks))) fail("slope", "q differs", -1, -1);
  }

  launch(first_trial_kernel<W, G, D>, chunks, args);
  for (int i = 0; i < n; ++i) {
    for (int64_t k = 0; k < sizes[i]; ++k) {
      Expected<W, G>& e = expected[i];
      const float g = gradient(e, k);
      float d = g;
      if constexpr (D != Direction::raw) {
        const salsa::Moments next = salsa::new_moments(g, e.exp_avg[k], e.exp_avg_sq[k], args.s);
        e.exp_avg[k] = next.exp_avg;
        e.exp_avg_sq[k] = next.exp_avg_sq;
        d = salsa::direction<D>(salsa::preconditioner(e.exp_avg_sq[k], args.s), g, e.exp_avg[k], args.s);
      }
      if (with_saved) e.saved[k] = e.weight[k];
      e.weight[k] = from<W>(salsa::trial_weight(salsa::to_float(e.weight[k]), d, args.s));
    }
  }
  if (perturb) {
    for (auto& e : expected) {
      if (!e.weight.empty()) {
        e.weight[0] = from<W>(salsa::to_float(e.weight[0]) * 2.f + 1.f);
        break;
      }
    }
  }
  if (!inject) check("first trial", with_saved);
  if (perturb) return;

  args.s = scalars(0.2, 0.3);  // the retrial's step, after a first trial at 0.3
  auto stored_direction = [&](const Expected<W, G>& e, int64_t k) {
    if constexpr (D == Direction::raw) {
      return gradient(e, k);
    } else {
      const float p = salsa::preconditioner(e.exp_avg_sq[k], args.s);
      return D == Direction::momentum ? salsa::direction<D>(p, 0.f, e.exp_avg[k], args.s)
                                      : salsa::direction<D>(p, gradient(e, k), 0.f, args.s);
    }
  };
  launch(retrial_kernel<W, G, D>, chunks, args);
  for (int i = 0; i < n; ++i) {
    for (int64_t k = 0; k < sizes[i]; ++k) {
      Expected<W, G>& e = expected[i];
      const float d = stored_direction(e, k);
      e.weight[k] = from<W>(with_saved ? salsa::trial_weight(salsa::to_float(e.saved[k]), d, args.s)
                                       : salsa::retrial_in_place(salsa::to_float(e.weight[k]), d, args.s));
    }
  }
  if (!inject) check("retrial", with_saved);

  launch(restore_kernel<W, G, D>, chunks, args);
  for (int i = 0; i < n; ++i) {
    for (int64_t k = 0; k < sizes[i]; ++k) {
      Expected<W, G>& e = expected[i];
      e.weight[k] = with_saved ? e.saved[k]
                               : from<W>(salsa::restore_in_place(salsa::to_float(e.weight[k]), stored_direction(e, k), args.s));
    }
  }
  if (!inject) check("restore", with_saved);

  // The plain step, from the state the passes above left (with `inject`, not checked until here).
  constexpr Direction P = D == Direction::raw ? Direction::raw : Direction::momentum;
  args.s = scalars(inject ? 3000.0 : 0.3, 0.0);  // with inject, a step that overflows the 16-bit weights near 65000
  for (int i = 0; i < n; ++i) {
    for (int64_t k = 0; k < sizes[i]; ++k) {
      expected[i].weight[k] = static_cast<W*>(rows[i].ptr[WEIGHT])[k];
      expected[i].exp_avg[k] = static_cast<float*>(rows[i].ptr[EXP_AVG])[k];
      expected[i].exp_avg_sq[k] = static_cast<float*>(rows[i].ptr[EXP_AVG_SQ])[k];
    }
  }
  launch(plain_step_kernel<W, G, P>, chunks, args);
  unsigned long long skipped = 0;
  for (int i = 0; i < n; ++i) {
    for (int64_t k = 0; k < sizes[i]; ++k) {
      Expected<W, G>& e = expected[i];
      float w = salsa::to_float(e.weight[k]);
      if constexpr (P == Direction::raw) skipped += salsa::raw_plain_update<W>(gradient(e, k), w, args.s);
      else skipped += salsa::plain_update<W>(gradient(e, k), w, e.exp_avg[k], e.exp_avg_sq[k], args.s);
      e.weight[k] = from<W>(w);
    }
  }
  check("plain step", false);
  if (skipped != nonfinite) fail("plain step", "the count of skipped elements differs", -1, -1);
  if (inject) return;
  args.found_inf = &found_inf;  // a GradScaler's overflow: nothing moves
  launch(plain_step_kernel<W, G, P>, chunks, args);
  check("plain step under found_inf", false);
  args.found_inf = nullptr;
  loss = NAN;  // a non-finite loss: nothing moves
  launch(plain_step_kernel<W, G, P>, chunks, args);
  check("plain step at a non-finite loss", false);
  if (nonfinite != skipped) fail("plain step", "a step that did nothing counted elements", -1, -1);
}

template <class W, class G> void every_case(const std::vector<int64_t>& sizes, const std::vector<Offsets>& offsets, unsigned seed) {
  for (bool saved : {true, false}) {
    for (bool scaled : {false, true}) {
      for (bool inject : {false, true}) {
        if (bounds_only && (scaled || inject)) continue;
        run_case<W, G, Direction::gradient>(sizes, offsets, saved, scaled, seed, inject);
        run_case<W, G, Direction::momentum>(sizes, offsets, saved, scaled, seed, inject);
        run_case<W, G, Direction::raw>(sizes, offsets, saved, scaled, seed, inject);
        if (perturb) return;
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  perturb = argc > 1 && std::strcmp(argv[1], "--perturb") == 0;
  bounds_only = argc > 1 && std::strcmp(argv[1], "--bounds") == 0;
  if (argc > 1 && std::strcmp(argv[1], "--overread") == 0) {  // the poison itself: ASan must stop this read
    std::vector<Buffer> buffers;
    const volatile float* p = allocate<float>(buffers, 3, 1);
    std::printf("read past the end unnoticed: %g\n", double(p[3]));
    return 2;
  }
  if (argc > 1 && std::strcmp(argv[1], "--divergent") == 0) {
    cuda_shim::launch_blocks(THREADS, 1, [] {
      if (threadIdx.x == 0) __syncthreads();
    });
    std::printf("a __syncthreads of one thread unnoticed\n");
    return 2;
  }
  // Empty tensors (first, inside), tails of 1-7 elements, a chunk's edges (8192), several chunks, and offsets
  // that leave some rows unaligned (the scalar path) beside aligned ones (the vector path): the weight's, and in
  // the last four rows one other stream's alone (the gradient, exp_avg, exp_avg_sq, the saved copy).
  const std::vector<int64_t> sizes = {0, 1, 7, 8191, 8192, 8193, 20005, 0, 3, 16, 2 * 8192 + 9, 8200, 8200, 8200, 8200};
  const std::vector<Offsets> offsets = {
      {0, 0, 0, 0, 0}, {1, 0, 0, 0, 0}, {0, 0, 0, 0, 0}, {0, 0, 0, 0, 0}, {3, 0, 0, 0, 0}, {1, 0, 0, 0, 0},
      {0, 0, 0, 0, 0}, {2, 2, 0, 0, 0}, {0, 0, 0, 0, 0}, {5, 0, 0, 0, 0}, {8, 8, 0, 0, 0},
      {0, 1, 0, 0, 0}, {0, 0, 1, 0, 0}, {0, 0, 0, 2, 0}, {0, 0, 0, 0, 3}};
  every_case<float, float>(sizes, offsets, 1);
  if (!perturb) {
    every_case<salsa::bf16_bits, salsa::bf16_bits>(sizes, offsets, 2);
    every_case<salsa::fp16_bits, salsa::fp16_bits>(sizes, offsets, 3);
    every_case<salsa::bf16_bits, float>(sizes, offsets, 4);
    every_case<salsa::fp16_bits, float>(sizes, offsets, 5);
  }
  std::printf("128-bit accesses %lld, failures %d\n", vector_accesses.load(), failures);
  return failures != 0;
}
