// Softmax top-k MoE router (Qwen3NextTopKRouter after its gate projection): probabilities, the chosen experts and
// their routing weights. The gate projection itself is a linear layer (kernels/cpu/linear.h).
#pragma once

#include <cstdint>

namespace nextron::cpu {

// logits: (N, E) router logits. Overwrites
//   probs (N, E): softmax of each row (what load_balancing.h consumes),
//   indices (N, K): the K largest probs of each row in descending order (ties: lower expert index first),
//   weights (N, K): those probs, divided by their sum when norm_topk_prob.
template <typename T>
void router_forward(T* probs, int32_t* indices, T* weights, const T* logits, int64_t N, int64_t E, int64_t K,
                    bool norm_topk_prob);

// Routing replay (the experts were chosen elsewhere, e.g. by a reference run): overwrites weights (N, K) with
// probs (N, E) at the given indices (N, K, each in [0, E)), divided by their sum when norm_topk_prob, i.e. what
// router_forward computes for its own choice. router_backward is unchanged: it only reads the indices.
template <typename T>
void router_weights_from_indices(T* weights, const T* probs, const int32_t* indices, int64_t N, int64_t E, int64_t K,
                                 bool norm_topk_prob);

// Accumulates dlogits (N, E) += softmax Jacobian^T g, where g = dprobs (N, E; nullptr = 0, e.g. the aux-loss
// gradient) + dweights (N, K; nullptr = 0) scattered to the selected experts (through the renormalisation when
// norm_topk_prob). The selection itself is piecewise constant and carries no gradient.
// probs, indices: from the forward.
template <typename T>
void router_backward(T* dlogits, const T* dprobs, const T* dweights, const T* probs, const int32_t* indices, int64_t N,
                     int64_t E, int64_t K, bool norm_topk_prob);

}  // namespace nextron::cpu
