// The multi-tensor chunking engine of the CUDA kernels (no torch: nvcc compiles it alone).
//
// One launch covers a whole bucket. The host writes one TensorRow per tensor into device
// memory (numel, the index of its first chunk, and the data pointer of each stream); block
// b finds its tensor by binary search over the rows' first chunks, and covers elements
// [j * CHUNK, min((j + 1) * CHUNK, numel)) of it, j = b - first_chunk. Each thread moves
// PACK consecutive elements per step; when all of a row's streams start on a 16-byte
// boundary (checked per block) a pack of a stream is one 128-bit access for 16-bit types
// and two for fp32 (explicit global .cg vector accesses: streamed data, cached in L2 only),
// else (and on a tensor's ragged end) elements go one by one.
#pragma once

#include <stdint.h>

#include "../salsa_math.h"

namespace salsa_cuda {

enum Stream { WEIGHT = 0, GRAD = 1, EXP_AVG = 2, EXP_AVG_SQ = 3, SAVED = 4, N_STREAMS = 5 };

struct TensorRow {
  int64_t numel;
  int64_t first_chunk;
  void* ptr[N_STREAMS];  // SAVED is null without a saved copy
};

constexpr int THREADS = 256;
constexpr int PACK = 8;                         // elements per thread and step
constexpr int STEPS = 4;                        // steps per thread and chunk
constexpr int64_t CHUNK = int64_t(THREADS) * PACK * STEPS;  // 8192 elements per block

// The row of this block's tensor and the block's element range within it.
struct Work {
  const TensorRow* row;
  int64_t begin, end;
  bool aligned;
};

__device__ __forceinline__ Work locate(const TensorRow* __restrict__ rows, int n_tensors) {
  const int64_t block = blockIdx.x;
  int lo = 0, hi = n_tensors - 1;  // last row with first_chunk <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (rows[mid].first_chunk <= block) lo = mid; else hi = mid - 1;
  }
  const TensorRow* row = rows + lo;
  Work w;
  w.row = row;
  w.begin = (block - row->first_chunk) * CHUNK;
  w.end = min(w.begin + CHUNK, row->numel);
  uintptr_t bits = 0;
  for (int s = 0; s < N_STREAMS; ++s) bits |= reinterpret_cast<uintptr_t>(row->ptr[s]);
  w.aligned = (bits & 15) == 0;
  return w;
}

// --- packs: PACK elements of one stream, as fp32 -------------------------------------
// VECTOR (a compile-time switch, so the two paths are compiled apart): the pack lies wholly
// inside the tensor and every stream is 16-byte aligned; else elements go one by one.

template <bool VECTOR, class T>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, int64_t i, float (&out)[PACK], int64_t end) {
  if constexpr (VECTOR) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldcg(reinterpret_cast<const float4*>(p + i));
      const float4 b = __ldcg(reinterpret_cast<const float4*>(p + i) + 1);
      out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
      out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
      const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p + i));
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[2 * k] = salsa::to_float(T{uint16_t(words[k] & 0xffffu)});
        out[2 * k + 1] = salsa::to_float(T{uint16_t(words[k] >> 16)});
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < PACK; ++k) out[k] = i + k < end ? salsa::to_float(p[i + k]) : 0.0f;
  }
}

template <bool VECTOR, class T>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t i, const float (&in)[PACK], int64_t end) {
  if constexpr (VECTOR) {
    if constexpr (sizeof(T) == 4) {
      __stcg(reinterpret_cast<float4*>(p + i), make_float4(in[0], in[1], in[2], in[3]));
      __stcg(reinterpret_cast<float4*>(p + i) + 1, make_float4(in[4], in[5], in[6], in[7]));
    } else {
      uint32_t words[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        words[k] = uint32_t(salsa::from_float<T>(in[2 * k]).bits) |
                   (uint32_t(salsa::from_float<T>(in[2 * k + 1]).bits) << 16);
      }
      __stcg(reinterpret_cast<uint4*>(p + i), make_uint4(words[0], words[1], words[2], words[3]));
    }
  } else {
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      if (i + k < end) p[i + k] = salsa::from_float<T>(in[k]);
    }
  }
}

// Copy PACK elements of one stream to another of the same type, bits unchanged.
template <bool VECTOR, class T>
__device__ __forceinline__ void copy_pack(T* __restrict__ dst, const T* __restrict__ src, int64_t i, int64_t end) {
  if constexpr (VECTOR) {
#pragma unroll
    for (int k = 0; k < int(sizeof(T) * PACK / 16); ++k) {
      __stcg(reinterpret_cast<uint4*>(dst + i) + k, __ldcg(reinterpret_cast<const uint4*>(src + i) + k));
    }
  } else {
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      if (i + k < end) dst[i + k] = src[i + k];
    }
  }
}

// Sum over the block in a fixed order (shuffle tree, then warps in order): deterministic.
template <class T>
__device__ __forceinline__ T block_sum(T value) {
  __shared__ T warp_sums[THREADS / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
  }
  return total;  // valid in thread 0
}

}  // namespace salsa_cuda
