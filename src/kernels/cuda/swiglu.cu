// SwiGLU on a packed gate/up projection on the GPU (dense MLP and shared expert; CPU reference:
// kernels/cpu/swiglu.cpp): h = silu(gate) * up, each gu row [gate (I) | up (I)].
//
// One thread per (n, i) element of h (grid-stride, 64-bit indices); the backward writes both halves of dgu for its
// element, so no two threads touch the same gradient.
#include <algorithm>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;

// gu: (N, 2I); h: (N, I).
__global__ void swiglu_forward_kernel(bf16* h, const bf16* gu, int64_t N, int64_t I) {
  const int64_t total = N * I;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / I, i = t % I;
    const float g = to_f32(gu[n * 2 * I + i]), u = to_f32(gu[n * 2 * I + I + i]);
    h[t] = to_bf16(g / (1.0f + expf(-g)) * u);
  }
}

// dgate += dh up silu'(gate), silu'(g) = sg (1 + g (1 - sg)); dup += dh silu(gate).
__global__ void swiglu_backward_kernel(bf16* dgu, const bf16* dh, const bf16* gu, int64_t N, int64_t I) {
  const int64_t total = N * I;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / I, i = t % I;
    const int64_t ig = n * 2 * I + i, iu = ig + I;
    const float g = to_f32(gu[ig]), u = to_f32(gu[iu]), d = to_f32(dh[t]);
    const float sg = 1.0f / (1.0f + expf(-g));
    add_to(dgu + ig, d * u * sg * (1.0f + g * (1.0f - sg)));
    add_to(dgu + iu, d * g * sg);
  }
}

}  // namespace

void swiglu_forward(bf16* h, const bf16* gu, int64_t N, int64_t I, cudaStream_t stream) {
  const int64_t total = N * I;
  if (total <= 0) return;
  swiglu_forward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(h, gu, N, I);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void swiglu_backward(bf16* dgu, const bf16* dh, const bf16* gu, int64_t N, int64_t I, cudaStream_t stream) {
  const int64_t total = N * I;
  if (!dgu || total <= 0) return;
  swiglu_backward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(dgu, dh, gu, N, I);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
