// L2 normalisation over the last dimension on the GPU (HF's l2norm for DeltaNet q and k):
// y = x * rsqrt(sum(x^2) + eps). CPU reference: kernels/cpu/l2norm.cpp (fp32 row sums here instead of double).
//
// One warp per row, kRowWarps rows per block (block (32, kRowWarps)); rows are DeltaNet key heads (D = 128), so
// many short rows. Row sums are warp_sums. Each lane reads and writes the same elements after the reduction, so y
// may alias x. The backward recomputes the norm from x (nothing is saved by the forward).
//
// Vector path (template kVector), taken when D is a multiple of 8 and every pointer is 16-byte aligned, as in
// rmsnorm.cu: row sums read 256-element chunks with one 16-byte load per lane into a per-warp staging buffer and add
// each lane's scalar-path elements l, l + 32, ... from there in the scalar path's order (vec_io.cuh), so the sums
// are bit-identical to the scalar path's; the elementwise passes give each lane 8 consecutive elements per 16-byte
// access with the same per-element arithmetic. Otherwise the scalar path: a lane per element, stride 32.
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/norms.h"
#include "kernels/cuda/vec_io.cuh"

namespace nextron::cuda {

namespace {

constexpr int kRowWarps = 4;  // rows (warps) per block

// x, y: (N, D). Warp threadIdx.y handles row blockIdx.x * kRowWarps + threadIdx.y.
template <bool kVector>
__global__ void l2norm_forward_kernel(bf16* y, const bf16* x, int64_t N, int64_t D, float eps) {
  __shared__ uint4 stage[kRowWarps][32];  // the vector path's chunk of the warp's row
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;  // whole warp leaves together
  const bf16* xr = x + n * D;
  bf16* yr = y + n * D;
  const float ss = warp_sum(vec::lane_sum_squares<kVector>(stage[threadIdx.y], xr, D));
  const float r = 1.0f / sqrtf(ss + eps);
  if constexpr (kVector) {
    for (int64_t d = 8 * threadIdx.x; d < D; d += vec::kChunk) {
      float xv[8], o[8];
      vec::load8(xv, xr + d);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = xv[e] * r;
      vec::store8(yr + d, o);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) yr[d] = to_bf16(to_f32(xr[d]) * r);
  }
}

// y = x r, r = (ss + eps)^-1/2, dr/dx = -r^3 x: dx += r dy - r^3 (x . dy) x.
template <bool kVector>
__global__ void l2norm_backward_kernel(bf16* dx, const bf16* dy, const bf16* x, int64_t N, int64_t D, float eps) {
  __shared__ uint4 stage[kRowWarps][2][32];  // the vector path's chunks of x and dy
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;
  const bf16* xr = x + n * D;
  const bf16* gr = dy + n * D;
  bf16* dxr = dx + n * D;
  float ss = 0.0f, dot = 0.0f;
  if constexpr (kVector) {
    uint4* sx = stage[threadIdx.y][0];
    uint4* sg = stage[threadIdx.y][1];
    for (int64_t b = 0; b < D; b += vec::kChunk) {
      vec::stage_chunk(sx, xr, b, D);
      vec::stage_chunk(sg, gr, b, D);
      __syncwarp();
      for (int m = 0; m < 8; ++m) {
        const int k = threadIdx.x + 32 * m;
        if (b + k >= D) break;
        const float xv = vec::staged(sx, k);
        ss += xv * xv;
        dot += xv * vec::staged(sg, k);
      }
      __syncwarp();
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) {
      const float xv = to_f32(xr[d]);
      ss += xv * xv;
      dot += xv * to_f32(gr[d]);
    }
  }
  ss = warp_sum(ss);
  dot = warp_sum(dot);
  const float r = 1.0f / sqrtf(ss + eps);
  const float c = r * r * r * dot;
  if constexpr (kVector) {
    for (int64_t d = 8 * threadIdx.x; d < D; d += vec::kChunk) {
      float gv[8], xv[8], a[8];
      vec::load8(gv, gr + d);
      vec::load8(xv, xr + d);
      vec::load8(a, dxr + d);
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] = a[e] + (r * gv[e] - c * xv[e]);
      vec::store8(dxr + d, a);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) add_to(dxr + d, r * to_f32(gr[d]) - c * to_f32(xr[d]));
  }
}

}  // namespace

void l2norm_forward(bf16* y, const bf16* x, int64_t N, int64_t D, float eps, cudaStream_t stream) {
  if (N <= 0) return;
  const dim3 grid(unsigned(ceil_div(N, kRowWarps))), block(32, kRowWarps);
  if (D % 8 == 0 && vec::aligned16(y) && vec::aligned16(x))
    l2norm_forward_kernel<true><<<grid, block, 0, stream>>>(y, x, N, D, eps);
  else
    l2norm_forward_kernel<false><<<grid, block, 0, stream>>>(y, x, N, D, eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void l2norm_backward(bf16* dx, const bf16* dy, const bf16* x, int64_t N, int64_t D, float eps, cudaStream_t stream) {
  if (!dx || N <= 0) return;
  const dim3 grid(unsigned(ceil_div(N, kRowWarps))), block(32, kRowWarps);
  if (D % 8 == 0 && vec::aligned16(dx) && vec::aligned16(dy) && vec::aligned16(x))
    l2norm_backward_kernel<true><<<grid, block, 0, stream>>>(dx, dy, x, N, D, eps);
  else
    l2norm_backward_kernel<false><<<grid, block, 0, stream>>>(dx, dy, x, N, D, eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
