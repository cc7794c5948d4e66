// Zero-centred RMSNorm on the GPU (Qwen3NextRMSNorm): y = x * rstd * (1 + w), rstd = 1 / sqrt(mean(x^2) + eps)
// per row. CPU reference: kernels/cpu/rmsnorm.cpp (same formulas, fp32 here instead of double for the row sums).
//
// Row kernels: one warp per row, kRowWarps rows per block (block (32, kRowWarps)). The row's sum of squares and the
// backward's dot product are warp_sums, so there is no shared memory and no block barrier; this suits both the many
// short rows of q_norm / k_norm (D = 256) and the hidden-size rows (D = 2048: 64 elements per lane). Every lane
// reads and writes the same elements, after the reduction, so y may alias x.
//
// Vector path (template kVector), taken when D is a multiple of 8 and x, y / dy, dx and w are 16-byte aligned: the
// row sums read each 256-element chunk of a row with one 16-byte load per lane into a per-warp staging buffer and
// then add each lane's scalar-path elements l, l + 32, ... from there in the scalar path's order (vec_io.cuh), so
// rstd and the dot product are bit-identical to the scalar path's; the elementwise passes then give each lane 8
// consecutive elements per 16-byte access (x, y, dy, dx as 8 bf16, w as 2 x 4 fp32) with the same per-element
// arithmetic. Otherwise (odd D, an unaligned pointer) the scalar path: a lane per element, stride 32.
//
// dw (D) is a column sum over rows: the deterministic two-stage sum of norm_dw.cuh (per-chunk partials in the
// caller's dw_scratch, then a fixed-order sum per column), shared with rmsnorm_gated.cu.
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/norm_dw.cuh"
#include "kernels/cuda/norms.h"
#include "kernels/cuda/vec_io.cuh"

namespace nextron::cuda {

namespace {

constexpr int kRowWarps = 4;  // rows (warps) per block in the row kernels

// x, y: (N, D); rstd: (N). Block (32, kRowWarps), warp threadIdx.y handles row blockIdx.x * kRowWarps + threadIdx.y.
template <bool kVector>
__global__ void rmsnorm_forward_kernel(bf16* y, float* rstd, const bf16* x, const float* w, int64_t N, int64_t D,
                                       float eps) {
  __shared__ uint4 stage[kRowWarps][32];  // the vector path's chunk of the warp's row
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;  // whole warp leaves together: n depends only on threadIdx.y
  const bf16* xr = x + n * D;
  bf16* yr = y + n * D;
  const float ss = warp_sum(vec::lane_sum_squares<kVector>(stage[threadIdx.y], xr, D));
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  if (threadIdx.x == 0) rstd[n] = r;
  if constexpr (kVector) {
    for (int64_t d = 8 * threadIdx.x; d < D; d += vec::kChunk) {
      float xv[8], wv[8], o[8];
      vec::load8(xv, xr + d);
      vec::load8(wv, w + d);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = xv[e] * r * (1.0f + wv[e]);
      vec::store8(yr + d, o);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) yr[d] = to_bf16(to_f32(xr[d]) * r * (1.0f + w[d]));
  }
}

// xhat = x r, g = dy (1 + w): dx += r (g - xhat mean(g xhat)) = r g - x (r^3 / D) sum(g x).
template <bool kVector>
__global__ void rmsnorm_backward_dx_kernel(bf16* dx, const bf16* dy, const bf16* x, const float* w, const float* rstd,
                                           int64_t N, int64_t D) {
  __shared__ uint4 stage[kRowWarps][2][32];  // the vector path's chunks of dy and x
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;
  const bf16* xr = x + n * D;
  const bf16* gr = dy + n * D;
  bf16* dxr = dx + n * D;
  float dot = 0.0f;
  if constexpr (kVector) {
    uint4* sg = stage[threadIdx.y][0];
    uint4* sx = stage[threadIdx.y][1];
    for (int64_t b = 0; b < D; b += vec::kChunk) {
      vec::stage_chunk(sg, gr, b, D);
      vec::stage_chunk(sx, xr, b, D);
      __syncwarp();
      for (int m = 0; m < 8; ++m) {
        const int k = threadIdx.x + 32 * m;
        if (b + k >= D) break;
        dot += vec::staged(sg, k) * (1.0f + w[b + k]) * vec::staged(sx, k);
      }
      __syncwarp();
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) dot += to_f32(gr[d]) * (1.0f + w[d]) * to_f32(xr[d]);
  }
  dot = warp_sum(dot);
  const float r = rstd[n];
  const float c = dot * r * r / float(D);
  if constexpr (kVector) {
    for (int64_t d = 8 * threadIdx.x; d < D; d += vec::kChunk) {
      float gv[8], xv[8], wv[8], a[8];
      vec::load8(gv, gr + d);
      vec::load8(xv, xr + d);
      vec::load8(wv, w + d);
      vec::load8(a, dxr + d);
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] = a[e] + r * (gv[e] * (1.0f + wv[e]) - xv[e] * c);
      vec::store8(dxr + d, a);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32)
      add_to(dxr + d, r * (to_f32(gr[d]) * (1.0f + w[d]) - to_f32(xr[d]) * c));
  }
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
  const dim3 grid(unsigned(ceil_div(N, kRowWarps))), block(32, kRowWarps);
  if (D % 8 == 0 && vec::aligned16(y) && vec::aligned16(x) && vec::aligned16(w))
    rmsnorm_forward_kernel<true><<<grid, block, 0, stream>>>(y, rstd, x, w, N, D, eps);
  else
    rmsnorm_forward_kernel<false><<<grid, block, 0, stream>>>(y, rstd, x, w, N, D, eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

int64_t norm_dw_scratch_floats(int64_t N, int64_t D) { return norm_dw::plan(N, D).chunks * D; }

void rmsnorm_backward(bf16* dx, float* dw, float* dw_scratch, const bf16* dy, const bf16* x, const float* w,
                      const float* rstd, int64_t N, int64_t D, cudaStream_t stream) {
  if (N <= 0 || D <= 0) return;
  if (dx) {
    const dim3 grid(unsigned(ceil_div(N, kRowWarps))), block(32, kRowWarps);
    if (D % 8 == 0 && vec::aligned16(dx) && vec::aligned16(dy) && vec::aligned16(x) && vec::aligned16(w))
      rmsnorm_backward_dx_kernel<true><<<grid, block, 0, stream>>>(dx, dy, x, w, rstd, N, D);
    else
      rmsnorm_backward_dx_kernel<false><<<grid, block, 0, stream>>>(dx, dy, x, w, rstd, N, D);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  if (dw) norm_dw::accumulate(dw, dw_scratch, DwTerm{dy, x, rstd}, N, D, stream);
}

}  // namespace nextron::cuda
