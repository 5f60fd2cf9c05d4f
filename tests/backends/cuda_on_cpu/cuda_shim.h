// The CUDA constructs csrc/cuda/*.cuh use, emulated on the CPU so that g++ compiles and runs the kernels as
// written (tests/backends/test_cuda_kernels_on_cpu.py). A launch runs its blocks one after another, each as
// THREADS std::threads that meet at a std::barrier for __syncthreads. The 128-bit global accesses abort on an
// address that is not aligned to their width, as the hardware would fault.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __restrict__ __restrict
#define __shared__ static  // one block at a time: a static is the block's shared memory

struct ThreadIndex {
  unsigned x = 0;
};
inline thread_local ThreadIndex threadIdx, blockIdx;
inline std::barrier<>* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }

struct float4 {
  float x, y, z, w;
};
struct uint4 {
  uint32_t x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }

// 128-bit accesses made (the vector path was taken).
inline std::atomic<long long> vector_accesses{0};

template <class T> inline void check_aligned(const T* p, const char* what) {
  if ((reinterpret_cast<uintptr_t>(p) & (sizeof(T) - 1)) != 0) {
    std::fprintf(stderr, "misaligned 128-bit %s at %p\n", what, static_cast<const void*>(p));
    std::abort();
  }
}
template <class T> inline T __ldcg(const T* p) {
  check_aligned(p, "load");
  vector_accesses++;
  return *p;
}
template <class T> inline void __stcg(T* p, T value) {
  check_aligned(p, "store");
  vector_accesses++;
  *p = value;
}

// A warp shuffle through one slot per thread, between two barriers of the whole block (every thread of a
// block reaches each shuffle in these kernels, as their own __syncthreads requires).
inline char shuffle_slots[256 * 8];
template <class T> inline T __shfl_down_sync(unsigned, T value, int offset) {
  T* slots = reinterpret_cast<T*>(shuffle_slots);
  slots[threadIdx.x] = value;
  __syncthreads();
  const unsigned lane = threadIdx.x % 32;
  const T result = lane + offset < 32 ? slots[threadIdx.x + offset] : value;
  __syncthreads();
  return result;
}

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(value);
}

using std::min;
