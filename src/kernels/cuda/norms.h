// Norms on the GPU: zero-centred RMSNorm, gated RMSNorm and L2 norm (CPU references: kernels/cpu/rmsnorm.h,
// rmsnorm_gated.h, l2norm.h; same math, dtypes per kernels/cuda/common.h). One block (or warp) per row; row sums
// in fp32. The RMSNorms' weight gradients are column sums over all rows, done in two stages through caller-provided
// scratch (norm_dw_scratch_floats) so that they spread over the whole GPU and stay deterministic.
#pragma once

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// y = x * rstd * (1 + w). x, y: (N, D) bf16 (y may equal x); w: (D) fp32; rstd: (N) fp32, overwritten.
void rmsnorm_forward(bf16* y, float* rstd, const bf16* x, const float* w, int64_t N, int64_t D, float eps,
                     cudaStream_t stream);
// Floats of device scratch the dw of rmsnorm_backward / rmsnorm_gated_backward needs for N rows of width D: the
// per-chunk partial column sums (kernels/cuda/norm_dw.cuh). A pure function of (N, D), 0 when either is <= 0, and
// at most 32 * 1024 + D whatever N.
int64_t norm_dw_scratch_floats(int64_t N, int64_t D);

// Accumulates dx (N, D) bf16 and dw (D) fp32 (each may be nullptr). dw is a two-stage column sum (per-chunk partial
// sums, then a fixed-order sum of the chunks), never atomics over rows: bit-identical run to run.
// dw_scratch: at least norm_dw_scratch_floats(N, D) floats of device memory, overwritten (used only for dw, so it
// may be nullptr when dw is nullptr).
void rmsnorm_backward(bf16* dx, float* dw, float* dw_scratch, const bf16* dy, const bf16* x, const float* w,
                      const float* rstd, int64_t N, int64_t D, cudaStream_t stream);

// y = w * (x * rstd) * silu(z). x, z, y: (N, D) bf16; w: (D) fp32; rstd: (N) fp32, overwritten.
void rmsnorm_gated_forward(bf16* y, float* rstd, const bf16* x, const bf16* z, const float* w, int64_t N, int64_t D,
                           float eps, cudaStream_t stream);
// Accumulates dx, dz (N, D) bf16, dw (D) fp32 (each may be nullptr), deterministic as rmsnorm_backward.
// dw_scratch: as rmsnorm_backward's (at least norm_dw_scratch_floats(N, D) floats; may be nullptr when dw is).
void rmsnorm_gated_backward(bf16* dx, bf16* dz, float* dw, float* dw_scratch, const bf16* dy, const bf16* x,
                            const bf16* z, const float* w, const float* rstd, int64_t N, int64_t D,
                            cudaStream_t stream);

// y = x * rsqrt(sum(x^2) + eps) per row. x, y: (N, D) bf16 (y may equal x).
void l2norm_forward(bf16* y, const bf16* x, int64_t N, int64_t D, float eps, cudaStream_t stream);
// Accumulates dx (N, D) from dy, recomputing the norm from x (dx must not alias dy or x).
void l2norm_backward(bf16* dx, const bf16* dy, const bf16* x, int64_t N, int64_t D, float eps, cudaStream_t stream);

}  // namespace nextron::cuda
