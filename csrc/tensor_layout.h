// Where a tensor puts its elements, against another's: one rule for the kernels' layout checks
// (cpu/salsa_cpu.cpp, cuda/salsa_cuda.cu) and the bucket cache's gradient signature
// (python_module.cpp). Its Python twin is salsa_fused/backends/base.py's same_memory_order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace salsa_layout {

// Equal sizes whose strides agree on every dimension longer than 1: every element at the same
// offset from the data pointer. A size-1 dimension is indexed at 0 only, so its stride addresses
// nothing, and autograd or view() may give it any value (the gradient of a channels_last
// Conv2d(C, C, 1) weight under a second loss term comes with strides (C, 1, 1, 1) for its (C, 1, C, C)).
inline bool same_element_offsets(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  if (a.strides() == b.strides()) return true;
  const auto sizes = a.sizes();
  const auto a_strides = a.strides();
  const auto b_strides = b.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && a_strides[d] != b_strides[d]) return false;
  }
  return true;
}

}  // namespace salsa_layout
