// Pipeline layouts (parallel/pipeline_layout.h): the even split, Megatron's --decoder-first/last-pipeline-num-layers
// and --pipeline-model-parallel-layout strings give the layer ranges written out by hand here; each rank's chunks are
// virtual stages c * PP + r; every malformed or impossible split is an error naming the fix; Layout takes VPP from a
// layout string and skips the even-divisibility rule for uneven splits.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "parallel/layout.h"
#include "parallel/pipeline_layout.h"

namespace nextron::test {

namespace {

ModelConfig config_with_layers(int64_t L) {
  ModelConfig c;
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 32;
  c.num_hidden_layers = L;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.linear_num_key_heads = 4;
  c.linear_num_value_heads = 8;
  c.linear_key_head_dim = 8;
  c.linear_value_head_dim = 8;
  for (int64_t i = 0; i < L; ++i)
    c.layer_types.push_back(i % 4 == 3 ? MixerType::full_attention : MixerType::linear_attention);
  return c;
}

// "b-e F L" per stage: layers [b, e), F when it holds the embedding, L the loss.
std::vector<std::string> describe(const std::vector<StageRange>& stages) {
  std::vector<std::string> out;
  for (const StageRange& s : stages)
    out.push_back(std::to_string(s.layer_begin) + "-" + std::to_string(s.layer_end) + (s.first ? " F" : "") +
                  (s.last ? " L" : ""));
  return out;
}

std::string error_of(const ModelConfig& c, int pp, int vpp, const PipelineSplit& split) {
  try {
    pipeline_stages(c, pp, vpp, split);
  } catch (const Error& e) {
    return e.what();
  }
  return "accepted";
}

}  // namespace

TEST(PipelineLayout, EvenSplitAndRankChunks) {
  const ModelConfig c = config_with_layers(8);
  EXPECT_EQ(describe(pipeline_stages(c, 1, 1)), (std::vector<std::string>{"0-8 F L"}));
  EXPECT_EQ(describe(pipeline_stages(c, 2, 1)), (std::vector<std::string>{"0-4 F", "4-8 L"}));
  const std::vector<StageRange> v = pipeline_stages(c, 2, 2);
  EXPECT_EQ(describe(v), (std::vector<std::string>{"0-2 F", "2-4", "4-6", "6-8 L"}));
  // Rank r holds virtual stages r and r + PP.
  EXPECT_EQ(describe(rank_chunks(v, 2, 0)), (std::vector<std::string>{"0-2 F", "4-6"}));
  EXPECT_EQ(describe(rank_chunks(v, 2, 1)), (std::vector<std::string>{"2-4", "6-8 L"}));
  EXPECT_NE(error_of(c, 3, 1, {}).find("is not divisible by PP x VPP = 3 x 1"), std::string::npos);
}

TEST(PipelineLayout, FirstAndLastStageLayers) {
  const ModelConfig c = config_with_layers(14);
  EXPECT_EQ(describe(pipeline_stages(c, 4, 1, {"", 2, 0})),
            (std::vector<std::string>{"0-2 F", "2-6", "6-10", "10-14 L"}));
  EXPECT_EQ(describe(pipeline_stages(c, 4, 1, {"", 2, 2})),
            (std::vector<std::string>{"0-2 F", "2-7", "7-12", "12-14 L"}));
  EXPECT_EQ(describe(pipeline_stages(c, 2, 1, {"", 5, 9})), (std::vector<std::string>{"0-5 F", "5-14 L"}));
  EXPECT_NE(error_of(c, 4, 1, {"", 3, 0}).find("do not split evenly over the other 3 stages"), std::string::npos);
  EXPECT_NE(error_of(c, 2, 1, {"", 10, 10}).find("exceed the 14 layers"), std::string::npos);
  EXPECT_NE(error_of(c, 4, 2, {"", 2, 0}).find("need --pipeline-model-parallel-layout"), std::string::npos);
  EXPECT_NE(error_of(c, 2, 1, {"Et|tL", 2, 0}).find("give one of them"), std::string::npos);
}

TEST(PipelineLayout, LayoutStrings) {
  const ModelConfig c = config_with_layers(14);
  EXPECT_EQ(describe(pipeline_stages(c, 4, 1, {"Ettt|tttt|ttt|ttttL"})),
            (std::vector<std::string>{"0-3 F", "3-7", "7-10", "10-14 L"}));
  // Repeats, groups, commas and spaces: PP 2 x VPP 2 (the layout sets VPP).
  const PipelineSplit groups{"E t*3 | (t*4|)*2, t*3 L"};
  EXPECT_EQ(pipeline_chunks(groups, 2, 1), 2);
  EXPECT_EQ(describe(pipeline_stages(c, 2, 2, groups)), (std::vector<std::string>{"0-3 F", "3-7", "7-11", "11-14 L"}));
  // The embedding and the loss may have stages of their own (first and last hold no decoder layer).
  EXPECT_EQ(describe(pipeline_stages(config_with_layers(4), 2, 2, {"E|tt|tt|L"})),
            (std::vector<std::string>{"0-0 F", "0-2", "2-4", "4-4 L"}));
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"Ettt|tttt|ttt|tttt", "must end with 'L'"},
      {"ttt|tttt|ttt|ttttEL", "'E' (the embedding) belongs once at the start of the first stage"},
      {"EtLt|tttt|ttt|ttttL", "'L' (the loss) belongs once at the end of the last stage"},
      {"Ettt||ttttttt|ttttL", "stage 1 is empty"},
      {"Ettt|tttt|tt|ttttL", "places 13 decoder layers 't' but the model has 14"},
      {"Ettt|tttt|tttttttL", "has 3 stages, not a multiple of PP 4"},
      {"E(tttt|tttt|ttt|ttttL", "'(' without a matching ')'"},
      {"Ettt)|tttt|ttt|ttttL", "')' without a matching '('"},
      {"Ex*3|tttt|ttt|ttttL", "unexpected 'x'"},
      {"Et*|tttt|ttt|ttttL", "'*' must be followed by a repeat count"},
      {"Ettm|tttt|ttt|ttttL", "multi-token-prediction"},
  };
  for (const auto& [layout, want] : bad) {
    const std::string m = error_of(c, 4, 1, {layout});
    EXPECT_NE(m.find(want), std::string::npos) << layout << " -> " << m;
    EXPECT_NE(m.find("--pipeline-model-parallel-layout"), std::string::npos) << m;
  }
  EXPECT_NE(error_of(c, 2, 3, {"E t*3 | (t*4|)*2, t*3 L"}).find("leave --virtual-pipeline-model-parallel-size unset"),
            std::string::npos);
}

TEST(PipelineLayout, LayoutSkipsTheEvenRuleAndSetsVpp) {
  const ModelConfig c = config_with_layers(14);
  ParallelSizes s;
  s.pp = 4;
  EXPECT_THROW(Layout(s, 4, c, 16), Error);  // 14 layers over PP 4: not even
  s.pipeline.layout = "Ettt|tttt|ttt|ttttL";
  EXPECT_EQ(Layout(s, 4, c, 16).vpp(), 1);
  s.pp = 2;
  s.pipeline.layout = "E t*3 | (t*4|)*2, t*3 L";
  EXPECT_EQ(Layout(s, 2, c, 16).vpp(), 2);
  s.pipeline.layout = "Ettttttt|ttttttt";
  try {
    Layout(s, 2, c, 16);
    ADD_FAILURE() << "a layout without the loss was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must end with 'L'"), std::string::npos) << e.what();
  }
}

}  // namespace nextron::test
