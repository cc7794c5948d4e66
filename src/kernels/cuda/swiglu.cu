// SwiGLU on a packed gate/up projection on the GPU (dense MLP and shared expert; CPU reference:
// kernels/cpu/swiglu.cpp): h = silu(gate) * up, each gu row [gate (I) | up (I)].
//
// Scalar path: one thread per (n, i) element of h (grid-stride, 64-bit indices). Vector path, taken when I is a
// multiple of 8, every pointer is 16-byte aligned and N I / 8 < 2^31: one thread per group of 8 consecutive
// elements of a row (grid-stride over the groups with 32-bit indices), each of gate, up, h, dh and both dgu halves
// moved as one 16-byte access. The per-element arithmetic is the same on both paths (bit-identical results). The
// backward writes both halves of dgu for its elements, so no two threads touch the same gradient. With accumulate
// false it overwrites dgu with 0 + the gradient (bit-identical to accumulating into zeros, the sign of a zero
// included) without reading it: the MoE experts' backward needs no zero fill of its (N K, 2I) buffer.
#include <algorithm>
#include <climits>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/vec_io.cuh"

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
__global__ void swiglu_backward_kernel(bf16* dgu, const bf16* dh, const bf16* gu, int64_t N, int64_t I,
                                       bool accumulate) {
  const int64_t total = N * I;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / I, i = t % I;
    const int64_t ig = n * 2 * I + i, iu = ig + I;
    const float g = to_f32(gu[ig]), u = to_f32(gu[iu]), d = to_f32(dh[t]);
    const float sg = 1.0f / (1.0f + expf(-g));
    if (accumulate) {
      add_to(dgu + ig, d * u * sg * (1.0f + g * (1.0f - sg)));
      add_to(dgu + iu, d * g * sg);
    } else {
      dgu[ig] = to_bf16(0.0f + d * u * sg * (1.0f + g * (1.0f - sg)));
      dgu[iu] = to_bf16(0.0f + d * g * sg);
    }
  }
}

constexpr int kVec = vec::kBf16;

// The vector path: G = I / 8 groups per row, total = N G < 2^31.
__global__ void swiglu_forward_vec_kernel(bf16* __restrict__ h, const bf16* __restrict__ gu, uint32_t total, uint32_t G,
                                          int64_t I) {
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const uint32_t n = t / G, i = (t - n * G) * kVec;
    const bf16* row = gu + int64_t(n) * 2 * I;
    float g[kVec], u[kVec], o[kVec];
    vec::load8(g, row + i);
    vec::load8(u, row + I + i);
#pragma unroll
    for (int e = 0; e < kVec; ++e) o[e] = g[e] / (1.0f + expf(-g[e])) * u[e];
    vec::store8(h + int64_t(t) * kVec, o);
  }
}

__global__ void swiglu_backward_vec_kernel(bf16* __restrict__ dgu, const bf16* __restrict__ dh,
                                           const bf16* __restrict__ gu, uint32_t total, uint32_t G, int64_t I,
                                           bool accumulate) {
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const uint32_t n = t / G, i = (t - n * G) * kVec;
    const int64_t ig = int64_t(n) * 2 * I + i, iu = ig + I;
    float g[kVec], u[kVec], d[kVec], dg[kVec], du[kVec];
    vec::load8(g, gu + ig);
    vec::load8(u, gu + iu);
    vec::load8(d, dh + int64_t(t) * kVec);
    if (accumulate) {
      vec::load8(dg, dgu + ig);
      vec::load8(du, dgu + iu);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) dg[e] = du[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float sg = 1.0f / (1.0f + expf(-g[e]));
      dg[e] = dg[e] + d[e] * u[e] * sg * (1.0f + g[e] * (1.0f - sg));
      du[e] = du[e] + d[e] * g[e] * sg;
    }
    vec::store8(dgu + ig, dg);
    vec::store8(dgu + iu, du);
  }
}

// Whether the vector path runs: I % 8 == 0, N I / 8 < 2^31 and the pointers 16-byte aligned.
bool use_vec(int64_t N, int64_t I, const void* a, const void* b, const void* c = nullptr) {
  return I % kVec == 0 && N * (I / kVec) <= INT32_MAX && vec::aligned16(a) && vec::aligned16(b) &&
         (c == nullptr || vec::aligned16(c));
}

}  // namespace

void swiglu_forward(bf16* h, const bf16* gu, int64_t N, int64_t I, cudaStream_t stream) {
  const int64_t total = N * I;
  if (total <= 0) return;
  if (use_vec(N, I, h, gu)) {
    const int64_t groups = total / kVec;
    swiglu_forward_vec_kernel<<<grid_stride_blocks(groups), kThreads, 0, stream>>>(h, gu, uint32_t(groups),
                                                                                   uint32_t(I / kVec), I);
    NEXTRON_CUDA_LAUNCH_CHECK();
    return;
  }
  swiglu_forward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(h, gu, N, I);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void swiglu_backward(bf16* dgu, const bf16* dh, const bf16* gu, int64_t N, int64_t I, cudaStream_t stream,
                     bool accumulate) {
  const int64_t total = N * I;
  if (!dgu || total <= 0) return;
  if (use_vec(N, I, dgu, dh, gu)) {
    const int64_t groups = total / kVec;
    swiglu_backward_vec_kernel<<<grid_stride_blocks(groups), kThreads, 0, stream>>>(dgu, dh, gu, uint32_t(groups),
                                                                                    uint32_t(I / kVec), I, accumulate);
    NEXTRON_CUDA_LAUNCH_CHECK();
    return;
  }
  swiglu_backward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(dgu, dh, gu, N, I, accumulate);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
