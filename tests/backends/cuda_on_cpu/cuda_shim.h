// The CUDA constructs csrc/cuda/*.cuh use, emulated on the CPU so that g++ compiles and runs the kernels as
// written (tests/backends/test_cuda_kernels_on_cpu.py). A launch runs its blocks one after another on the
// calling thread; a block's THREADS threads are fibers (ucontext stacks) that the launch resumes in turn, each
// until its next __syncthreads or its return, so a __syncthreads is a switch back to the launch, not a meeting
// of OS threads (which on 2 busy cores cost a context switch per thread and barrier). A block whose threads do
// not all reach the same number of __syncthreads stops the run, as it would hang a GPU. The 128-bit global
// accesses abort on an address that is not aligned to their width, as the hardware would fault.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

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
inline ThreadIndex threadIdx, blockIdx;  // the running fiber's

namespace cuda_shim {

// A fiber's stack: 16 times what the kernels were measured to need (they ran with 4 KiB and failed with 2 KiB),
// above a page that no access may touch, so that an overflow faults instead of overwriting memory. ASan clears
// the shadow of the whole stack at each switch into it, so a larger one costs time.
constexpr size_t FIBER_STACK_BYTES = size_t(1) << 16;

// What a fiber did when it handed control back to the launch.
enum class Yield { barrier, returned };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // FIBER_STACK_BYTES, the guard page below it
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
#endif
};

inline ucontext_t launcher;
inline std::vector<Fiber> fibers;
inline unsigned running = 0;
inline Yield last_yield = Yield::returned;
inline const std::function<void()>* block_body = nullptr;
#if defined(__SANITIZE_ADDRESS__)
inline const void* launcher_stack_bottom = nullptr;
inline size_t launcher_stack_size = 0;
inline void* launcher_fake_stack = nullptr;
#endif

// From a fiber to the launch (ASan is told which stack runs next, so that it does not take the switch for
// an overflow).
inline void to_launcher(Yield why) {
  last_yield = why;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&fibers[running].fake_stack, launcher_stack_bottom, launcher_stack_size);
#endif
  swapcontext(&fibers[running].context, &launcher);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fibers[running].fake_stack, nullptr, nullptr);
#endif
}

// Each fiber runs the current block's body for its thread, then reports it returned; resumed for the next
// block, it runs the body again (the launch sets blockIdx and the body before it resumes the fiber).
inline void fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &launcher_stack_bottom, &launcher_stack_size);
#endif
  for (;;) {
    (*block_body)();
    to_launcher(Yield::returned);
  }
}

// From the launch to fiber t, until it reaches a __syncthreads or returns.
inline Yield resume(unsigned t) {
  running = t;
  threadIdx.x = t;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&launcher_fake_stack, fibers[t].stack, FIBER_STACK_BYTES);
#endif
  swapcontext(&launcher, &fibers[t].context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(launcher_fake_stack, nullptr, nullptr);
#endif
  return last_yield;
}

// `body` for each of `blocks` blocks of `threads` threads, one block after another.
inline void launch_blocks(unsigned threads, int64_t blocks, const std::function<void()>& body) {
  if (fibers.size() != threads) {  // made once (a kernel runs with THREADS threads) and kept until exit
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    fibers = std::vector<Fiber>(threads);
    for (Fiber& fiber : fibers) {
      void* memory = mmap(nullptr, page + FIBER_STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (memory == MAP_FAILED || mprotect(memory, page, PROT_NONE) != 0) {
        std::perror("a fiber's stack");
        std::abort();
      }
      fiber.stack = static_cast<char*>(memory) + page;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack;
      fiber.context.uc_stack.ss_size = FIBER_STACK_BYTES;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, fiber_main, 0);
    }
  }
  block_body = &body;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = unsigned(b);
    for (;;) {  // one round: every thread runs to its next __syncthreads, or returns
      unsigned at_barrier = 0;
      for (unsigned t = 0; t < threads; ++t) at_barrier += resume(t) == Yield::barrier;
      if (at_barrier == 0) break;
      if (at_barrier != threads) {
        std::fprintf(stderr, "block %lld: %u of %u threads wait at a __syncthreads the others never reach\n",
                     static_cast<long long>(b), at_barrier, threads);
        std::abort();
      }
    }
  }
  block_body = nullptr;
}

}  // namespace cuda_shim

inline void __syncthreads() { cuda_shim::to_launcher(cuda_shim::Yield::barrier); }

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
