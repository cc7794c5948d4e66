#include "model/recompute.h"

#include <algorithm>

#include "core/error.h"

namespace nextron {

const std::vector<std::string>& recomputable_modules() {
  static const std::vector<std::string> names = {"core_attn",      "layernorm",        "mlp", "moe", "moe_act",
                                                 "shared_experts", "delta_rule_states"};
  return names;
}

bool RecomputeOptions::recomputes_module(const std::string& name) const {
  return granularity == "selective" && std::find(modules.begin(), modules.end(), name) != modules.end();
}

void RecomputeOptions::validate() const {
  NEXTRON_CHECK(granularity.empty() || granularity == "full" || granularity == "selective", "--recompute-granularity ",
                granularity, ": use full or selective (or leave it unset)");
  if (granularity.empty()) {
    NEXTRON_CHECK(method.empty() && num_layers == 0 && modules.empty(),
                  "--recompute-method/--recompute-num-layers/--recompute-modules without --recompute-granularity: "
                  "set --recompute-granularity full (method, layers) or selective (modules)");
    return;
  }
  if (granularity == "full") {
    NEXTRON_CHECK(method == "uniform" || method == "block", "--recompute-granularity full needs --recompute-method ",
                  "uniform or block", method.empty() ? "" : ", not " + method);
    NEXTRON_CHECK(num_layers >= 1, "--recompute-granularity full needs --recompute-num-layers >= 1 (",
                  method == "uniform" ? "layers per recomputed group" : "recomputed layers per pipeline stage", ")");
    NEXTRON_CHECK(modules.empty(), "--recompute-modules applies to --recompute-granularity selective, not full");
    return;
  }
  NEXTRON_CHECK(method.empty() && num_layers == 0,
                "--recompute-method and --recompute-num-layers apply to --recompute-granularity full, not selective");
  std::string known;
  for (const std::string& m : recomputable_modules()) known += (known.empty() ? "" : ", ") + m;
  NEXTRON_CHECK(!modules.empty(), "--recompute-granularity selective needs --recompute-modules (here: ", known, ")");
  for (const std::string& m : modules)
    NEXTRON_CHECK(
        std::find(recomputable_modules().begin(), recomputable_modules().end(), m) != recomputable_modules().end(),
        "--recompute-modules ", m, ": ", m == "mla_up_proj" ? "this model has no MLA; " : "unknown; ",
        "recomputable here: ", known);
}

std::vector<RecomputeGroup> recompute_groups(const RecomputeOptions& options, int64_t layers) {
  std::vector<RecomputeGroup> groups;
  const bool full = options.granularity == "full";
  if (full && options.method == "uniform") {
    for (int64_t b = 0; b < layers; b += options.num_layers)
      groups.push_back({b, std::min(layers, b + options.num_layers), true});
    return groups;
  }
  for (int64_t i = 0; i < layers; ++i) groups.push_back({i, i + 1, full && i < options.num_layers});
  return groups;
}

}  // namespace nextron
