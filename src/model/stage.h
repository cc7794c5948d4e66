// A pipeline stage of the model: a contiguous range of decoder layers, with the embedding on the first stage and the
// final norm, lm_head and loss on the last. The whole model is the one stage that is both. Parameters keep their
// global names (layers.7.* is layers.7.* on whichever stage holds it), so checkpoints and HF names do not depend on
// the split.
#pragma once

#include <cstdint>
#include <string>

#include "model/config.h"

namespace nextron {

struct StageRange {
  int64_t layer_begin = 0, layer_end = -1;  // decoder layers [begin, end); end -1: to the last layer
  bool first = true;                        // holds the embedding (its input is token ids)
  bool last = true;                         // holds the final norm, lm_head and the loss

  // The whole model of `config`.
  static StageRange whole(const ModelConfig& config) { return {0, config.num_hidden_layers, true, true}; }
  // end resolved against config (-1 -> num_hidden_layers).
  int64_t end(const ModelConfig& config) const { return layer_end < 0 ? config.num_hidden_layers : layer_end; }
  int64_t num_layers(const ModelConfig& config) const { return end(config) - layer_begin; }
  bool is_whole(const ModelConfig& config) const {
    return first && last && layer_begin == 0 && end(config) == config.num_hidden_layers;
  }
  // Throws nextron::Error for a range outside the model (or an empty middle stage).
  void validate(const ModelConfig& config) const;
  std::string describe(const ModelConfig& config) const;  // e.g. "embedding + layers 0-3"
};

}  // namespace nextron
