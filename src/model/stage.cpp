#include "model/stage.h"

#include "core/error.h"

namespace nextron {

void StageRange::validate(const ModelConfig& config) const {
  const int64_t L = config.num_hidden_layers, e = end(config);
  NEXTRON_CHECK(layer_begin >= 0 && layer_begin <= e && e <= L, "pipeline stage: layers [", layer_begin, ", ", e,
                ") are not inside the model's ", L, " layers");
  NEXTRON_CHECK(first || last || e > layer_begin, "pipeline stage: a stage with neither the embedding nor the loss ",
                "must hold at least one layer");
  NEXTRON_CHECK(!first || layer_begin == 0, "pipeline stage: the first stage must start at layer 0, not ", layer_begin);
  NEXTRON_CHECK(!last || e == L, "pipeline stage: the last stage must end at layer ", L, ", not ", e);
}

std::string StageRange::describe(const ModelConfig& config) const {
  std::string s = first ? "embedding" : "";
  const int64_t e = end(config);
  if (e > layer_begin) {
    if (!s.empty()) s += " + ";
    s += e - layer_begin == 1 ? detail::concat("layer ", layer_begin)
                              : detail::concat("layers ", layer_begin, "-", e - 1);
  }
  if (last) s += s.empty() ? "loss" : " + loss";
  return s;
}

}  // namespace nextron
