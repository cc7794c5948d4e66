// Gated RMSNorm on the GPU (Qwen3NextRMSNormGated, the DeltaNet output norm): y = w * (x * rstd) * silu(z),
// rstd = 1 / sqrt(mean(x^2) + eps) per row; the weight is plain (not zero-centred). CPU reference:
// kernels/cpu/rmsnorm_gated.cpp (same formulas, fp32 row sums here instead of double).
//
// Same layout as rmsnorm.cu: one warp per row (block (32, kRowWarps)) with warp_sum reductions for the row
// kernels (rows are the DeltaNet value heads, D = 128, so there are many short rows), and dw as the deterministic
// two-stage column sum of norm_dw.cuh (per-chunk partials in the caller's dw_scratch, then a fixed-order sum per
// column): with some 500k rows of 128 columns it is the one reduction here that needs the whole GPU.
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/norm_dw.cuh"
#include "kernels/cuda/norms.h"

namespace nextron::cuda {

namespace {

constexpr int kRowWarps = 4;  // rows (warps) per block in the row kernels

// x, z, y: (N, D); rstd: (N). Warp threadIdx.y handles row blockIdx.x * kRowWarps + threadIdx.y.
__global__ void rmsnorm_gated_forward_kernel(bf16* y, float* rstd, const bf16* x, const bf16* z, const float* w,
                                             int64_t N, int64_t D, float eps) {
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;  // whole warp leaves together
  const bf16* xr = x + n * D;
  const bf16* zr = z + n * D;
  bf16* yr = y + n * D;
  float ss = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += 32) {
    const float v = to_f32(xr[d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  if (threadIdx.x == 0) rstd[n] = r;
  for (int64_t d = threadIdx.x; d < D; d += 32) {
    const float zv = to_f32(zr[d]);
    yr[d] = to_bf16(w[d] * (to_f32(xr[d]) * r) * (zv * sigmoid(zv)));
  }
}

// With xhat = x r and sg = sigmoid(z):
//   dz += dy w xhat sg (1 + z (1 - sg))                       (silu'(z))
//   g = dy w silu(z) = dL/dxhat; dx += r g - x (r^3 / D) sum(g x).
__global__ void rmsnorm_gated_backward_rows_kernel(bf16* dx, bf16* dz, const bf16* dy, const bf16* x, const bf16* z,
                                                   const float* w, const float* rstd, int64_t N, int64_t D) {
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;
  const bf16* xr = x + n * D;
  const bf16* zr = z + n * D;
  const bf16* gr = dy + n * D;
  const float r = rstd[n];
  float dot = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += 32) {
    const float zv = to_f32(zr[d]), xv = to_f32(xr[d]), gw = to_f32(gr[d]) * w[d];
    const float sg = sigmoid(zv);
    if (dz) add_to(dz + n * D + d, gw * (xv * r) * sg * (1.0f + zv * (1.0f - sg)));
    dot += gw * zv * sg * xv;
  }
  if (!dx) return;  // uniform across the warp
  dot = warp_sum(dot);
  const float c = dot * r * r * r / float(D);
  bf16* dxr = dx + n * D;
  for (int64_t d = threadIdx.x; d < D; d += 32) {
    const float zv = to_f32(zr[d]);
    const float g = to_f32(gr[d]) * w[d] * zv * sigmoid(zv);
    add_to(dxr + d, r * g - to_f32(xr[d]) * c);
  }
}

// The summand of dw[d] += sum_n dy[n, d] xhat[n, d] silu(z[n, d]) at row n, flat index i = n D + d.
struct DwTerm {
  const bf16* dy;
  const bf16* x;
  const bf16* z;
  const float* rstd;
  __device__ float operator()(int64_t n, int64_t i) const {
    const float zv = to_f32(z[i]);
    return to_f32(dy[i]) * ((to_f32(x[i]) * rstd[n]) * zv * sigmoid(zv));
  }
};

}  // namespace

void rmsnorm_gated_forward(bf16* y, float* rstd, const bf16* x, const bf16* z, const float* w, int64_t N, int64_t D,
                           float eps, cudaStream_t stream) {
  if (N <= 0) return;
  rmsnorm_gated_forward_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(y, rstd, x, z, w,
                                                                                                     N, D, eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void rmsnorm_gated_backward(bf16* dx, bf16* dz, float* dw, float* dw_scratch, const bf16* dy, const bf16* x,
                            const bf16* z, const float* w, const float* rstd, int64_t N, int64_t D,
                            cudaStream_t stream) {
  if (N <= 0 || D <= 0) return;
  if (dx || dz) {
    rmsnorm_gated_backward_rows_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(
        dx, dz, dy, x, z, w, rstd, N, D);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  if (dw) norm_dw::accumulate(dw, dw_scratch, DwTerm{dy, x, z, rstd}, N, D, stream);
}

}  // namespace nextron::cuda
