// MoE load-balancing statistics on the GPU (CPU reference: kernels/cpu/load_balancing.cpp): per-layer sums of
// top-k assignments and router probabilities per expert, and the gradient of the auxiliary loss w.r.t. the probs.
// The loss value itself is formed on the host from the (all-reduced) statistics (cpu::aux_loss_value).
//
// aux_stats_accumulate: block (32, 32) owns 32 experts. Probability column sums: thread (x, y) adds rows y, y + 32,
// ... of expert x (a warp reads 32 consecutive experts of a row), then the 32 partials of an expert are added in a
// fixed order. Counts: the block walks all N K indices and counts its 32 experts with shared-memory integer
// atomics (exact, so order-independent). Deterministic throughout.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/moe.h"

namespace nextron::cuda {

namespace {

__global__ void aux_stats_kernel(float* count_sum, float* prob_sum, const float* probs, const int32_t* indices,
                                 int64_t N, int E, int64_t NK) {
  __shared__ float part[32][33];
  __shared__ int cnt[32];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 32 + tx;
  const int e0 = blockIdx.x * 32, e = e0 + tx;
  if (tid < 32) cnt[tid] = 0;
  __syncthreads();
  for (int64_t s = tid; s < NK; s += 1024) {
    const int i = indices[s];
    if (i >= e0 && i < e0 + 32 && i < E) atomicAdd(&cnt[i - e0], 1);  // indices outside [0, E) count nowhere
  }
  float acc = 0.0f;
  if (e < E)
    for (int64_t n = ty; n < N; n += 32) acc += probs[n * E + e];
  part[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && e < E) {
    float t = 0.0f;
    for (int r = 0; r < 32; ++r) t += part[r][tx];
    prob_sum[e] += t;
    count_sum[e] += float(cnt[tx]);
  }
}

// dprobs (N, E) += scale count_sum[e]. The product is rounded on its own (no fused multiply-add), as the CPU forms
// g[e] = scale count_sum[e] before adding it.
__global__ void aux_loss_backward_kernel(float* dprobs, const float* count_sum, float scale, int64_t N, int64_t E) {
  const int64_t total = N * E;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    dprobs[i] += __fmul_rn(scale, count_sum[i % E]);
}

}  // namespace

void aux_stats_accumulate(float* count_sum, float* prob_sum, const float* probs, const int32_t* indices, int64_t N,
                          int64_t E, int64_t K, cudaStream_t stream) {
  NEXTRON_CHECK(N >= 0 && E >= 1 && E < INT32_MAX && K >= 0, "aux_stats_accumulate: bad sizes N = ", N, ", E = ", E,
                ", K = ", K);
  if (N == 0) return;
  aux_stats_kernel<<<unsigned(ceil_div(E, 32)), dim3(32, 32), 0, stream>>>(count_sum, prob_sum, probs, indices, N,
                                                                           int(E), N * K);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void aux_loss_backward(float* dprobs, const float* count_sum, float total_rows, float daux, int64_t N, int64_t E,
                       cudaStream_t stream) {
  if (N == 0 || E == 0) return;
  // Formed exactly as the CPU reference does in T = float.
  const float scale = daux * float(E) / (total_rows * total_rows);
  const int64_t blocks = std::min<int64_t>(ceil_div(N * E, 256), int64_t(1) << 16);
  aux_loss_backward_kernel<<<unsigned(blocks), 256, 0, stream>>>(dprobs, count_sum, scale, N, E);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
