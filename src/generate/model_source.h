// Where generation (and other one-process tools) take a model from: an HF checkpoint directory (config.json +
// safetensors), a training checkpoint (nextron-train's SAVE/step_N, any layout: it holds the whole model's
// parameters), or a training run's SAVE folder (its newest complete checkpoint).
#pragma once

#include <string>

#include "model/config.h"
#include "model/model.h"

namespace nextron {

struct ModelSource {
  enum class Kind { hf, training } kind = Kind::hf;
  std::string dir;     // the directory the weights are read from (a SAVE folder resolved to its step)
  ModelConfig config;  // the model it holds
};

// Inspects `path` (reads configs only). Throws nextron::Error naming the path and what it expected.
ModelSource open_model_source(const std::string& path);
// Fills the model's parameters (built from source.config, one process) and refreshes its activation copy.
void load_model_weights(const ModelSource& source, Model& model);

}  // namespace nextron
