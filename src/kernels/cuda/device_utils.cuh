// Device-side helpers shared by the .cu kernels: bf16 <-> fp32, warp and block sums, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "core/cuda/check.h"
#include "kernels/cuda/common.h"

namespace nextron::cuda {

__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }
// x += delta with the sum formed in fp32 (the accumulate contract of common.h).
__device__ __forceinline__ void add_to(bf16* x, float delta) { *x = __float2bfloat16_rn(__bfloat162float(*x) + delta); }
__device__ __forceinline__ void add_to(float* x, float delta) { *x += delta; }

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// Threads per block of the elementwise grid-stride kernels, and their block count for n elements (capped: each
// thread loops over the rest).
inline constexpr int kElementwiseThreads = 256;
inline unsigned grid_stride_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kElementwiseThreads), 65536));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` must hold 32 floats; the function synchronises the block.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : -INFINITY;
  return warp_max(v);
}

}  // namespace nextron::cuda

// After a kernel launch: turn a launch error into a nextron::Error.
#define NEXTRON_CUDA_LAUNCH_CHECK() NEXTRON_CUDA_CHECK(cudaGetLastError())
