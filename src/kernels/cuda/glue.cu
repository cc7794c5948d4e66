// Residual adds and column gathers / scatters (see glue.h). Memory-bound one-thread-per-element grid-stride loops:
// these move each element once and their cost is the bandwidth, so no tiling is needed.
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/glue.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;

template <typename T>
__global__ void add_kernel(T* y, const T* a, const T* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float s = to_f32(a[i]) + to_f32(b[i]);
    if constexpr (std::is_same_v<T, float>)
      y[i] = s;
    else
      y[i] = to_bf16(s);
  }
}

template <typename T>
__global__ void gather_cols_kernel(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Ws) {
  const int64_t total = N * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / W, j = i % W;
    dst[i] = src[n * Ws + idx[j]];
  }
}

template <typename T>
__global__ void scatter_cols_kernel(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Wd,
                                    bool accumulate) {
  const int64_t total = N * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / W, j = i % W;
    T* out = dst + n * Wd + idx[j];
    if (accumulate)
      add_to(out, to_f32(src[i]));
    else
      *out = src[i];
  }
}

}  // namespace

void add(bf16* y, const bf16* a, const bf16* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  add_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(y, a, b, n);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void add(float* y, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  add_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(y, a, b, n);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

template <typename T>
void gather_cols(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Ws, cudaStream_t stream) {
  if (N * W <= 0) return;
  gather_cols_kernel<<<grid_stride_blocks(N * W), kThreads, 0, stream>>>(dst, src, idx, N, W, Ws);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

template <typename T>
void scatter_cols(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Wd, bool accumulate,
                  cudaStream_t stream) {
  if (N * W <= 0) return;
  scatter_cols_kernel<<<grid_stride_blocks(N * W), kThreads, 0, stream>>>(dst, src, idx, N, W, Wd, accumulate);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

template void gather_cols<bf16>(bf16*, const bf16*, const int32_t*, int64_t, int64_t, int64_t, cudaStream_t);
template void gather_cols<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t, cudaStream_t);
template void scatter_cols<bf16>(bf16*, const bf16*, const int32_t*, int64_t, int64_t, int64_t, bool, cudaStream_t);
template void scatter_cols<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t, bool, cudaStream_t);

}  // namespace nextron::cuda
