// Token embedding lookup (model.embed_tokens): rows of a (V, H) table gathered by token id.
#pragma once

#include <cstdint>

namespace nextron::cpu {

// table: (V, H), ids: (N), out: (N, H) overwritten with out[n] = table[ids[n]].
// Throws nextron::Error naming the id and the vocab size when an id is outside [0, V).
template <typename T>
void embedding_forward(T* out, const T* table, const int64_t* ids, int64_t N, int64_t H, int64_t V);

// Accumulates: dtable[ids[n]] += dout[n] for every n (repeated ids sum; race-free, deterministic).
// dout: (N, H), dtable: (V, H). Same id check as the forward.
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int64_t* ids, int64_t N, int64_t H, int64_t V);

}  // namespace nextron::cpu
