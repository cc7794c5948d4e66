// What a model keeps between decoding steps (generation): per sequence slot, the tokens it has seen and, per layer,
//   Gated DeltaNet: the last KC-1 conv inputs and the recurrent state, so a new token costs O(1) whatever the
//                   context (the conv reads its window, the delta rule one step of its state);
//   gated attention: the keys (after k_norm and RoPE) and values of every position so far.
// Owned by the caller, like an activation record: a model can serve several caches, and a cache's slots hold
// independent sequences of different lengths (a batch of prompts decodes together). Built by
// Model::new_inference_cache; Model::forward_cached reads and extends it.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace nextron {

struct LayerCache {
  // Gated DeltaNet layers (undefined tensors in attention layers).
  Tensor conv;   // (B, KC - 1, CD) act: the conv inputs [q | k | v] of the last KC-1 tokens (zeros before the first)
  Tensor state;  // (B, Hv, dk, dv) f32: the delta rule's state after the last token
  // Gated attention layers (undefined in DeltaNet layers). C: the capacity in positions.
  Tensor k, v;  // (B, C, NKV, D) act: keys after k_norm and RoPE, values; rows [0, length[b]) are filled
};

struct InferenceCache {
  int64_t batch = 0;               // B sequence slots
  int64_t capacity = 0;            // C positions per slot (the longest prompt + new tokens it can hold)
  std::vector<int64_t> length;     // (B) tokens each slot has seen
  std::vector<LayerCache> layers;  // one per decoder layer (L)
  // Forgets slot b's sequence (its next forward starts at position 0 from zero states).
  void reset_slot(int64_t b);
};

}  // namespace nextron
