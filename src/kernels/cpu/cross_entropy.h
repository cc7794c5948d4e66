// Token-level cross-entropy on logits (the language-model loss), with transformers' ignore_index -100.
#pragma once

#include <cstdint>

namespace nextron::cpu {

inline constexpr int64_t kIgnoreIndex = -100;

// logits: (N, V), targets: (N) in [0, V) or kIgnoreIndex.
// Overwrites lse (N) with logsumexp of every row (max-subtracted; kept for the backward) and, unless nullptr,
// row_loss (N) with lse[n] - logits[n, targets[n]] (0 for ignored rows). *loss_sum = sum of the row losses (in
// double, summed in row order), *count = number of non-ignored rows; the mean loss is loss_sum / count.
// Throws nextron::Error for a target outside [0, V) that is not kIgnoreIndex.
template <typename T>
void cross_entropy_forward(double* loss_sum, int64_t* count, T* row_loss, T* lse, const T* logits,
                           const int64_t* targets, int64_t N, int64_t V);

// Accumulates: dlogits[n] += scale * (softmax(logits[n]) - onehot(targets[n])) for non-ignored rows (ignored rows
// untouched). scale is d loss / d loss_sum: 1 / count for the mean loss. lse: from the forward.
template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const T* lse, const int64_t* targets, T scale, int64_t N,
                            int64_t V);

}  // namespace nextron::cpu
