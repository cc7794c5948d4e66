// Random initialisation of a fresh model, following transformers' Qwen3NextPreTrainedModel._init_weights:
// matrices, embeddings, conv and router ~ N(0, initializer_range), biases 0, zero-centred RMSNorm weights 0,
// the gated DeltaNet norm 1, dt_bias 1, A_log = log(U(0.01, 16)).
//
// Counter-based: element e of parameter `name` (its global name, in the single-device layout) is a function of
// (seed, name, e) alone (splitmix64 of the three; Box-Muller for the normal), so each rank fills just the elements it
// holds, in any layout, and every layout starts from the one-process initialisation bit for bit.
#pragma once

#include <cstdint>
#include <string>

#include "model/param_table.h"

namespace nextron {

enum class ParamInit { normal, zero, one, log_uniform_a };
ParamInit param_init(const std::string& name);

// out[i] = element first + i of parameter `name` (its single-device flat order), for i < count.
void init_parameter_elements(const std::string& name, int64_t first, int64_t count, float* out, uint64_t seed,
                             double initializer_range = 0.02);
// The same for elements [first, first + count) of parameter `spec` in nextron's order, each drawn at its HF element's
// counter (HfPiece::regroup), so that a seed gives the same model as HF tensors whatever row order nextron keeps
// inside (the DeltaNet projections' per-part rows).
void init_parameter_elements(const ParamSpec& spec, int64_t first, int64_t count, float* out, uint64_t seed,
                             double initializer_range = 0.02);
// Every parameter of `table` whose tensors are whole (a model or a pipeline stage of it; a TP or EP slice fills its
// elements through TpShardMap::fill_local).
void init_parameters(const ParamTable& table, float* params, uint64_t seed, double initializer_range = 0.02);

}  // namespace nextron
