// The counter-based initialisation (model/init.h): any run of elements of a parameter equals the same elements of the
// whole parameter's initialisation (what lets each rank fill only its slice); the distributions are transformers'
// (normal with the configured std, A_log = log U(0.01, 16), norms and biases by rule), checked by their moments; and
// the numbers depend on the seed and on the parameter, not on the table they sit in.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "model/init.h"
#include "model/param_table.h"

namespace nextron::test {

TEST(Init, AnyRunOfElementsEqualsTheWholeParameter) {
  const std::string name = "layers.0.mlp.experts.gate_up_proj";
  std::vector<float> whole(1000), part(137);
  init_parameter_elements(name, 0, 1000, whole.data(), 5, 0.02);
  init_parameter_elements(name, 411, 137, part.data(), 5, 0.02);
  for (size_t i = 0; i < part.size(); ++i) EXPECT_EQ(part[i], whole[411 + i]) << i;
  std::vector<float> other(1000), reseeded(1000);
  init_parameter_elements("layers.1.mlp.experts.gate_up_proj", 0, 1000, other.data(), 5, 0.02);
  init_parameter_elements(name, 0, 1000, reseeded.data(), 6, 0.02);
  EXPECT_NE(other, whole);
  EXPECT_NE(reseeded, whole);
}

// The DeltaNet projections keep their rows per part inside nextron (HfRowGroups) but are drawn at their HF
// elements' counters: the whole parameter, seen in HF order, is the name-keyed draw in element order (the model a
// seed gave before the rows were regrouped), and any slice equals the whole's elements (what a TP rank fills).
TEST(Init, RegroupedRowsAreDrawnInHfOrder) {
  const ModelConfig config = read_hf_config(std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe");
  const ParamTable table(config);
  int64_t layer = 0;
  while (config.layer_types[layer] != MixerType::linear_attention) ++layer;
  for (const char* name : {"in_proj_qkvz", "in_proj_ba"}) {
    const ParamSpec& spec = table.get("layers." + std::to_string(layer) + ".linear_attn." + name);
    ASSERT_GT(spec.hf.at(0).regroup.groups, 0) << name;
    const int64_t n = spec.numel();
    std::vector<float> ours(n), hf_draw(n), slice(n / 3);
    init_parameter_elements(spec, 0, n, ours.data(), 9, 0.02);
    init_parameter_elements(spec.name, 0, n, hf_draw.data(), 9, 0.02);
    EXPECT_EQ(in_hf_order(spec.hf.at(0), ours.data()), hf_draw) << name;
    EXPECT_NE(ours, hf_draw) << name;  // the rows did move
    init_parameter_elements(spec, n / 5, n / 3, slice.data(), 9, 0.02);
    EXPECT_TRUE(std::equal(slice.begin(), slice.end(), ours.begin() + n / 5)) << name;
  }
}

TEST(Init, DistributionsFollowTransformers) {
  const int64_t n = 200000;
  std::vector<float> v(n);
  init_parameter_elements("layers.0.self_attn.q_proj", 0, n, v.data(), 1, 0.02);
  double mean = 0, sq = 0;
  for (float x : v) {
    mean += x;
    sq += double(x) * x;
  }
  mean /= n;
  const double sd = std::sqrt(sq / n - mean * mean);
  // Standard errors: 0.02 / sqrt(n) = 4.5e-5 for the mean, 0.02 / sqrt(2n) = 3.2e-5 for the std: 5 of them.
  EXPECT_NEAR(mean, 0.0, 2.3e-4);
  EXPECT_NEAR(sd, 0.02, 1.6e-4);
  init_parameter_elements("layers.0.linear_attn.A_log", 0, n, v.data(), 1, 0.02);
  double a_mean = 0;
  for (float x : v) {
    EXPECT_GE(x, std::log(0.01f) - 1e-6f);
    EXPECT_LE(x, std::log(16.0f) + 1e-6f);
    a_mean += std::exp(double(x));
  }
  EXPECT_NEAR(a_mean / n, (0.01 + 16.0) / 2, 5 * 16 / std::sqrt(12.0 * n));  // exp(A_log) ~ U(0.01, 16)
  for (const auto& [param, value] : std::vector<std::pair<std::string, float>>{{"layers.0.linear_attn.dt_bias", 1.0f},
                                                                               {"layers.0.linear_attn.norm", 1.0f},
                                                                               {"layers.0.input_layernorm", 0.0f},
                                                                               {"norm", 0.0f}}) {
    init_parameter_elements(param, 0, 10, v.data(), 1, 0.02);
    for (int i = 0; i < 10; ++i) EXPECT_EQ(v[i], value) << param;
  }
}

TEST(Init, AStageHoldsTheWholeModelsNumbers) {
  const ModelConfig config = read_hf_config(std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe");
  const ParamTable whole(config), stage(config, StageRange{2, config.num_hidden_layers, false, true});
  std::vector<float> w(whole.total_numel()), s(stage.total_numel());
  init_parameters(whole, w.data(), 9, 0.1);
  init_parameters(stage, s.data(), 9, 0.1);
  for (const ParamSpec& p : stage.specs()) {
    const ParamSpec& f = whole.get(p.name);
    for (int64_t i = 0; i < p.numel(); ++i) ASSERT_EQ(s[p.offset + i], w[f.offset + i]) << p.name;
  }
}

}  // namespace nextron::test
