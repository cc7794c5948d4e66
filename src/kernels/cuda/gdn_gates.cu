// Gated DeltaNet gates on the GPU (Qwen3NextGatedDeltaNet.forward; CPU reference: kernels/cpu/gdn_gates.cpp):
//   beta = sigmoid(b),  g = -exp(A_log) softplus(a + dt_bias)
// with torch's softplus: log1p(exp(v)), or v itself above the threshold 20 (whose derivative is then exactly 1).
//
// Forward and the db / da part of the backward: one thread per (n, h) element, grid-stride, 64-bit indices.
// dA_log, ddt_bias (Hv) are column sums over the N tokens: block (32 heads, kColGroups token groups); thread (h, g)
// sums over tokens g, g + kColGroups, ... in order, then the partials are added in a fixed order through shared
// memory (deterministic, no atomics, no scratch). Hv is small (32), so this is a single block for the model.
#include <algorithm>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int kColGroups = 32;            // token groups per head in the column-sum kernel (block 32 x 32)
constexpr float kSoftplusThreshold = 20;  // torch.nn.functional.softplus default

__device__ __forceinline__ float softplus(float v) { return v > kSoftplusThreshold ? v : log1pf(expf(v)); }
// As torch's softplus_backward: exactly 1 above the threshold, else sigmoid(v).
__device__ __forceinline__ float softplus_grad(float v) { return v > kSoftplusThreshold ? 1.0f : sigmoid(v); }

// b, a, beta, g: (N, Hv); A_log, dt_bias: (Hv).
__global__ void gdn_gates_forward_kernel(float* beta, float* g, const bf16* b, const bf16* a, const float* A_log,
                                         const float* dt_bias, int64_t N, int64_t Hv) {
  const int64_t total = N * Hv;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = i % Hv;
    beta[i] = sigmoid(to_f32(b[i]));
    g[i] = -expf(A_log[h]) * softplus(to_f32(a[i]) + dt_bias[h]);
  }
}

// db += dbeta sg (1 - sg) (when db and dbeta); da += dg (-A) softplus'(v) (when da and dg).
__global__ void gdn_gates_backward_inputs_kernel(bf16* db, bf16* da, const float* dbeta, const float* dg, const bf16* b,
                                                 const bf16* a, const float* A_log, const float* dt_bias, int64_t N,
                                                 int64_t Hv) {
  const int64_t total = N * Hv;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (db && dbeta) {
      const float s = sigmoid(to_f32(b[i]));
      add_to(db + i, dbeta[i] * s * (1.0f - s));
    }
    if (da && dg) {
      const int64_t h = i % Hv;
      const float A = expf(A_log[h]), v = to_f32(a[i]) + dt_bias[h];
      add_to(da + i, dg[i] * -A * softplus_grad(v));
    }
  }
}

// dA_log[h] += sum_n dg (-A softplus(v)) (d g / d A_log = g); ddt_bias[h] += sum_n dg (-A) softplus'(v).
// Block (32, kColGroups) owns heads [32 blockIdx.x, 32 blockIdx.x + 32).
__global__ void __launch_bounds__(32 * kColGroups)
    gdn_gates_backward_params_kernel(float* dA_log, float* ddt_bias, const float* dg, const bf16* a, const float* A_log,
                                     const float* dt_bias, int64_t N, int64_t Hv) {
  __shared__ float part_a[kColGroups][32];
  __shared__ float part_d[kColGroups][32];
  const int64_t h = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float acc_a = 0.0f, acc_d = 0.0f;
  if (h < Hv) {
    const float A = expf(A_log[h]), bias = dt_bias[h];
    for (int64_t n = threadIdx.y; n < N; n += kColGroups) {
      const int64_t i = n * Hv + h;
      const float v = to_f32(a[i]) + bias;
      acc_a += dg[i] * (-A * softplus(v));
      acc_d += dg[i] * -A * softplus_grad(v);
    }
  }
  part_a[threadIdx.y][threadIdx.x] = acc_a;
  part_d[threadIdx.y][threadIdx.x] = acc_d;
  __syncthreads();
  if (threadIdx.y == 0 && h < Hv) {
    float sa = 0.0f, sd = 0.0f;
    for (int k = 0; k < kColGroups; ++k) {
      sa += part_a[k][threadIdx.x];
      sd += part_d[k][threadIdx.x];
    }
    if (dA_log) dA_log[h] += sa;
    if (ddt_bias) ddt_bias[h] += sd;
  }
}

}  // namespace

void gdn_gates_forward(float* beta, float* g, const bf16* b, const bf16* a, const float* A_log, const float* dt_bias,
                       int64_t N, int64_t Hv, cudaStream_t stream) {
  const int64_t total = N * Hv;
  if (total <= 0) return;
  gdn_gates_forward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(beta, g, b, a, A_log, dt_bias, N, Hv);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void gdn_gates_backward(bf16* db, bf16* da, float* dA_log, float* ddt_bias, const float* dbeta, const float* dg,
                        const bf16* b, const bf16* a, const float* A_log, const float* dt_bias, int64_t N, int64_t Hv,
                        cudaStream_t stream) {
  const int64_t total = N * Hv;
  if (total <= 0) return;
  if ((db && dbeta) || (da && dg)) {
    gdn_gates_backward_inputs_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(db, da, dbeta, dg, b, a, A_log,
                                                                                         dt_bias, N, Hv);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  if (dg && (dA_log || ddt_bias)) {
    gdn_gates_backward_params_kernel<<<unsigned(ceil_div(Hv, 32)), dim3(32, kColGroups), 0, stream>>>(
        dA_log, ddt_bias, dg, a, A_log, dt_bias, N, Hv);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace nextron::cuda
