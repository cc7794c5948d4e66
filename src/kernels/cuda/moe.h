// MoE routing and token movement on the GPU (CPU references: kernels/cpu/router.h, moe_experts.h,
// load_balancing.h). Deterministic throughout: the dispatch is a stable counting sort, unpermute sums a token's
// top-k slots in k order, no atomics whose order varies.
#pragma once

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// Softmax top-k router. logits: (N, E) fp32. Overwrites probs (N, E) fp32, indices (N, K) int32 (descending prob,
// ties: lower expert first), weights (N, K) fp32 (renormalised when norm_topk_prob). One warp per row; E <= 1024.
void router_forward(float* probs, int32_t* indices, float* weights, const float* logits, int64_t N, int64_t E,
                    int64_t K, bool norm_topk_prob, cudaStream_t stream);
// Routing replay: overwrites weights (N, K) with probs (N, E) at the given indices (N, K), renormalised when
// norm_topk_prob (CPU reference: cpu::router_weights_from_indices). The indices must be in [0, E) (the caller
// checks them on the host before they are uploaded).
void router_weights_from_indices(float* weights, const float* probs, const int32_t* indices, int64_t N, int64_t E,
                                 int64_t K, bool norm_topk_prob, cudaStream_t stream);
// Accumulates dlogits (N, E) fp32 from dprobs (N, E; nullptr = 0) and dweights (N, K; nullptr = 0).
void router_backward(float* dlogits, const float* dprobs, const float* dweights, const float* probs,
                     const int32_t* indices, int64_t N, int64_t E, int64_t K, bool norm_topk_prob, cudaStream_t stream);

// The (token, k) slots sorted by expert (stable: within an expert, increasing n * K + k), all on the device:
// expert_offsets (E + 1) int64, slot_token (N K) int32 token of each sorted slot, slot_of (N K) int32 sorted
// position of slot n * K + k. An index outside [0, E) sets *bad_index (device int32, may be nullptr) to 1 (the
// outputs are then unspecified). E <= 2048; N K < 2^31.
void moe_dispatch_build(int64_t* expert_offsets, int32_t* slot_token, int32_t* slot_of, const int32_t* indices,
                        int64_t N, int64_t K, int64_t E, int32_t* bad_index, cudaStream_t stream);
// xs (N K, H) = x[slot_token[s]] (gather into expert order). Overwrites xs.
void moe_permute(bf16* xs, const bf16* x, const int32_t* slot_token, int64_t NK, int64_t H, cudaStream_t stream);
// Accumulates dx[n] += sum_k dxs[slot_of[n K + k]] (k in order).
void moe_permute_backward(bf16* dx, const bf16* dxs, const int32_t* slot_of, int64_t N, int64_t K, int64_t H,
                          cudaStream_t stream);
// y[n] = sum_k weights[n, k] ys[slot_of[n K + k]] (fp32 sum, k in order). Overwrites y (N, H).
void moe_unpermute(bf16* y, const bf16* ys, const float* weights, const int32_t* slot_of, int64_t N, int64_t K,
                   int64_t H, cudaStream_t stream);
// Backward of moe_unpermute: dys[slot_of[n K + k]] = weights[n, k] dy[n] (overwrites dys (N K, H)); accumulates
// dweights[n, k] += dy[n] . ys[slot] (fp32; may be nullptr).
void moe_unpermute_backward(bf16* dys, float* dweights, const bf16* dy, const bf16* ys, const float* weights,
                            const int32_t* slot_of, int64_t N, int64_t K, int64_t H, cudaStream_t stream);

// Load-balancing statistics of one layer: count_sum (E) += top-k assignments (indices outside [0, E) are not
// counted), prob_sum (E) += column sums of probs (fp32, deterministic). The loss value and its backward are formed
// as in kernels/cpu/load_balancing.h; aux_loss_backward: dprobs (N, E) += daux * E * count_sum[e] / total_rows^2.
void aux_stats_accumulate(float* count_sum, float* prob_sum, const float* probs, const int32_t* indices, int64_t N,
                          int64_t E, int64_t K, cudaStream_t stream);
void aux_loss_backward(float* dprobs, const float* count_sum, float total_rows, float daux, int64_t N, int64_t E,
                       cudaStream_t stream);

}  // namespace nextron::cuda
