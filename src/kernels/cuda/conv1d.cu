// Depthwise causal conv1d + SiLU on the GPU (HF causal_conv1d_fn(activation="silu", bias=None) on the DeltaNet
// q/k/v channels; CPU reference: kernels/cpu/conv1d.cpp):
//   y[b, s, c] = silu(pre[b, s, c]),  pre[b, s, c] = sum_{j < KC} w[c, j] x[b, s - (KC - 1) + j, c]  (zero left pad).
//
// The output y (and dy) is either the plain (B, S, C) or split at channels c1 <= c2 into three row-major blocks one
// after another, (B S, c1), (B S, c2 - c1), (B S, C - c2) (the DeltaNet's q, k, v as contiguous tensors; c1 = c2 = C
// is the plain layout): element (r, c) of N = B S rows is at OutLayout::index(r, c). A warp's consecutive channels
// stay consecutive addresses within a block.
// Forward and dx: one thread per (b, s, c) element, c fastest so a warp reads consecutive channels. Nothing is
// saved by the forward, so the backward recomputes pre (KC taps) wherever it needs dpre = dy silu'(pre); dx at
// position t gathers dpre from the KC outputs t feeds (t .. t + KC - 1), i.e. KC^2 reads of x per element, all
// cache-resident for the small KC of the model (4).
// dw (C, KC) is a column sum over the B * S tokens: block (32 channels, kColGroups token groups); thread (c, g) keeps
// KC partial sums over tokens g, g + kColGroups, ... in order, then the partials are added in a fixed order through
// shared memory. Deterministic, no atomics, no scratch.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int kColGroups = 32;  // token groups per channel in the dw kernel (block 32 x 32 = 1024 threads)
constexpr int kMaxTaps = 8;     // dw keeps KC partial sums in registers; the model uses KC = 4

// pre at token s of one sequence xb (S, C), channel c; wc: the KC taps of channel c. Summed in tap order as the CPU.
__device__ __forceinline__ float conv_pre(const bf16* xb, const float* wc, int64_t s, int64_t c, int64_t C,
                                          int64_t KC) {
  float pre = 0.0f;
  for (int64_t j = s >= KC - 1 ? 0 : KC - 1 - s; j < KC; ++j) pre += wc[j] * to_f32(xb[(s - (KC - 1) + j) * C + c]);
  return pre;
}

// Where element (row r, channel c) of an output split at c1 <= c2 lives (N rows of C channels).
struct OutLayout {
  int64_t N, C, c1, c2;
  __device__ __forceinline__ int64_t index(int64_t r, int64_t c) const {
    if (c < c1) return r * c1 + c;
    if (c < c2) return N * c1 + r * (c2 - c1) + (c - c1);
    return N * c2 + r * (C - c2) + (c - c2);
  }
};

// dL/dpre at token s of sequence b, channel c: dy silu'(pre), silu'(v) = sg (1 + v (1 - sg)).
__device__ __forceinline__ float conv_dpre(const bf16* dy, const bf16* x, const float* w, int64_t b, int64_t s,
                                           int64_t c, int64_t S, int64_t C, int64_t KC, const OutLayout& out) {
  const float pre = conv_pre(x + b * S * C, w + c * KC, s, c, C, KC);
  const float sg = 1.0f / (1.0f + expf(-pre));
  return to_f32(dy[out.index(b * S + s, c)]) * sg * (1.0f + pre * (1.0f - sg));
}

// x, y: (B, S, C); element i = (b * S + s) * C + c.
__global__ void conv1d_silu_forward_kernel(bf16* y, const bf16* x, const float* w, int64_t B, int64_t S, int64_t C,
                                           int64_t KC, const OutLayout out) {
  const int64_t total = B * S * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, bs = i / C, s = bs % S, b = bs / S;
    const float pre = conv_pre(x + b * S * C, w + c * KC, s, c, C, KC);
    y[out.index(bs, c)] = to_bf16(pre / (1.0f + expf(-pre)));
  }
}

// dx[b, t, c] += sum_j w[c, j] dpre[b, t + (KC - 1) - j, c] over the outputs t + (KC - 1) - j < S.
__global__ void conv1d_silu_backward_dx_kernel(bf16* dx, const bf16* dy, const bf16* x, const float* w, int64_t B,
                                               int64_t S, int64_t C, int64_t KC, const OutLayout out) {
  const int64_t total = B * S * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, bs = i / C, t = bs % S, b = bs / S;
    float acc = 0.0f;
    for (int64_t j = t + KC - S > 0 ? t + KC - S : 0; j < KC; ++j)
      acc += w[c * KC + j] * conv_dpre(dy, x, w, b, t + (KC - 1) - j, c, S, C, KC, out);
    add_to(dx + i, acc);
  }
}

// dw[c, j] += sum_{b, s} dpre[b, s, c] x[b, s - (KC - 1) + j, c]. Block (32, kColGroups) owns channels
// [32 blockIdx.x, 32 blockIdx.x + 32); thread (c, g) walks tokens r = b * S + s = g, g + kColGroups, ...
__global__ void __launch_bounds__(32 * kColGroups)
    conv1d_silu_backward_dw_kernel(float* dw, const bf16* dy, const bf16* x, const float* w, int64_t B, int64_t S,
                                   int64_t C, int64_t KC, const OutLayout out) {
  __shared__ float part[kColGroups][32];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float acc[kMaxTaps];
#pragma unroll
  for (int j = 0; j < kMaxTaps; ++j) acc[j] = 0.0f;
  if (c < C) {
    for (int64_t r = threadIdx.y; r < B * S; r += kColGroups) {
      const int64_t s = r % S, b = r / S;
      const float g = conv_dpre(dy, x, w, b, s, c, S, C, KC, out);
      const bf16* xb = x + b * S * C;
#pragma unroll
      for (int j = 0; j < kMaxTaps; ++j)
        if (j < KC && s - (KC - 1) + j >= 0) acc[j] += g * to_f32(xb[(s - (KC - 1) + j) * C + c]);
    }
  }
  // One tap at a time through shared memory; the loop bound is uniform, so every thread reaches the barriers.
#pragma unroll
  for (int j = 0; j < kMaxTaps; ++j) {
    if (j >= KC) break;
    part[threadIdx.y][threadIdx.x] = acc[j];
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      float sum = 0.0f;
      for (int g = 0; g < kColGroups; ++g) sum += part[g][threadIdx.x];
      dw[c * KC + j] += sum;
    }
    __syncthreads();
  }
}

}  // namespace

void conv1d_silu_forward(bf16* y, const bf16* x, const float* w, int64_t B, int64_t S, int64_t C, int64_t KC,
                         int64_t c1, int64_t c2, cudaStream_t stream) {
  const int64_t total = B * S * C;
  if (total <= 0) return;
  const OutLayout out{B * S, C, c1, c2};
  conv1d_silu_forward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(y, x, w, B, S, C, KC, out);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void conv1d_silu_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const float* w, int64_t B, int64_t S,
                          int64_t C, int64_t KC, int64_t c1, int64_t c2, cudaStream_t stream) {
  const int64_t total = B * S * C;
  if (total <= 0 || KC <= 0) return;
  const OutLayout out{B * S, C, c1, c2};
  if (dx) {
    conv1d_silu_backward_dx_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(dx, dy, x, w, B, S, C, KC, out);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  if (dw) {
    NEXTRON_CHECK(KC <= kMaxTaps, "conv1d_silu_backward: kernel size ", KC, " exceeds the supported ", kMaxTaps);
    conv1d_silu_backward_dw_kernel<<<unsigned(ceil_div(C, 32)), dim3(32, kColGroups), 0, stream>>>(dw, dy, x, w, B, S,
                                                                                                   C, KC, out);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace nextron::cuda
