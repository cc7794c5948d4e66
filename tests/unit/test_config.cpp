// Config parsing against the released config and the layer plan transformers derives; every bad value fails
// with a message naming the field.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "core/error.h"
#include "model/config.h"
#include "model/param_table.h"

namespace nextron::test {

namespace {
nlohmann::json official() {
  std::ifstream f(std::string(NEXTRON_SOURCE_DIR) + "/configs/models/qwen3-next-80b-a3b.json");
  return nlohmann::json::parse(f);
}

// Expects from_json(j) to throw an Error whose message contains `needle`.
void expect_error(const nlohmann::json& j, const std::string& needle) {
  try {
    ModelConfig::from_json(j);
    FAIL() << "expected an error mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(Config, OfficialModelLayerPlan) {
  const ModelConfig c = ModelConfig::from_json(official());
  ASSERT_EQ(c.num_hidden_layers, 48);
  int full = 0;
  for (int64_t i = 0; i < 48; ++i) {
    // transformers: full attention where (i + 1) % full_attention_interval == 0.
    const bool expect_full = (i + 1) % 4 == 0;
    EXPECT_EQ(c.layer_types[i] == MixerType::full_attention, expect_full) << i;
    full += expect_full;
    EXPECT_EQ(c.mlp_type(i), MlpType::sparse_moe);
  }
  EXPECT_EQ(full, 12);
  EXPECT_EQ(c.rotary_dim(), 64);
  EXPECT_EQ(c.conv_dim(), 2 * 16 * 128 + 32 * 128);
  // The released model has about 80B parameters (without the MTP head).
  const ParamTable table(c);
  EXPECT_GT(table.total_numel(), 79'000'000'000);
  EXPECT_LT(table.total_numel(), 82'000'000'000);
}

TEST(Config, ExplicitLayerTypesSparseStepAndMlpOnlyLayers) {
  auto j = official();
  j["num_hidden_layers"] = 4;
  j["layer_types"] = {"full_attention", "linear_attention", "linear_attention", "full_attention"};
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.layer_types[0], MixerType::full_attention);
  EXPECT_EQ(c.layer_types[1], MixerType::linear_attention);
  EXPECT_EQ(c.mlp_type(0), MlpType::dense);
  EXPECT_EQ(c.mlp_type(1), MlpType::sparse_moe);
  EXPECT_EQ(c.mlp_type(3), MlpType::dense);  // mlp_only_layers wins
  j["num_experts"] = 0;
  EXPECT_EQ(ModelConfig::from_json(j).num_moe_layers(), 0);
}

TEST(Config, RopeParametersForm) {
  auto j = official();
  j.erase("rope_theta");
  j.erase("partial_rotary_factor");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e6}, {"partial_rotary_factor", 0.5}};
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.rope_theta, 5e6);
  EXPECT_EQ(c.rotary_dim(), 128);
  j["rope_parameters"]["rope_type"] = "yarn";
  expect_error(j, "rope_type");
}

TEST(Config, BadValuesNameTheField) {
  auto j = official();
  j["linear_num_value_heads"] = 24;  // not a multiple of 16 key heads
  expect_error(j, "linear_num_value_heads");
  j = official();
  j["num_key_value_heads"] = 3;
  expect_error(j, "num_key_value_heads");
  j = official();
  j["layer_types"] = {"linear_attention", "full_attention"};
  expect_error(j, "layer_types");
  j = official();
  j["num_hidden_layers"] = 2;
  j["layer_types"] = {"linear_attention", "sliding_attention"};
  expect_error(j, "sliding_attention");
  j = official();
  j["num_experts_per_tok"] = 600;
  expect_error(j, "num_experts_per_tok");
  j = official();
  j["mlp_only_layers"] = {48};
  expect_error(j, "mlp_only_layers");
  j = official();
  j["hidden_act"] = "gelu";
  expect_error(j, "hidden_act");
  j = official();
  j["rope_scaling"] = {{"type", "linear"}};
  expect_error(j, "rope_scaling");
  j = official();
  j["my_new_knob"] = 1;
  expect_error(j, "my_new_knob");
  j = official();
  j["hidden_size"] = "2048";
  expect_error(j, "hidden_size");
  j = official();
  j.erase("vocab_size");
  expect_error(j, "vocab_size");
  j = official();
  j["model_type"] = "qwen3_moe";
  expect_error(j, "model_type");
  j = official();
  j["tie_word_embeddings"] = true;
  expect_error(j, "tie_word_embeddings");
}

TEST(Config, JsonRoundTrip) {
  auto j = official();
  j["mlp_only_layers"] = {0, 5};
  const ModelConfig a = ModelConfig::from_json(j);
  const ModelConfig b = ModelConfig::from_json(a.to_json());
  EXPECT_EQ(a.to_json(), b.to_json());
  EXPECT_EQ(b.mlp_only_layers, (std::vector<int64_t>{0, 5}));
}

// The MoE experts' CUTLASS grouped GEMM (kernels/cuda/grouped_gemm.h) needs every expert's weight rows 16-byte
// aligned (TMA): H and I multiples of 8 and each expert entry's flat offset a multiple of 8 elements (the bf16
// shadow's 16 bytes; the fp32 gradient's then too, as cudaMalloc'd buffers are 256-byte aligned). Otherwise CudaOps
// falls back to one cuBLASLt GEMM per expert with a host wait per layer. The table packs entries back to back, so
// this holds when every entry size is a multiple of 8: checked here for every shipped MoE config, whole and as the
// local slices of TP 1..8 and EP 1..8 that divide it, so that those models always take the grouped path.
TEST(ParamTable, ExpertWeightsAreAlignedForTheGroupedGemm) {
  int checked = 0;
  for (const char* name : {"qwen3-next-tiny", "qwen3-next-small", "qwen3-next-1b", "qwen3-next-1b-real-heads",
                           "qwen3-next-80b-a3b", "qwen3-next-80b-a3b-64e"}) {
    const ModelConfig config =
        ModelConfig::from_file(std::string(NEXTRON_SOURCE_DIR) + "/configs/models/" + name + ".json");
    if (config.num_experts == 0) continue;
    for (int tp : {1, 2, 4, 8})
      for (int ep : {1, 2, 4, 8}) {
        if (config.num_experts % ep != 0 || config.moe_intermediate_size % tp != 0 ||
            config.linear_num_key_heads % tp != 0 || config.num_attention_heads % tp != 0)
          continue;
        ModelConfig local = tp_local_config(config, tp);
        if (ep > 1) local = ep_local_config(local, ep, ep - 1);
        SCOPED_TRACE(std::string(name) + " TP" + std::to_string(tp) + " EP" + std::to_string(ep));
        EXPECT_EQ(local.hidden_size % 8, 0);
        EXPECT_EQ(local.moe_intermediate_size % 8, 0);
        const ParamTable table(local);
        for (const ParamSpec& s : table.specs())
          if (s.kind == ParamKind::expert) {
            EXPECT_EQ(s.offset % 8, 0) << s.name << " at " << s.offset;
            ++checked;
          }
      }
  }
  EXPECT_GT(checked, 100);
}

}  // namespace nextron::test
