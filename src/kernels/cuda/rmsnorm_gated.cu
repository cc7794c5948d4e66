// Gated RMSNorm on the GPU (Qwen3NextRMSNormGated, the DeltaNet output norm): y = w * (x * rstd) * silu(z),
// rstd = 1 / sqrt(mean(x^2) + eps) per row; the weight is plain (not zero-centred). CPU reference:
// kernels/cpu/rmsnorm_gated.cpp (same formulas, fp32 row sums here instead of double).
//
// Same layout as rmsnorm.cu: one warp per row (block (32, kRowWarps)) with warp_sum reductions for the row
// kernels (rows are the DeltaNet value heads, D = 128, so there are many short rows), and dw as the deterministic
// two-stage column sum of norm_dw.cuh (per-chunk partials in the caller's dw_scratch, then a fixed-order sum per
// column): with some 500k rows of 128 columns it is the one reduction here that needs the whole GPU.
//
// Vector path (template kVector), taken when D is a multiple of 8 and every bf16 row pointer and w are 16-byte
// aligned, as in rmsnorm.cu: row sums read 256-element chunks with one 16-byte load per lane into a per-warp staging
// buffer and add each lane's scalar-path elements l, l + 32, ... from there in the scalar path's order (vec_io.cuh),
// so rstd and the backward's dot product are bit-identical to the scalar path's; the elementwise parts (y, dz, dx)
// give each lane 8 consecutive elements per 16-byte access with the same per-element arithmetic. Otherwise (odd D,
// an unaligned pointer) the scalar path: a lane per element, stride 32.
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/norm_dw.cuh"
#include "kernels/cuda/norms.h"
#include "kernels/cuda/vec_io.cuh"

namespace nextron::cuda {

namespace {

constexpr int kRowWarps = 4;  // rows (warps) per block in the row kernels

// x, z, y: (N, D); rstd: (N). Warp threadIdx.y handles row blockIdx.x * kRowWarps + threadIdx.y.
template <bool kVector>
__global__ void rmsnorm_gated_forward_kernel(bf16* y, float* rstd, const bf16* x, const bf16* z, const float* w,
                                             int64_t N, int64_t D, float eps) {
  __shared__ uint4 stage[kRowWarps][32];  // the vector path's chunk of the warp's row
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;  // whole warp leaves together
  const bf16* xr = x + n * D;
  const bf16* zr = z + n * D;
  bf16* yr = y + n * D;
  const float ss = warp_sum(vec::lane_sum_squares<kVector>(stage[threadIdx.y], xr, D));
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  if (threadIdx.x == 0) rstd[n] = r;
  if constexpr (kVector) {
    for (int64_t d = 8 * threadIdx.x; d < D; d += vec::kChunk) {
      float xv[8], zv[8], wv[8], o[8];
      vec::load8(xv, xr + d);
      vec::load8(zv, zr + d);
      vec::load8(wv, w + d);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = wv[e] * (xv[e] * r) * (zv[e] * sigmoid(zv[e]));
      vec::store8(yr + d, o);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) {
      const float zv = to_f32(zr[d]);
      yr[d] = to_bf16(w[d] * (to_f32(xr[d]) * r) * (zv * sigmoid(zv)));
    }
  }
}

// With xhat = x r and sg = sigmoid(z):
//   dz += dy w xhat sg (1 + z (1 - sg))                       (silu'(z))
//   g = dy w silu(z) = dL/dxhat; dx += r g - x (r^3 / D) sum(g x).
// The vector path forms dz with 16-byte accesses while it stages the chunks of z, x and dy, then the dot product
// from the staged values in the scalar path's order.
template <bool kVector>
__global__ void rmsnorm_gated_backward_rows_kernel(bf16* dx, bf16* dz, const bf16* dy, const bf16* x, const bf16* z,
                                                   const float* w, const float* rstd, int64_t N, int64_t D) {
  __shared__ uint4 stage[kRowWarps][3][32];  // the vector path's chunks of z, x and dy
  const int64_t n = int64_t(blockIdx.x) * kRowWarps + threadIdx.y;
  if (n >= N) return;
  const bf16* xr = x + n * D;
  const bf16* zr = z + n * D;
  const bf16* gr = dy + n * D;
  const float r = rstd[n];
  float dot = 0.0f;
  if constexpr (kVector) {
    uint4* sz = stage[threadIdx.y][0];
    uint4* sx = stage[threadIdx.y][1];
    uint4* sd = stage[threadIdx.y][2];
    for (int64_t b = 0; b < D; b += vec::kChunk) {
      const int64_t d0 = b + 8 * threadIdx.x;
      if (dz && d0 < D) {
        float zv[8], xv[8], gv[8], wv[8], a[8];
        vec::load8(zv, zr + d0);
        vec::load8(xv, xr + d0);
        vec::load8(gv, gr + d0);
        vec::load8(wv, w + d0);
        vec::load8(a, dz + n * D + d0);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float gw = gv[e] * wv[e];
          const float sg = sigmoid(zv[e]);
          a[e] = a[e] + gw * (xv[e] * r) * sg * (1.0f + zv[e] * (1.0f - sg));
        }
        vec::store8(dz + n * D + d0, a);
      }
      if (!dx) continue;  // uniform across the warp
      vec::stage_chunk(sz, zr, b, D);
      vec::stage_chunk(sx, xr, b, D);
      vec::stage_chunk(sd, gr, b, D);
      __syncwarp();
      for (int m = 0; m < 8; ++m) {
        const int k = threadIdx.x + 32 * m;
        if (b + k >= D) break;
        const float zv = vec::staged(sz, k), xv = vec::staged(sx, k), gw = vec::staged(sd, k) * w[b + k];
        const float sg = sigmoid(zv);
        dot += gw * zv * sg * xv;
      }
      __syncwarp();
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) {
      const float zv = to_f32(zr[d]), xv = to_f32(xr[d]), gw = to_f32(gr[d]) * w[d];
      const float sg = sigmoid(zv);
      if (dz) add_to(dz + n * D + d, gw * (xv * r) * sg * (1.0f + zv * (1.0f - sg)));
      dot += gw * zv * sg * xv;
    }
  }
  if (!dx) return;  // uniform across the warp
  dot = warp_sum(dot);
  const float c = dot * r * r * r / float(D);
  bf16* dxr = dx + n * D;
  if constexpr (kVector) {
    for (int64_t d = 8 * threadIdx.x; d < D; d += vec::kChunk) {
      float zv[8], xv[8], gv[8], wv[8], a[8];
      vec::load8(zv, zr + d);
      vec::load8(xv, xr + d);
      vec::load8(gv, gr + d);
      vec::load8(wv, w + d);
      vec::load8(a, dxr + d);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float g = gv[e] * wv[e] * zv[e] * sigmoid(zv[e]);
        a[e] = a[e] + (r * g - xv[e] * c);
      }
      vec::store8(dxr + d, a);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += 32) {
      const float zv = to_f32(zr[d]);
      const float g = to_f32(gr[d]) * w[d] * zv * sigmoid(zv);
      add_to(dxr + d, r * g - to_f32(xr[d]) * c);
    }
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
  const dim3 grid(unsigned(ceil_div(N, kRowWarps))), block(32, kRowWarps);
  if (D % 8 == 0 && vec::aligned16(y) && vec::aligned16(x) && vec::aligned16(z) && vec::aligned16(w))
    rmsnorm_gated_forward_kernel<true><<<grid, block, 0, stream>>>(y, rstd, x, z, w, N, D, eps);
  else
    rmsnorm_gated_forward_kernel<false><<<grid, block, 0, stream>>>(y, rstd, x, z, w, N, D, eps);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void rmsnorm_gated_backward(bf16* dx, bf16* dz, float* dw, float* dw_scratch, const bf16* dy, const bf16* x,
                            const bf16* z, const float* w, const float* rstd, int64_t N, int64_t D,
                            cudaStream_t stream) {
  if (N <= 0 || D <= 0) return;
  if (dx || dz) {
    const dim3 grid(unsigned(ceil_div(N, kRowWarps))), block(32, kRowWarps);
    // a null gradient counts as aligned (vec::aligned16(nullptr)): it is never accessed
    if (D % 8 == 0 && vec::aligned16(dx) && vec::aligned16(dz) && vec::aligned16(dy) && vec::aligned16(x) &&
        vec::aligned16(z) && vec::aligned16(w))
      rmsnorm_gated_backward_rows_kernel<true><<<grid, block, 0, stream>>>(dx, dz, dy, x, z, w, rstd, N, D);
    else
      rmsnorm_gated_backward_rows_kernel<false><<<grid, block, 0, stream>>>(dx, dz, dy, x, z, w, rstd, N, D);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  if (dw) norm_dw::accumulate(dw, dw_scratch, DwTerm{dy, x, z, rstd}, N, D, stream);
}

}  // namespace nextron::cuda
