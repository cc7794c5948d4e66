// The model as pipeline stages (model/stage.h): the fixtures' models cut into stages, run in one process with the
// activations, router statistics and gradients handed from stage to stage by copies (what the pipeline's sends and
// receives will carry), give the whole model's loss, logits and every parameter's gradient bit for bit: the same
// operations in the same order. Also: each stage's table holds exactly its parameters under their global names, and
// misuse is refused with the reason.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "core/error.h"
#include "model/model.h"

namespace nextron::test {

namespace {

void load_weights(Model& m, const std::string& dir, const ModelConfig& config) {
  const ParamTable whole(config);
  Tensor all = Tensor::zeros({whole.total_numel()});
  load_hf_weights(dir, whole, all.f32());
  Tensor mine = Tensor::zeros({m.table().total_numel()});
  for (const ParamSpec& s : m.table().specs())
    Tensor::view_of(mine, s.offset, s.shape).copy_from(whole.view(all, s.name));
  m.params().copy_from(mine);
  m.params_changed();
}

void copy_aux(const Ops& ops, MoeAuxStats& dst, const MoeAuxStats& src) {
  ops.f32(dst.count_sum, src.count_sum.shape());
  ops.f32(dst.prob_sum, src.prob_sum.shape());
  dst.count_sum.copy_from(src.count_sum);
  dst.prob_sum.copy_from(src.prob_sum);
  dst.total_rows = src.total_rows;
}

std::vector<float> values(const Tensor& t) { return {t.f32(), t.f32() + t.numel()}; }

// Stage boundaries as layer counts, e.g. {1, 2, 1}: embedding + layer 0 | layers 1-2 | layer 3 + loss.
std::vector<StageRange> split(const ModelConfig& c, const std::vector<int64_t>& counts) {
  std::vector<StageRange> stages;
  int64_t begin = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    stages.push_back({begin, begin + counts[i], i == 0, i + 1 == counts.size()});
    begin += counts[i];
  }
  EXPECT_EQ(begin, c.num_hidden_layers);
  return stages;
}

}  // namespace

class PipelineStages : public ::testing::TestWithParam<std::string> {};

TEST_P(PipelineStages, ChainedStagesEqualTheWholeModel) {
  const std::string dir = std::string(NEXTRON_FIXTURES_DIR) + "/" + GetParam();
  const ModelConfig config = read_hf_config(dir);
  const int64_t L = config.num_hidden_layers, B = 2, S = 23;
  std::vector<int64_t> ids(B * S), targets(B * S);
  for (int64_t i = 0; i < B * S; ++i) {
    ids[i] = (i * 29 + 5) % config.vocab_size;
    targets[i] = i % 7 == 3 ? -100 : (i * 11 + 4) % config.vocab_size;
  }
  Model whole(config);
  load_weights(whole, dir, config);
  whole.zero_grad();
  const LossValues want = whole.forward_targets(ids.data(), targets.data(), B, S);
  const std::vector<float> want_logits = values(whole.logits());
  whole.backward(0.25f);
  std::map<std::string, std::vector<float>> want_grads;
  for (const ParamSpec& s : whole.table().specs())
    want_grads[s.name] = values(whole.table().view(whole.grads(), s.name));

  std::vector<std::vector<int64_t>> splits = {{0, L}, {L, 0}, {1, L - 1}};
  if (L >= 3) splits.push_back({1, L - 2, 1});
  if (L >= 4) splits.push_back({1, 1, 1, L - 3});
  for (const auto& counts : splits) {
    const std::vector<StageRange> ranges = split(config, counts);
    std::string name;
    for (const StageRange& r : ranges) name += (name.empty() ? "" : " | ") + r.describe(config);
    SCOPED_TRACE(name);
    std::vector<std::unique_ptr<Model>> stages;
    std::vector<ModelActivations> acts(ranges.size());
    for (const StageRange& r : ranges) {
      stages.push_back(std::make_unique<Model>(config, ModelComms{}, nullptr, r));
      load_weights(*stages.back(), dir, config);
      stages.back()->zero_grad();
    }
    // Forward: each stage's output and router statistics become the next one's input.
    LossValues got;
    for (size_t k = 0; k < stages.size(); ++k) {
      Model& m = *stages[k];
      if (k > 0) {
        m.stage_input(acts[k], B, S).copy_from(stages[k - 1]->stage_output(acts[k - 1]));
        copy_aux(m.ops(), acts[k].aux, acts[k - 1].aux);
      }
      got = m.forward_targets(acts[k], ids.data(), targets.data(), B, S);
    }
    EXPECT_EQ(got.loss, want.loss);
    EXPECT_EQ(got.aux_loss, want.aux_loss);
    EXPECT_EQ(values(stages.back()->logits(acts.back())), want_logits);
    // Backward: the last stage's statistics are the model's; each input gradient is the previous output gradient.
    for (size_t k = stages.size(); k-- > 0;) {
      Model& m = *stages[k];
      if (k + 1 < stages.size()) {
        copy_aux(m.ops(), acts[k].aux, acts.back().aux);
        m.stage_output_grad(acts[k]).copy_from(stages[k + 1]->stage_input_grad(acts[k + 1]));
      }
      m.backward_stage(acts[k], 0.25f);
    }
    size_t seen = 0;
    for (const auto& m : stages)
      for (const ParamSpec& s : m->table().specs()) {
        ASSERT_TRUE(want_grads.count(s.name)) << s.name;
        EXPECT_EQ(values(m->table().view(m->grads(), s.name)), want_grads[s.name]) << s.name;
        ++seen;
      }
    EXPECT_EQ(seen, want_grads.size()) << "every parameter on exactly one stage";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PipelineStages, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

TEST(PipelineStages, TablesAndMisuse) {
  const ModelConfig config = read_hf_config(std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe");
  const ParamTable first(config, {0, 1, true, false}), last(config, {1, -1, false, true});
  EXPECT_TRUE(first.contains("embed_tokens"));
  EXPECT_FALSE(first.contains("lm_head"));
  EXPECT_FALSE(first.contains("layers.1.input_layernorm"));
  EXPECT_TRUE(last.contains("layers.1.input_layernorm"));
  EXPECT_TRUE(last.contains("lm_head"));
  EXPECT_EQ(first.parameters() + last.parameters(), ParamTable(config).parameters());
  EXPECT_THROW(ParamTable(config, StageRange{0, 9, true, true}), Error);    // past the last layer
  EXPECT_THROW(ParamTable(config, StageRange{1, 2, true, false}), Error);   // the first stage starts at 0
  EXPECT_THROW(ParamTable(config, StageRange{1, 1, false, false}), Error);  // an empty middle stage
  Model middle(config, ModelComms{}, nullptr, StageRange{1, 3, false, false});
  ModelActivations a;
  const std::vector<int64_t> ids(4, 1);
  EXPECT_THROW(middle.forward_targets(a, ids.data(), ids.data(), 1, 4), Error);  // stage_input() not filled
  EXPECT_THROW(middle.backward(a), Error);                                       // no loss on this stage
}

}  // namespace nextron::test
