// dtype casts on the GPU: fp32 -> bf16 (round to nearest even, as torch and core/dtype.h's f32_to_bf16; NaN stays
// NaN) for the bf16 weight shadow of the fp32 master buffer, and bf16 -> fp32 (exact). One thread per element,
// grid-stride loop with 64-bit indices.
#include <algorithm>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;

__global__ void cast_f32_to_bf16_kernel(bf16* out, const float* in, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = to_bf16(in[i]);
}

__global__ void cast_bf16_to_f32_kernel(float* out, const bf16* in, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = to_f32(in[i]);
}

}  // namespace

void cast_f32_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  cast_f32_to_bf16_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(out, in, n);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void cast_bf16_to_f32(float* out, const bf16* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  cast_bf16_to_f32_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(out, in, n);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
