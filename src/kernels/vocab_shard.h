// Which token ids a vocabulary-indexed operand holds: the embedding table's rows and lm_head's logit columns are
// ids [begin, begin + size) of a vocabulary of `full` ids. One device holds the whole vocabulary; under tensor
// parallelism each TP rank holds a contiguous slice (vocab-parallel embedding and cross-entropy, as in Megatron).
#pragma once

#include <cstdint>

namespace nextron {

struct VocabShard {
  int64_t begin = 0;  // first id held
  int64_t size = 0;   // ids held (the table's rows, the logits' columns)
  int64_t full = 0;   // ids in the vocabulary

  static VocabShard whole(int64_t V) { return {0, V, V}; }
  bool holds(int64_t id) const { return id >= begin && id < begin + size; }
  bool partial() const { return size != full; }
};

}  // namespace nextron
