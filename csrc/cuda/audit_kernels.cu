// Every kernel of salsa_kernels.cuh instantiated for the weight/gradient dtypes the binding
// launches, so that nvcc can compile and audit them without torch (benchmarks/cuda_audit.py).
#include "salsa_kernels.cuh"

namespace salsa_cuda {

#define SALSA_INSTANTIATE_DIRECTION(W, G, D)                                 \
  template __global__ void slope_kernel<G, D>(Args);                          \
  template __global__ void first_trial_kernel<W, G, D>(Args);                 \
  template __global__ void retrial_kernel<W, G, D>(Args);                     \
  template __global__ void restore_kernel<W, G, D>(Args);

#define SALSA_INSTANTIATE(W, G)                                              \
  SALSA_INSTANTIATE_DIRECTION(W, G, Direction::gradient)                     \
  SALSA_INSTANTIATE_DIRECTION(W, G, Direction::momentum)                     \
  SALSA_INSTANTIATE_DIRECTION(W, G, Direction::raw)                          \
  template __global__ void plain_step_kernel<W, G, Direction::momentum>(Args); \
  template __global__ void plain_step_kernel<W, G, Direction::raw>(Args);

SALSA_INSTANTIATE(float, float)
SALSA_INSTANTIATE(salsa::bf16_bits, salsa::bf16_bits)
SALSA_INSTANTIATE(salsa::fp16_bits, salsa::fp16_bits)

}  // namespace salsa_cuda
