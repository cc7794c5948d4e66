// Activation recomputation (model/recompute.h): full (uniform groups of 1, 2 and all layers; block of the first
// layers) and selective (mlp, moe) recomputation give the losses and every gradient of the run without it, bit for
// bit on the CPU backend (the rerun forward is the same computation on the same input, and its router statistics are
// not counted twice), with two micro-batches in flight in their own records; and the options Megatron would refuse
// are refused with the fix.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "core/error.h"
#include "model/model.h"

namespace nextron::test {

namespace {

struct Result {
  std::vector<double> losses;
  std::vector<float> grads;
};

Result run(const std::string& dir, const RecomputeOptions& options) {
  const ModelConfig config = read_hf_config(dir);
  Model model(config);
  Tensor host = Tensor::zeros({model.table().total_numel()});
  load_hf_weights(dir, model.table(), host.f32());
  model.params().copy_from(host);
  model.params_changed();
  model.set_recompute(options);
  const int64_t B = 2, S = 29;
  std::vector<int64_t> ids1(B * S), ids2(B * S), t1(B * S), t2(B * S);
  for (int64_t i = 0; i < B * S; ++i) {
    ids1[i] = (i * 31 + 7) % config.vocab_size;
    ids2[i] = (i * 17 + 3) % config.vocab_size;
    t1[i] = (i * 13 + 1) % config.vocab_size;
    t2[i] = i % 5 == 0 ? -100 : (i * 7 + 2) % config.vocab_size;
  }
  // Two micro-batches in flight: both forwards, then both backwards (as a pipeline's warmup does).
  ModelActivations a1, a2;
  model.zero_grad();
  Result r;
  r.losses.push_back(model.forward_targets(a1, ids1.data(), t1.data(), B, S).loss);
  r.losses.push_back(model.forward_targets(a2, ids2.data(), t2.data(), B, S).loss);
  model.backward(a1, 0.5f);
  model.backward(a2, 0.5f);
  r.grads.assign(model.grads().f32(), model.grads().f32() + model.grads().numel());
  return r;
}

}  // namespace

class Recompute : public ::testing::TestWithParam<std::string> {};

TEST_P(Recompute, EveryMethodEqualsTheRunWithoutIt) {
  const std::string dir = std::string(NEXTRON_FIXTURES_DIR) + "/" + GetParam();
  const Result want = run(dir, {});
  const int64_t L = read_hf_config(dir).num_hidden_layers;
  const std::vector<RecomputeOptions> cases = {
      {"full", "uniform", 1, {}},
      {"full", "uniform", 2, {}},
      {"full", "uniform", L, {}},
      {"full", "block", 1, {}},
      {"full", "block", L + 3, {}},
      {"selective", "", 0, {"mlp"}},
      {"selective", "", 0, {"moe"}},
      {"selective", "", 0, {"mlp", "moe"}},
      {"selective", "", 0, {"layernorm"}},
      {"selective", "", 0, {"layernorm", "mlp", "moe"}},
      {"selective", "", 0, {"core_attn"}},
      {"selective", "", 0, {"moe_act"}},
      {"selective", "", 0, {"shared_experts"}},
      {"selective", "", 0, {"delta_rule_states"}},  // the backward recomputes what the default run's forward kept
      {"selective", "", 0, {"core_attn", "delta_rule_states"}},
      {"selective", "", 0, {"core_attn", "moe_act", "shared_experts", "layernorm"}},
      {"selective", "", 0, {"core_attn", "layernorm", "mlp", "moe", "moe_act", "shared_experts", "delta_rule_states"}}};
  for (const RecomputeOptions& o : cases) {
    std::string name = o.granularity + " " + o.method + " " + std::to_string(o.num_layers);
    for (const auto& m : o.modules) name += " " + m;
    SCOPED_TRACE(name);
    const Result got = run(dir, o);
    EXPECT_EQ(got.losses, want.losses);
    ASSERT_EQ(got.grads.size(), want.grads.size());
    size_t differ = 0;
    for (size_t i = 0; i < got.grads.size(); ++i) differ += got.grads[i] != want.grads[i];
    EXPECT_EQ(differ, 0u) << "gradient elements that differ";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Recompute, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

TEST(RecomputeOptions, GroupsAndRefusals) {
  auto groups = [](const RecomputeOptions& o, int64_t L) {
    std::string s;
    for (const RecomputeGroup& g : recompute_groups(o, L))
      s += std::to_string(g.begin) + "-" + std::to_string(g.end) + (g.recompute ? "r " : " ");
    return s;
  };
  EXPECT_EQ(groups({}, 3), "0-1 1-2 2-3 ");
  EXPECT_EQ(groups({"full", "uniform", 2, {}}, 5), "0-2r 2-4r 4-5r ");
  EXPECT_EQ(groups({"full", "block", 2, {}}, 4), "0-1r 1-2r 2-3 3-4 ");
  EXPECT_EQ(groups({"selective", "", 0, {"mlp"}}, 2), "0-1 1-2 ");
  auto refusal = [](const RecomputeOptions& o) {
    try {
      o.validate();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(refusal({"partial", "", 0, {}}).find("use full or selective"), std::string::npos);
  EXPECT_NE(refusal({"full", "", 2, {}}).find("needs --recompute-method uniform or block"), std::string::npos);
  EXPECT_NE(refusal({"full", "uniform", 0, {}}).find("needs --recompute-num-layers >= 1"), std::string::npos);
  EXPECT_NE(refusal({"full", "block", 1, {"mlp"}}).find("applies to --recompute-granularity selective"),
            std::string::npos);
  EXPECT_NE(refusal({"selective", "uniform", 1, {"mlp"}}).find("apply to --recompute-granularity full"),
            std::string::npos);
  EXPECT_NE(refusal({"selective", "", 0, {}}).find("needs --recompute-modules"), std::string::npos);
  EXPECT_NE(refusal({"selective", "", 0, {"mla_up_proj"}}).find("mla_up_proj: this model has no MLA"),
            std::string::npos);
  EXPECT_EQ(refusal({"selective", "", 0, {"core_attn", "moe_act", "shared_experts"}}), "accepted");
  EXPECT_NE(refusal({"selective", "", 0, {"mla"}}).find("mla: unknown"), std::string::npos);
  EXPECT_NE(refusal({"", "uniform", 0, {}}).find("without --recompute-granularity"), std::string::npos);
  EXPECT_EQ(refusal({"full", "block", 9, {}}), "accepted");
}

}  // namespace nextron::test
