// MoE load-balancing (auxiliary) loss, transformers' load_balancing_loss_func without attention mask, split into
// per-layer statistics and a final value so the statistics can be summed over all MoE layers (and all-reduced
// across ranks) before the loss is formed:
//   aux = E * sum_e (count_sum_e / total_rows) * (prob_sum_e / total_rows)
// where, over every MoE layer of the step, count_sum_e is the number of top-k slots routed to expert e,
// prob_sum_e the summed router probability of e, and total_rows the number of token rows (not times K, so
// sum_e count_sum_e / total_rows = K). probs are the router softmax (router.h's probs; transformers' router returns
// raw logits and this function applies the softmax once); router_backward carries dprobs to the router logits.
#pragma once

#include <cstdint>

namespace nextron::cpu {

// Accumulates one layer: count_sum (E) += top-k assignments per expert, prob_sum (E) += sum over rows of probs.
// probs: (N, E), indices: (N, K). Throws nextron::Error for an index outside [0, E).
template <typename T>
void aux_stats_accumulate(T* count_sum, T* prob_sum, const T* probs, const int32_t* indices, int64_t N, int64_t E,
                          int64_t K);

// The loss value from statistics summed over all layers (and ranks); total_rows = sum of N over those layers.
template <typename T>
double aux_loss_value(const T* count_sum, const T* prob_sum, double total_rows, int64_t E);

// Accumulates one layer's dprobs (N, E) += daux * d aux / d probs = daux * E * count_sum_e / total_rows^2
// (the counts come from a discrete top-k and are constants). count_sum and total_rows: the same global values as
// aux_loss_value; daux: gradient of the total loss w.r.t. aux (e.g. router_aux_loss_coef).
template <typename T>
void aux_loss_backward(T* dprobs, const T* count_sum, T total_rows, T daux, int64_t N, int64_t E);

}  // namespace nextron::cpu
