// Glue kernels of the CUDA backend (kernels/ops.h): residual adds and the column gathers / scatters that regroup
// projections (CPU reference: CpuOps::add, gather_cols, scatter_cols in kernels/cpu_ops.cpp).
#pragma once

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// y = a + b over n elements (fp32 sum, one rounding; y may alias a or b).
void add(bf16* y, const bf16* a, const bf16* b, int64_t n, cudaStream_t stream);
void add(float* y, const float* a, const float* b, int64_t n, cudaStream_t stream);

// dst (N, W) = src (N, Ws)[:, idx[j]] for j < W; idx: (W) int32 on the device.
template <typename T>
void gather_cols(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Ws, cudaStream_t stream);
// dst (N, Wd)[:, idx[j]] (+)= src (N, W)[:, j] for j < W (idx injective: no two threads write one element).
template <typename T>
void scatter_cols(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Wd, bool accumulate,
                  cudaStream_t stream);

}  // namespace nextron::cuda
