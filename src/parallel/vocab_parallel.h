// Vocab-parallel embedding and cross-entropy: under tensor parallelism each TP rank holds rows
// [v_begin, v_begin + V_local) of the embedding table and of lm_head, and the loss is computed from the local
// logit columns with three small TP reductions per row (max, sum of exponentials, target logit): the full (N, V)
// logits are never gathered.
#pragma once

#include <cstdint>

#include "parallel/tensor_parallel.h"

namespace nextron {

// The part of the vocabulary one TP rank holds.
struct VocabShard {
  int64_t begin = 0;  // first token id held
  int64_t size = 0;   // V / TP
  int64_t full = 0;   // V
};

// out (N, H) overwritten: out[n] = table_local[ids[n] - begin] for ids this rank holds, 0 for the others (the sum
// over the TP group is the full lookup). table_local: (V_local, H). Throws for an id outside [0, V).
void vocab_parallel_embedding_forward(float* out, const float* table_local, const int64_t* ids, int64_t N, int64_t H,
                                      const VocabShard& shard);
// Accumulates dtable_local[ids[n] - begin] += dout[n] for the ids this rank holds (deterministic).
void vocab_parallel_embedding_backward(float* dtable_local, const float* dout, const int64_t* ids, int64_t N, int64_t H,
                                       const VocabShard& shard);

// The cross-entropy of cpu::cross_entropy_forward over logits whose columns are split over the TP group:
// logits_local (N, V_local) are columns [begin, begin + V_local). lse (N) and row_loss (N, may be nullptr) are
// written on every rank with the full-vocabulary values; loss_sum / count as in the single-device kernel.
void vocab_parallel_cross_entropy_forward(double* loss_sum, int64_t* count, float* row_loss, float* lse,
                                          const float* logits_local, const int64_t* targets, int64_t N,
                                          const VocabShard& shard, const TensorParallel& tp);
// Accumulates dlogits_local += scale * (softmax - onehot) restricted to the local columns (no communication).
void vocab_parallel_cross_entropy_backward(float* dlogits_local, const float* logits_local, const float* lse,
                                           const int64_t* targets, float scale, int64_t N, const VocabShard& shard);

}  // namespace nextron
