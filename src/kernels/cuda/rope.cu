// Partial rotary position embedding on the GPU, rotate-half convention (CPU reference: kernels/cpu/rope.cpp).
// Only the first rotary_dim dims of each head rotate; with half = rotary_dim / 2, for i < half:
//   y[i] = x[i] cos[i] - x[i + half] sin[i],   y[i + half] = x[i + half] cos[i + half] + x[i] sin[i + half]
// and dims [rotary_dim, D) pass through. cos, sin: (S, rotary_dim) fp32 tables from cpu::rope_tables.
//
// One thread per work item of a head row (B * S * NH rows of D): P = half + (D - rotary_dim) items per row; item
// k < half rotates the pair (k, k + half), the others copy (forward) or add (backward) one pass-through element.
// A thread reads both elements of its pair before writing them, so y may alias x. Grid-stride loop, 64-bit indices.
//
// Vector path, taken when rotary_dim % 16 == 0 and D % 8 == 0 (so half and D - rotary_dim are multiples of 8), x / y
// (dy / dx), cos and sin are 16-byte aligned and rows * P / 8 < 2^31: the same items in groups of 8 (a thread
// rotates pairs (k .. k + 7, k + half .. k + half + 7) or copies / adds 8 pass-through elements) with 16-byte
// accesses and 32-bit indices, the same per-element arithmetic (bit-identical results; the forward's pass-through
// copies the 16 bytes as they are, as the scalar path copies each element).
#include <algorithm>
#include <climits>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/vec_io.cuh"

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

constexpr int kVec = vec::kBf16;

// Vector path: total = rows * P8 groups, P8 = H8 + (D - rotary_dim) / 8, H8 = half / 8.
__global__ void rope_forward_vec_kernel(bf16* y, const bf16* x, const float* cos, const float* sin, uint32_t total,
                                        uint32_t S, uint32_t NH, uint32_t D, uint32_t rotary_dim) {
  const uint32_t half = rotary_dim / 2, H8 = half / kVec, P8 = H8 + (D - rotary_dim) / kVec;
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const uint32_t row = t / P8, k8 = t - row * P8;
    const bf16* xr = x + int64_t(row) * D;
    bf16* yr = y + int64_t(row) * D;
    if (k8 < H8) {
      const uint32_t k = k8 * kVec, s = (row / NH) % S;
      const float* c = cos + int64_t(s) * rotary_dim;
      const float* sn = sin + int64_t(s) * rotary_dim;
      float x1[kVec], x2[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec], o1[kVec], o2[kVec];
      vec::load8(x1, xr + k);
      vec::load8(x2, xr + k + half);
      vec::load8(c1, c + k);
      vec::load8(c2, c + k + half);
      vec::load8(s1, sn + k);
      vec::load8(s2, sn + k + half);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        o1[e] = x1[e] * c1[e] - x2[e] * s1[e];
        o2[e] = x2[e] * c2[e] + x1[e] * s2[e];
      }
      vec::store8(yr + k, o1);
      vec::store8(yr + k + half, o2);
    } else {
      const uint32_t d = rotary_dim + (k8 - H8) * kVec;
      *reinterpret_cast<uint4*>(yr + d) = *reinterpret_cast<const uint4*>(xr + d);
    }
  }
}

__global__ void rope_backward_vec_kernel(bf16* dx, const bf16* dy, const float* cos, const float* sin, uint32_t total,
                                         uint32_t S, uint32_t NH, uint32_t D, uint32_t rotary_dim) {
  const uint32_t half = rotary_dim / 2, H8 = half / kVec, P8 = H8 + (D - rotary_dim) / kVec;
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const uint32_t row = t / P8, k8 = t - row * P8;
    const bf16* gr = dy + int64_t(row) * D;
    bf16* dxr = dx + int64_t(row) * D;
    if (k8 < H8) {
      const uint32_t k = k8 * kVec, s = (row / NH) % S;
      const float* c = cos + int64_t(s) * rotary_dim;
      const float* sn = sin + int64_t(s) * rotary_dim;
      float g1[kVec], g2[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec], o1[kVec], o2[kVec];
      vec::load8(g1, gr + k);
      vec::load8(g2, gr + k + half);
      vec::load8(c1, c + k);
      vec::load8(c2, c + k + half);
      vec::load8(s1, sn + k);
      vec::load8(s2, sn + k + half);
      vec::load8(o1, dxr + k);
      vec::load8(o2, dxr + k + half);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        o1[e] = o1[e] + (g1[e] * c1[e] + g2[e] * s2[e]);
        o2[e] = o2[e] + (g2[e] * c2[e] - g1[e] * s1[e]);
      }
      vec::store8(dxr + k, o1);
      vec::store8(dxr + k + half, o2);
    } else {
      const uint32_t d = rotary_dim + (k8 - H8) * kVec;
      float g[kVec], a[kVec];
      vec::load8(g, gr + d);
      vec::load8(a, dxr + d);
#pragma unroll
      for (int e = 0; e < kVec; ++e) a[e] = a[e] + g[e];
      vec::store8(dxr + d, a);
    }
  }
}

// Whether the vector path runs (see the top); total_groups = rows * P / 8.
bool use_vec(int64_t rows, int64_t D, int64_t rotary_dim, const void* a, const void* b, const float* cos,
             const float* sin) {
  if (rotary_dim % (2 * kVec) != 0 || D % kVec != 0 || D > INT32_MAX) return false;
  const int64_t P8 = rotary_dim / 2 / kVec + (D - rotary_dim) / kVec;
  return rows * P8 <= INT32_MAX && vec::aligned16(a) && vec::aligned16(b) && vec::aligned16(cos) && vec::aligned16(sin);
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
  if (use_vec(rows, D, rotary_dim, y, x, cos, sin)) {
    const int64_t groups = rows * (rotary_dim / 2 / kVec + (D - rotary_dim) / kVec);
    rope_forward_vec_kernel<<<grid_stride_blocks(groups), kThreads, 0, stream>>>(
        y, x, cos, sin, uint32_t(groups), uint32_t(S), uint32_t(NH), uint32_t(D), uint32_t(rotary_dim));
    NEXTRON_CUDA_LAUNCH_CHECK();
    return;
  }
  rope_forward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(y, x, cos, sin, rows, S, NH, D, rotary_dim);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void rope_backward(bf16* dx, const bf16* dy, const float* cos, const float* sin, int64_t B, int64_t S, int64_t NH,
                   int64_t D, int64_t rotary_dim, cudaStream_t stream) {
  if (!dx) return;
  check_dims(D, rotary_dim);
  const int64_t rows = B * S * NH, total = rows * (rotary_dim / 2 + D - rotary_dim);
  if (total <= 0) return;
  if (use_vec(rows, D, rotary_dim, dx, dy, cos, sin)) {
    const int64_t groups = rows * (rotary_dim / 2 / kVec + (D - rotary_dim) / kVec);
    rope_backward_vec_kernel<<<grid_stride_blocks(groups), kThreads, 0, stream>>>(
        dx, dy, cos, sin, uint32_t(groups), uint32_t(S), uint32_t(NH), uint32_t(D), uint32_t(rotary_dim));
    NEXTRON_CUDA_LAUNCH_CHECK();
    return;
  }
  rope_backward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(dx, dy, cos, sin, rows, S, NH, D,
                                                                           rotary_dim);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
