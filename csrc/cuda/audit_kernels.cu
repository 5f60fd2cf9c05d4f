// Every kernel of salsa_kernels.cuh instantiated for the weight/gradient dtypes the binding
// launches, so that nvcc can compile and audit them without torch (benchmarks/cuda_audit.py).
#include "salsa_kernels.cuh"

namespace salsa_cuda {

#define SALSA_INSTANTIATE_MOVES_DIRECTION(W, G, D)                           \
  template __global__ void first_trial_kernel<W, G, D>(Args);                 \
  template __global__ void retrial_kernel<W, G, D>(Args);                     \
  template __global__ void restore_kernel<W, G, D>(Args);

// The kernels that write weights, for one (weight, gradient) pair.
#define SALSA_INSTANTIATE_MOVES(W, G)                                        \
  SALSA_INSTANTIATE_MOVES_DIRECTION(W, G, Direction::gradient)               \
  SALSA_INSTANTIATE_MOVES_DIRECTION(W, G, Direction::momentum)               \
  SALSA_INSTANTIATE_MOVES_DIRECTION(W, G, Direction::raw)                    \
  template __global__ void plain_step_kernel<W, G, Direction::momentum>(Args); \
  template __global__ void plain_step_kernel<W, G, Direction::raw>(Args);

// The slope reads gradients only: one per gradient dtype.
#define SALSA_INSTANTIATE_SLOPE(G)                                           \
  template __global__ void slope_kernel<G, Direction::gradient>(Args);        \
  template __global__ void slope_kernel<G, Direction::momentum>(Args);        \
  template __global__ void slope_kernel<G, Direction::raw>(Args);

SALSA_INSTANTIATE_SLOPE(float)
SALSA_INSTANTIATE_SLOPE(salsa::bf16_bits)
SALSA_INSTANTIATE_SLOPE(salsa::fp16_bits)
SALSA_INSTANTIATE_MOVES(float, float)
SALSA_INSTANTIATE_MOVES(salsa::bf16_bits, salsa::bf16_bits)
SALSA_INSTANTIATE_MOVES(salsa::fp16_bits, salsa::fp16_bits)
SALSA_INSTANTIATE_MOVES(salsa::bf16_bits, float)  // 16-bit weights with fp32 gradients (dispatch_types)
SALSA_INSTANTIATE_MOVES(salsa::fp16_bits, float)

}  // namespace salsa_cuda
