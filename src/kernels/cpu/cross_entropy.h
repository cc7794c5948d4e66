// Token-level cross-entropy on logits (the language-model loss), with transformers' ignore_index -100.
#pragma once

#include <cstdint>

#include "kernels/vocab_shard.h"

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

// --- Vocab-parallel cross-entropy (Megatron's): the logit columns are split over the tensor-parallel ranks, and
// the loss is assembled from three numbers per row and rank instead of gathering the (N, V) logits.
// 1. Per rank, over its columns: logits_local (N, vocab.size) are ids [vocab.begin, +vocab.size). Overwrites
//    stats (3, N): [0] the row max m, [1] sum of exp(x - m) (accumulated in double), [2] the target's logit when
//    this rank holds the target, else 0.
void cross_entropy_partial(float* stats, const float* logits_local, const int64_t* targets, int64_t N,
                           const VocabShard& vocab);
// 2. After an all-gather of the P ranks' stats (P, 3, N): lse = M + log(sum_r s_r exp(m_r - M)) with M the largest
//    m_r, row loss = lse - sum_r target logit_r (0 on ignored rows), in double. Overwrites lse, row_loss (N; may be
//    nullptr); *loss_sum = sum of the row losses in row order. Throws for a target outside [0, V_full) that is
//    not kIgnoreIndex.
void cross_entropy_combine(double* loss_sum, float* row_loss, float* lse, const float* stats, int64_t P,
                           const int64_t* targets, int64_t N, int64_t V_full);
// 3. Accumulates dlogits_local += scale * (softmax - onehot) restricted to this rank's columns (no communication).
template <typename T>
void cross_entropy_backward(T* dlogits_local, const T* logits_local, const T* lse, const int64_t* targets, T scale,
                            int64_t N, const VocabShard& vocab);

}  // namespace nextron::cpu
