// L2 normalisation over the last dimension on the GPU (HF's l2norm for DeltaNet q and k):
// y = x * rsqrt(sum(x^2) + eps). CPU reference: kernels/cpu/l2norm.cpp (fp32 row sums here instead of double).
//
// One warp per row, kRowWarps rows per block (block (32, kRowWarps)); rows are DeltaNet key heads (D = 128), so
// many short rows. Row sums are warp_sums. Each lane reads and writes the same elements after the reduction, so y
// may alias x. The backward recomputes the norm from x (nothing is saved by the forward).
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/norms.h"

namespace nextron::cuda {

namespace {

constexpr int kRowWarps = 4;  // rows (warps) per block

// x, y: (N, D). Warp threadIdx.y handles row blockIdx.x * kRowWarps + threadIdx.y.
__global__ void l2norm_forward_kernel(bf16* y, const bf16* x, int64_t N, int64_t D, float eps) {
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;  // whole warp leaves together
  const bf16* xr = x + n * D;
  bf16* yr = y + n * D;
  float ss = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += 32) {
    const float v = to_f32(xr[d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss + eps);
  for (int64_t d = threadIdx.x; d < D; d += 32) yr[d] = to_bf16(to_f32(xr[d]) * r);
}

// y = x r, r = (ss + eps)^-1/2, dr/dx = -r^3 x: dx += r dy - r^3 (x . dy) x.
__global__ void l2norm_backward_kernel(bf16* dx, const bf16* dy, const bf16* x, int64_t N, int64_t D, float eps) {
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;
  const bf16* xr = x + n * D;
  const bf16* gr = dy + n * D;
  bf16* dxr = dx + n * D;
  float ss = 0.0f, dot = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += 32) {
    const float xv = to_f32(xr[d]);
    ss += xv * xv;
    dot += xv * to_f32(gr[d]);
  }
  ss = warp_sum(ss);
  dot = warp_sum(dot);
  const float r = 1.0f / sqrtf(ss + eps);
  const float c = r * r * r * dot;
  for (int64_t d = threadIdx.x; d < D; d += 32) add_to(dxr + d, r * to_f32(gr[d]) - c * to_f32(xr[d]));
}

}  // namespace

void l2norm_forward(bf16* y, const bf16* x, int64_t N, int64_t D, float eps, cudaStream_t stream) {
  if (N <= 0) return;
  l2norm_forward_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(y, x, N, D, eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void l2norm_backward(bf16* dx, const bf16* dy, const bf16* x, int64_t N, int64_t D, float eps, cudaStream_t stream) {
  if (!dx || N <= 0) return;
  l2norm_backward_kernel<<<unsigned(ceil_div(N, kRowWarps)), dim3(32, kRowWarps), 0, stream>>>(dx, dy, x, N, D, eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
