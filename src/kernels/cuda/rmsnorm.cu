// Zero-centred RMSNorm on the GPU (Qwen3NextRMSNorm): y = x * rstd * (1 + w), rstd = 1 / sqrt(mean(x^2) + eps)
// per row. CPU reference: kernels/cpu/rmsnorm.cpp (same formulas, fp32 here instead of double for the row sums).
//
// Row kernels: one warp per row, kRowWarps rows per block (block (32, kRowWarps)). The row's sum of squares and the
// backward's dot product are warp_sums, so there is no shared memory and no block barrier; this suits both the many
// short rows of q_norm / k_norm (D = 256) and the hidden-size rows (D = 2048: 64 elements per lane). Every lane
// reads and writes the same elements, after the reduction, so y may alias x.
//
// dw (D) is a column sum over rows: the deterministic two-stage sum of norm_dw.cuh (per-chunk partials in the
// caller's dw_scratch, then a fixed-order sum per column), shared with rmsnorm_gated.cu.
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/norm_dw.cuh"
#include "kernels/cuda/norms.h"

namespace nextron::cuda {

namespace {

constexpr int kRowWarps = 4;  // rows (warps) per block in the row kernels

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

// The summand of dw[d] += sum_n dy[n, d] x[n, d] rstd[n] (dL/d(1 + w) = dy xhat) at row n, flat index i = n D + d.
struct DwTerm {
  const bf16* dy;
  const bf16* x;
  const float* rstd;
  __device__ float operator()(int64_t n, int64_t i) const { return to_f32(dy[i]) * (to_f32(x[i]) * rstd[n]); }
};

}  // namespace

void rmsnorm_forward(bf16* y, float* rstd, const bf16* x, const float* w, int64_t N, int64_t D, float eps,
                     cudaStream_t stream) {
  if (N <= 0) return;
  rmsnorm_forward_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(y, rstd, x, w, N, D,
                                                                                               eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

int64_t norm_dw_scratch_floats(int64_t N, int64_t D) { return norm_dw::plan(N, D).chunks * D; }

void rmsnorm_backward(bf16* dx, float* dw, float* dw_scratch, const bf16* dy, const bf16* x, const float* w,
                      const float* rstd, int64_t N, int64_t D, cudaStream_t stream) {
  if (N <= 0 || D <= 0) return;
  if (dx) {
    rmsnorm_backward_dx_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(dx, dy, x, w, rstd,
                                                                                                     N, D);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  if (dw) norm_dw::accumulate(dw, dw_scratch, DwTerm{dy, x, rstd}, N, D, stream);
}

}  // namespace nextron::cuda
