// Partial rotary position embedding on the GPU, rotate-half convention (CPU reference: kernels/cpu/rope.cpp).
// Only the first rotary_dim dims of each head rotate; with half = rotary_dim / 2, for i < half:
//   y[i] = x[i] cos[i] - x[i + half] sin[i],   y[i + half] = x[i + half] cos[i + half] + x[i] sin[i + half]
// and dims [rotary_dim, D) pass through. cos, sin: (S, rotary_dim) fp32 tables from cpu::rope_tables.
//
// One thread per work item of a head row (B * S * NH rows of D): P = half + (D - rotary_dim) items per row; item
// k < half rotates the pair (k, k + half), the others copy (forward) or add (backward) one pass-through element.
// A thread reads both elements of its pair before writing them, so y may alias x. Grid-stride loop, 64-bit indices.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;

// x, y: (rows = B * S * NH, D); row = (b * S + s) * NH + h.
__global__ void rope_forward_kernel(bf16* y, const bf16* x, const float* cos, const float* sin, int64_t rows, int64_t S,
                                    int64_t NH, int64_t D, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2, P = half + (D - rotary_dim);
  const int64_t total = rows * P;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / P, k = i % P;
    const bf16* xr = x + row * D;
    bf16* yr = y + row * D;
    if (k < half) {
      const int64_t s = (row / NH) % S;
      const float* c = cos + s * rotary_dim;
      const float* sn = sin + s * rotary_dim;
      const float x1 = to_f32(xr[k]), x2 = to_f32(xr[k + half]);
      yr[k] = to_bf16(x1 * c[k] - x2 * sn[k]);
      yr[k + half] = to_bf16(x2 * c[k + half] + x1 * sn[k + half]);
    } else {
      const int64_t d = rotary_dim + (k - half);
      yr[d] = xr[d];
    }
  }
}

// dx += R^T dy: dx[k] += g1 cos[k] + g2 sin[k + half], dx[k + half] += g2 cos[k + half] - g1 sin[k].
__global__ void rope_backward_kernel(bf16* dx, const bf16* dy, const float* cos, const float* sin, int64_t rows,
                                     int64_t S, int64_t NH, int64_t D, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2, P = half + (D - rotary_dim);
  const int64_t total = rows * P;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / P, k = i % P;
    const bf16* gr = dy + row * D;
    bf16* dxr = dx + row * D;
    if (k < half) {
      const int64_t s = (row / NH) % S;
      const float* c = cos + s * rotary_dim;
      const float* sn = sin + s * rotary_dim;
      const float g1 = to_f32(gr[k]), g2 = to_f32(gr[k + half]);
      add_to(dxr + k, g1 * c[k] + g2 * sn[k + half]);
      add_to(dxr + k + half, g2 * c[k + half] - g1 * sn[k]);
    } else {
      const int64_t d = rotary_dim + (k - half);
      add_to(dxr + d, to_f32(gr[d]));
    }
  }
}

void check_dims(int64_t D, int64_t rotary_dim) {
  NEXTRON_CHECK(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= D, "rope: rotary_dim ", rotary_dim,
                " must be even and at most head_dim ", D);
}

}  // namespace

void rope_forward(bf16* y, const bf16* x, const float* cos, const float* sin, int64_t B, int64_t S, int64_t NH,
                  int64_t D, int64_t rotary_dim, cudaStream_t stream) {
  check_dims(D, rotary_dim);
  const int64_t rows = B * S * NH, total = rows * (rotary_dim / 2 + D - rotary_dim);
  if (total <= 0) return;
  rope_forward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(y, x, cos, sin, rows, S, NH, D, rotary_dim);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void rope_backward(bf16* dx, const bf16* dy, const float* cos, const float* sin, int64_t B, int64_t S, int64_t NH,
                   int64_t D, int64_t rotary_dim, cudaStream_t stream) {
  if (!dx) return;
  check_dims(D, rotary_dim);
  const int64_t rows = B * S * NH, total = rows * (rotary_dim / 2 + D - rotary_dim);
  if (total <= 0) return;
  rope_backward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(dx, dy, cos, sin, rows, S, NH, D,
                                                                           rotary_dim);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
