// The model FLOPs formula (src/model/flops.h, docs/mfu.md): hand-computed numbers for a tiny config, only active
// experts counting, agreement with a parameter count of the matmul weights, and the measured CPU GEMM peak.
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "core/peak_flops.h"
#include "model/config.h"
#include "model/flops.h"
#include "model/param_table.h"

namespace nextron::test {

namespace {
// Two layers: 0 = DeltaNet + MoE, 1 = full attention + dense MLP (mlp_only_layers). Head dims chosen unequal
// (dk 8, dv 6) so a swapped term shows up.
nlohmann::json tiny_json() {
  return {{"model_type", "qwen3_next"},
          {"vocab_size", 32},
          {"hidden_size", 16},
          {"intermediate_size", 24},
          {"num_hidden_layers", 2},
          {"layer_types", {"linear_attention", "full_attention"}},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", 8},
          {"linear_num_key_heads", 2},
          {"linear_num_value_heads", 4},
          {"linear_key_head_dim", 8},
          {"linear_value_head_dim", 6},
          {"linear_conv_kernel_dim", 4},
          {"num_experts", 8},
          {"num_experts_per_tok", 2},
          {"moe_intermediate_size", 12},
          {"shared_expert_intermediate_size", 10},
          {"mlp_only_layers", {1}}};
}

ModelConfig tiny() { return ModelConfig::from_json(tiny_json()); }

nlohmann::json official_json() {
  std::ifstream f(std::string(NEXTRON_SOURCE_DIR) + "/configs/models/qwen3-next-80b-a3b.json");
  return nlohmann::json::parse(f);
}

// 2 x (the weights a token multiplies by): every 2-D parameter except the embedding (a lookup), routed experts
// scaled by K / E (a token visits K of the E experts). The depthwise conv (conv_dim, Kc) costs 2 * Kc per channel,
// the same as its parameter count, so it is included too.
double two_n_matmul(const ModelConfig& c) {
  const ParamTable table(c);
  double dense = 0, expert = 0;
  for (const ParamSpec& s : table.specs()) {
    if (s.shape.size() < 2 || s.name == "embed_tokens") continue;
    (s.kind == ParamKind::expert ? expert : dense) += static_cast<double>(s.numel());
  }
  const double active =
      c.num_experts > 0 ? static_cast<double>(c.num_experts_per_tok) / static_cast<double>(c.num_experts) : 0.0;
  return 2.0 * (dense + active * expert);
}
}  // namespace

TEST(Flops, TinyConfigClosedForm) {
  const FlopsBreakdown f = model_flops_breakdown(tiny(), 16);  // C = min(64, 16) = 16
  // Layer 0, DeltaNet: key_dim 2*8 = 16, value_dim 4*6 = 24, conv_dim 2*16 + 24 = 56.
  EXPECT_DOUBLE_EQ(f.deltanet_proj, 2560.0 + 256.0 + 768.0);  // qkvz 2*16*80, ba 2*16*8, out 2*24*16
  EXPECT_DOUBLE_EQ(f.deltanet_conv, 448.0);                   // 2*4*56
  EXPECT_DOUBLE_EQ(f.deltanet_core, 5760.0);                  // 4 * (6*16*8 + 4*16*6 + 6*8*6) = 4 * 1440
  // Layer 0, MoE: router 2*16*8; 2 active experts x 3 x 2*16*12; shared 3 x 2*16*10 + gate 2*16.
  EXPECT_DOUBLE_EQ(f.moe_router, 256.0);
  EXPECT_DOUBLE_EQ(f.moe_experts, 2304.0);
  EXPECT_DOUBLE_EQ(f.moe_shared, 960.0 + 32.0);
  // Layer 1, attention: q 2*16*64, k and v 2*16*16, o 2*32*16; core 2*2*8*4 * (16+1)/2.
  EXPECT_DOUBLE_EQ(f.attention_proj, 2048.0 + 512.0 + 512.0 + 1024.0);
  EXPECT_DOUBLE_EQ(f.attention_core, 1088.0);
  // Layer 1, dense MLP: 3 x 2*16*24.
  EXPECT_DOUBLE_EQ(f.dense_mlp, 2304.0);
  EXPECT_DOUBLE_EQ(f.lm_head, 1024.0);  // 2*16*32
  EXPECT_DOUBLE_EQ(f.total(), 21856.0);
  EXPECT_DOUBLE_EQ(model_flops_per_token(tiny(), 16), 21856.0);
  EXPECT_DOUBLE_EQ(training_flops_per_token(tiny(), 16), 3.0 * 21856.0);
}

TEST(Flops, ChunkIsCappedAt64AndAttentionGrowsWithContext) {
  const FlopsBreakdown f = model_flops_breakdown(tiny(), 200);
  EXPECT_DOUBLE_EQ(f.deltanet_core, 19584.0);   // 4 * (6*64*8 + 4*64*6 + 6*8*6) = 4 * 4896
  EXPECT_DOUBLE_EQ(f.attention_core, 12864.0);  // 2*2*8*4 * 201/2
  // Everything else is independent of the sequence length.
  const FlopsBreakdown g = model_flops_breakdown(tiny(), 16);
  EXPECT_DOUBLE_EQ(f.total() - f.deltanet_core - f.attention_core, g.total() - g.deltanet_core - g.attention_core);
  // One token: no chunk beyond itself (C = 1) and a context of one key.
  const FlopsBreakdown one = model_flops_breakdown(tiny(), 1);
  EXPECT_DOUBLE_EQ(one.deltanet_core, 4.0 * (6 * 8 + 4 * 6 + 6 * 8 * 6));
  EXPECT_DOUBLE_EQ(one.attention_core, 2.0 * 2.0 * 8 * 4);
}

TEST(Flops, OnlyActiveExpertsCount) {
  auto j = tiny_json();
  const double base = model_flops_per_token(ModelConfig::from_json(j), 128);
  // Twice the experts, same top-k: only the router (H -> E) grows, by 2 * 16 * 8 more logits.
  j["num_experts"] = 16;
  const FlopsBreakdown more = model_flops_breakdown(ModelConfig::from_json(j), 128);
  EXPECT_DOUBLE_EQ(more.total() - more.moe_router, base - 256.0);
  EXPECT_DOUBLE_EQ(more.moe_experts, 2304.0);
  // Twice the top-k: twice the expert FLOPs.
  j["num_experts_per_tok"] = 4;
  EXPECT_DOUBLE_EQ(model_flops_breakdown(ModelConfig::from_json(j), 128).moe_experts, 2.0 * 2304.0);
  // No shared expert: neither it nor its gate is counted.
  j["shared_expert_intermediate_size"] = 0;
  EXPECT_DOUBLE_EQ(model_flops_breakdown(ModelConfig::from_json(j), 128).moe_shared, 0.0);
}

TEST(Flops, DenseModelIsTwoFlopsPerMatmulWeightPlusMixerCores) {
  auto j = tiny_json();
  j["num_experts"] = 0;
  j["num_hidden_layers"] = 4;
  j["layer_types"] = {"linear_attention", "full_attention", "linear_attention", "linear_attention"};
  j["mlp_only_layers"] = nlohmann::json::array();
  const ModelConfig c = ModelConfig::from_json(j);
  for (int64_t seq : {1, 16, 64, 1000}) {
    const FlopsBreakdown f = model_flops_breakdown(c, seq);
    const double cores = f.attention_core + f.deltanet_core;
    EXPECT_DOUBLE_EQ(f.total(), two_n_matmul(c) + cores) << seq;
    // Training: the familiar 6 N plus 3 x the sequence-mixing cores.
    EXPECT_DOUBLE_EQ(training_flops_per_token(c, seq), 3.0 * two_n_matmul(c) + 3.0 * cores) << seq;
  }
}

TEST(Flops, MoeModelCountsActiveParameters) {
  const ModelConfig c = tiny();
  const FlopsBreakdown f = model_flops_breakdown(c, 16);
  EXPECT_DOUBLE_EQ(f.total(), two_n_matmul(c) + f.attention_core + f.deltanet_core);
}

TEST(Flops, OfficialModelAt4096) {
  const ModelConfig c = ModelConfig::from_json(official_json());
  const FlopsBreakdown f = model_flops_breakdown(c, 4096);
  // Matmuls are 2 x the ~3B active weights (docs/mfu.md): 36 DeltaNet + 12 attention layers, 10 of 512 experts.
  EXPECT_DOUBLE_EQ(f.total(), two_n_matmul(c) + f.attention_core + f.deltanet_core);
  // Per value head the chunked rule is 6*64*128 + 4*64*128 + 6*128*128 = 180224 (anchors: about 181K).
  EXPECT_DOUBLE_EQ(f.deltanet_core, 36.0 * 32.0 * 180224.0);
  EXPECT_DOUBLE_EQ(f.attention_core, 12.0 * 2.0 * 2.0 * 256.0 * 16.0 * 4097.0 / 2.0);
  // The figure docs/mfu.md quotes.
  EXPECT_DOUBLE_EQ(f.total(), 7737475072.0);
  EXPECT_DOUBLE_EQ(training_flops_per_token(c, 4096), 23212425216.0);
}

TEST(Flops, Errors) {
  EXPECT_THROW(model_flops_per_token(tiny(), 0), Error);
  EXPECT_THROW(model_flops_utilization(1000, 1e9, 0), Error);
  EXPECT_DOUBLE_EQ(model_flops_utilization(1000, 1e9, 4e12), 0.25);
}

TEST(FlopsPeak, MeasuredCpuGemmRateIsPlausible) {
  const double peak = measure_cpu_peak_flops(0);
  EXPECT_GT(peak, 1e8);   // any machine with a BLAS does better than 0.1 GFLOP/s
  EXPECT_LT(peak, 1e15);  // and no CPU reaches 1 PFLOP/s
}

}  // namespace nextron::test
