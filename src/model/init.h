// Random initialisation of a fresh model, following transformers' Qwen3NextPreTrainedModel._init_weights:
// matrices, embeddings, conv and router ~ N(0, initializer_range), biases 0, zero-centred RMSNorm weights 0,
// the gated DeltaNet norm 1, dt_bias 1, A_log = log(U(0.01, 16)).
#pragma once

#include <cstdint>

#include "model/param_table.h"

namespace nextron {

void init_parameters(const ParamTable& table, float* params, uint64_t seed, double initializer_range = 0.02);

}  // namespace nextron
