// Token embedding lookup (model.embed_tokens): rows of a (V, H) table gathered by token id.
#pragma once

#include <cstdint>

#include "kernels/vocab_shard.h"

namespace nextron::cpu {

// table: (vocab.size, H) holding ids [vocab.begin, vocab.begin + vocab.size); ids: (N); out: (N, H) overwritten with
// out[n] = table[ids[n] - vocab.begin] for the ids held and 0 for the others (under tensor parallelism the sum over
// the TP ranks is the full lookup). Throws nextron::Error naming the id and the vocab size when an id is outside
// [0, vocab.full).
template <typename T>
void embedding_forward(T* out, const T* table, const int64_t* ids, int64_t N, int64_t H, const VocabShard& vocab);

// Accumulates: dtable[ids[n] - vocab.begin] += dout[n] for every id held (repeated ids sum; race-free,
// deterministic). dout: (N, H), dtable: (vocab.size, H). Same id check as the forward.
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int64_t* ids, int64_t N, int64_t H, const VocabShard& vocab);

// The whole vocabulary of V ids.
template <typename T>
void embedding_forward(T* out, const T* table, const int64_t* ids, int64_t N, int64_t H, int64_t V) {
  embedding_forward(out, table, ids, N, H, VocabShard::whole(V));
}
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int64_t* ids, int64_t N, int64_t H, int64_t V) {
  embedding_backward(dtable, dout, ids, N, H, VocabShard::whole(V));
}

}  // namespace nextron::cpu
