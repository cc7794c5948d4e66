// Zero-centred RMSNorm on the GPU (Qwen3NextRMSNorm): y = x * rstd * (1 + w), rstd = 1 / sqrt(mean(x^2) + eps)
// per row. CPU reference: kernels/cpu/rmsnorm.cpp (same formulas, fp32 here instead of double for the row sums).
//
// Row kernels: one warp per row, kRowWarps rows per block (block (32, kRowWarps)). The row's sum of squares and the
// backward's dot product are warp_sums, so there is no shared memory and no block barrier; this suits both the many
// short rows of q_norm / k_norm (D = 256) and the hidden-size rows (D = 2048: 64 elements per lane). Every lane
// reads and writes the same elements, after the reduction, so y may alias x.
//
// dw (D) is a column sum over rows. The API gives no scratch for per-block partials, so it is a second kernel in
// which each block owns 32 columns and kColGroups row groups (block (32, kColGroups)): thread (c, g) sums column c
// over rows g, g + kColGroups, ... in order, then the kColGroups partials are added in a fixed order through shared
// memory. Deterministic, no atomics.
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/norms.h"

namespace nextron::cuda {

namespace {

constexpr int kRowWarps = 4;    // rows (warps) per block in the row kernels
constexpr int kColGroups = 32;  // row groups per column in the dw kernel (block 32 x 32 = 1024 threads)

// x, y: (N, D); rstd: (N). Block (32, kRowWarps), warp threadIdx.y handles row blockIdx.x * kRowWarps + threadIdx.y.
__global__ void rmsnorm_forward_kernel(bf16* y, float* rstd, const bf16* x, const float* w, int64_t N, int64_t D,
                                       float eps) {
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;  // whole warp leaves together: n depends only on threadIdx.y
  const bf16* xr = x + n * D;
  bf16* yr = y + n * D;
  float ss = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += 32) {
    const float v = to_f32(xr[d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  if (threadIdx.x == 0) rstd[n] = r;
  for (int64_t d = threadIdx.x; d < D; d += 32) yr[d] = to_bf16(to_f32(xr[d]) * r * (1.0f + w[d]));
}

// xhat = x r, g = dy (1 + w): dx += r (g - xhat mean(g xhat)) = r g - x (r^3 / D) sum(g x).
__global__ void rmsnorm_backward_dx_kernel(bf16* dx, const bf16* dy, const bf16* x, const float* w, const float* rstd,
                                           int64_t N, int64_t D) {
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;
  const bf16* xr = x + n * D;
  const bf16* gr = dy + n * D;
  bf16* dxr = dx + n * D;
  float dot = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += 32) dot += to_f32(gr[d]) * (1.0f + w[d]) * to_f32(xr[d]);
  dot = warp_sum(dot);
  const float r = rstd[n];
  const float c = dot * r * r / float(D);
  for (int64_t d = threadIdx.x; d < D; d += 32)
    add_to(dxr + d, r * (to_f32(gr[d]) * (1.0f + w[d]) - to_f32(xr[d]) * c));
}

// dw[d] += sum_n dy[n, d] x[n, d] rstd[n]. Block (32, kColGroups) owns columns [32 blockIdx.x, 32 blockIdx.x + 32).
__global__ void __launch_bounds__(32 * kColGroups)
    rmsnorm_backward_dw_kernel(float* dw, const bf16* dy, const bf16* x, const float* rstd, int64_t N, int64_t D) {
  __shared__ float part[kColGroups][32];
  const int64_t d = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (d < D) {
#pragma unroll 4
    for (int64_t n = threadIdx.y; n < N; n += kColGroups)
      acc += to_f32(dy[n * D + d]) * (to_f32(x[n * D + d]) * rstd[n]);
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float s = 0.0f;
    for (int g = 0; g < kColGroups; ++g) s += part[g][threadIdx.x];
    dw[d] += s;
  }
}

}  // namespace

void rmsnorm_forward(bf16* y, float* rstd, const bf16* x, const float* w, int64_t N, int64_t D, float eps,
                     cudaStream_t stream) {
  if (N <= 0) return;
  rmsnorm_forward_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(y, rstd, x, w, N, D,
                                                                                               eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void rmsnorm_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const float* w, const float* rstd, int64_t N,
                      int64_t D, cudaStream_t stream) {
  if (N <= 0 || D <= 0) return;
  if (dx) {
    rmsnorm_backward_dx_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(dx, dy, x, w, rstd,
                                                                                                     N, D);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  if (dw) {
    rmsnorm_backward_dw_kernel<<<unsigned(ceil_div(D, 32)), dim3(32, kColGroups), 0, stream>>>(dw, dy, x, rstd, N, D);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace nextron::cuda
