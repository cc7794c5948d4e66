// Softmax top-k MoE router on the GPU (CPU reference: kernels/cpu/router.cpp): forward (probabilities, the chosen
// experts and their routing weights) and backward (to the logits through the softmax and the optional
// renormalisation of the top-k weights).
//
// One warp per token row. A row of E <= 1024 values lives in registers, VPL = E / 32 (rounded up to a power of two)
// per lane, lane l holding experts l, l + 32, l + 64, ... (coalesced loads). The top-k is K rounds of a warp argmax
// with ties going to the lower expert index (the CPU's order), the winner being struck out after each round;
// K is small (Qwen3-Next: 10), so K rounds of five shuffles beat any sort.
#include <climits>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/moe.h"

namespace nextron::cuda {

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxExperts = 1024;

// Forward of one row per warp. probs (N, E), indices (N, K), weights (N, K) overwritten.
template <int VPL>
__global__ void router_forward_kernel(float* probs, int32_t* indices, float* weights, const float* logits, int64_t N,
                                      int E, int K, bool norm_topk_prob) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;  // uniform across the warp
  const float* x = logits + n * E;
  float v[VPL];
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? x[e] : -INFINITY;
    m = fmaxf(m, v[j]);
  }
  m = warp_max(m);
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? expf(v[j] - m) : 0.0f;
    s += v[j];
  }
  const float inv = 1.0f / warp_sum(s);
  float* p = probs + n * E;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int e = lane + 32 * j;
    if (e < E) {
      v[j] *= inv;
      p[e] = v[j];
    } else {
      v[j] = -1.0f;  // below every probability: never selected
    }
  }

  // K rounds of argmax. Within a lane the scan runs over increasing experts and keeps the first maximum; across
  // lanes the (value, expert) pairs reduce with ties to the lower expert, so each round picks the lowest-index
  // expert among the largest remaining probabilities. The winner is struck out (set to -1).
  float top = 0.0f;
  for (int k = 0; k < K; ++k) {
    float best = -1.0f;
    int bi = INT_MAX;
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (v[j] > best) {
        best = v[j];
        bi = lane + 32 * j;
      }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ob > best || (ob == best && oi < bi)) {
        best = ob;
        bi = oi;
      }
    }
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (lane + 32 * j == bi) v[j] = -1.0f;
    top += best;  // every lane holds the same winner: the same sum, in k order as on the CPU
    if (lane == (k & 31)) {
      indices[n * K + k] = bi;
      weights[n * K + k] = best;
    }
  }
  // Each lane renormalises the weights it wrote itself (no cross-lane memory ordering needed).
  if (norm_topk_prob)
    for (int k = lane; k < K; k += 32) weights[n * K + k] /= top;
}

// Backward of one row per warp: g = dprobs + dweights scattered to the chosen experts (through the
// renormalisation), then dlogits += p (g - p . g).
template <int VPL>
__global__ void router_backward_kernel(float* dlogits, const float* dprobs, const float* dweights, const float* probs,
                                       const int32_t* indices, int64_t N, int E, int K, bool norm_topk_prob) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const float* p = probs + n * E;
  float pv[VPL], g[VPL];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int e = lane + 32 * j;
    pv[j] = e < E ? p[e] : 0.0f;
    g[j] = (dprobs && e < E) ? dprobs[n * E + e] : 0.0f;
  }
  if (dweights) {
    const int32_t* idx = indices + n * K;
    const float* dw = dweights + n * K;
    // w_k = p_k / S with S = sum_j p_j: dL/dp_k = (dw_k - sum_j dw_j w_j) / S.
    float S = 1.0f, dot = 0.0f;
    if (norm_topk_prob) {
      float s = 0.0f, d = 0.0f;
      for (int k = lane; k < K; k += 32) {
        const int e = idx[k];
        const float pk = (e >= 0 && e < E) ? p[e] : 0.0f;
        s += pk;
        d += dw[k] * pk;
      }
      S = warp_sum(s);
      dot = warp_sum(d) / S;
    }
    for (int k = 0; k < K; ++k) {  // in k order, as the CPU adds them
      const int e = idx[k];
      if ((e & 31) != lane) continue;
      const float add = norm_topk_prob ? (dw[k] - dot) / S : dw[k];
#pragma unroll
      for (int j = 0; j < VPL; ++j)
        if (lane + 32 * j == e) g[j] += add;
    }
  }
  float pg = 0.0f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) pg += pv[j] * g[j];
  pg = warp_sum(pg);
  float* dl = dlogits + n * E;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int e = lane + 32 * j;
    if (e < E) dl[e] += pv[j] * (g[j] - pg);
  }
}

// Values per lane for E experts: ceil(E / 32) rounded up to a power of two (1 ... 32).
int values_per_lane(int64_t E) {
  int vpl = 1;
  while (32 * vpl < E) vpl *= 2;
  return vpl;
}

void check_router_sizes(const char* what, int64_t N, int64_t E, int64_t K) {
  NEXTRON_CHECK(N >= 0 && E >= 1 && E <= kMaxExperts, what, ": the number of experts ", E, " must be in [1, ",
                kMaxExperts, "]");
  NEXTRON_CHECK(K >= 1 && K <= E, what, ": top-k ", K, " must be in [1, num_experts = ", E, "]");
}

template <int VPL>
void launch_forward(float* probs, int32_t* indices, float* weights, const float* logits, int64_t N, int64_t E,
                    int64_t K, bool norm, cudaStream_t stream) {
  router_forward_kernel<VPL><<<unsigned(ceil_div(N, kWarpsPerBlock)), 32 * kWarpsPerBlock, 0, stream>>>(
      probs, indices, weights, logits, N, int(E), int(K), norm);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

template <int VPL>
void launch_backward(float* dlogits, const float* dprobs, const float* dweights, const float* probs,
                     const int32_t* indices, int64_t N, int64_t E, int64_t K, bool norm, cudaStream_t stream) {
  router_backward_kernel<VPL><<<unsigned(ceil_div(N, kWarpsPerBlock)), 32 * kWarpsPerBlock, 0, stream>>>(
      dlogits, dprobs, dweights, probs, indices, N, int(E), int(K), norm);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace

void router_forward(float* probs, int32_t* indices, float* weights, const float* logits, int64_t N, int64_t E,
                    int64_t K, bool norm_topk_prob, cudaStream_t stream) {
  check_router_sizes("router_forward", N, E, K);
  if (N == 0) return;
  switch (values_per_lane(E)) {
    case 1:
      return launch_forward<1>(probs, indices, weights, logits, N, E, K, norm_topk_prob, stream);
    case 2:
      return launch_forward<2>(probs, indices, weights, logits, N, E, K, norm_topk_prob, stream);
    case 4:
      return launch_forward<4>(probs, indices, weights, logits, N, E, K, norm_topk_prob, stream);
    case 8:
      return launch_forward<8>(probs, indices, weights, logits, N, E, K, norm_topk_prob, stream);
    case 16:
      return launch_forward<16>(probs, indices, weights, logits, N, E, K, norm_topk_prob, stream);
    default:
      return launch_forward<32>(probs, indices, weights, logits, N, E, K, norm_topk_prob, stream);
  }
}

// One thread per row: K gathers and the sum in the CPU's order (k ascending), so results match it bit for bit.
__global__ void router_weights_from_indices_kernel(float* weights, const float* probs, const int32_t* indices,
                                                   int64_t N, int E, int K, bool norm_topk_prob) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float top = 0.0f;
  for (int k = 0; k < K; ++k) top += (weights[n * K + k] = probs[n * E + indices[n * K + k]]);
  if (norm_topk_prob)
    for (int k = 0; k < K; ++k) weights[n * K + k] /= top;
}

void router_weights_from_indices(float* weights, const float* probs, const int32_t* indices, int64_t N, int64_t E,
                                 int64_t K, bool norm_topk_prob, cudaStream_t stream) {
  check_router_sizes("router_weights_from_indices", N, E, K);
  if (N == 0) return;
  constexpr int kThreadsPerBlock = 256;
  router_weights_from_indices_kernel<<<unsigned(ceil_div(N, kThreadsPerBlock)), kThreadsPerBlock, 0, stream>>>(
      weights, probs, indices, N, int(E), int(K), norm_topk_prob);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void router_backward(float* dlogits, const float* dprobs, const float* dweights, const float* probs,
                     const int32_t* indices, int64_t N, int64_t E, int64_t K, bool norm_topk_prob,
                     cudaStream_t stream) {
  check_router_sizes("router_backward", N, E, K);
  if (N == 0 || (!dprobs && !dweights)) return;
  switch (values_per_lane(E)) {
    case 1:
      return launch_backward<1>(dlogits, dprobs, dweights, probs, indices, N, E, K, norm_topk_prob, stream);
    case 2:
      return launch_backward<2>(dlogits, dprobs, dweights, probs, indices, N, E, K, norm_topk_prob, stream);
    case 4:
      return launch_backward<4>(dlogits, dprobs, dweights, probs, indices, N, E, K, norm_topk_prob, stream);
    case 8:
      return launch_backward<8>(dlogits, dprobs, dweights, probs, indices, N, E, K, norm_topk_prob, stream);
    case 16:
      return launch_backward<16>(dlogits, dprobs, dweights, probs, indices, N, E, K, norm_topk_prob, stream);
    default:
      return launch_backward<32>(dlogits, dprobs, dweights, probs, indices, N, E, K, norm_topk_prob, stream);
  }
}

}  // namespace nextron::cuda
