// What the span kernels (span_kernels.h) take: one chunk of one tensor and the pass's kinds.
// Apart from salsa_cpu.cpp so that tests/backends/test_cpp_vectorization.py can compile the
// kernels without torch's headers.
#pragma once

#include <stdint.h>

#include "../salsa_math.h"

namespace salsa_cpu {

enum class Dtype : int { f32, bf16, f16 };

// One chunk of one tensor, pointers already offset to the chunk's first element.
struct Span {
  void* weight;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* saved;  // nullptr without a saved copy
  int64_t n;
};

// The pass's dtypes and switches (fixed over a bucket).
struct Kinds {
  Dtype weight, grad;
  salsa::Direction direction;
  bool has_scale;
  float grad_scale;
};

}  // namespace salsa_cpu
