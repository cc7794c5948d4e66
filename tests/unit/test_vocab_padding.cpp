// Vocabulary padding (Megatron's --make-vocab-size-divisible-by; model/config.h padded_vocab_size): a model whose
// embedding and lm_head hold extra zero rows gives the unpadded model's losses, and its real rows the same
// gradients, while the padded rows get exactly zero gradient (their logits stay out of the softmax); the shard map
// leaves the padded rows out of the whole-model layout, so checkpoints and HF exports hold the real vocabulary, under
// any TP. On every fixture, against the unpadded model as the reference.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "model/model.h"
#include "parallel/tp_shard.h"

namespace nextron::test {

class VocabPadding : public ::testing::TestWithParam<std::string> {};

TEST_P(VocabPadding, PaddedModelEqualsTheUnpaddedOne) {
  const std::string dir = std::string(NEXTRON_FIXTURES_DIR) + "/" + GetParam();
  const ModelConfig config = read_hf_config(dir);
  ModelConfig padded = config;
  padded.padded_vocab_size = config.vocab_size + 37;
  const ParamTable whole(config);
  std::vector<float> full(whole.total_numel());
  load_hf_weights(dir, whole, full.data());
  const int64_t B = 2, S = 19, V = config.vocab_size, H = config.hidden_size;
  std::vector<int64_t> ids(B * S), targets(B * S);
  for (int64_t i = 0; i < B * S; ++i) {
    ids[i] = (i * 29 + 5) % V;
    targets[i] = i % 7 == 3 ? -100 : (i * 11 + 4) % V;
  }
  struct Run {
    LossValues loss;
    std::vector<float> grads;  // gathered to the unpadded layout
    std::vector<float> padded_grads;
  };
  auto run = [&](const ModelConfig& c) {
    const TpShardMap map(c, 0, 1);
    Model m(c);
    std::vector<float> local(m.table().total_numel(), 0.0f);
    map.scatter(full.data(), local.data());
    std::copy(local.begin(), local.end(), m.params().f32());
    m.params_changed();
    m.zero_grad();
    Run r;
    r.loss = m.forward_targets(ids.data(), targets.data(), B, S);
    m.backward(1.0f);
    const float* g = m.grads().f32();
    r.grads.assign(whole.total_numel(), 0.0f);
    map.place_owned(g, r.grads.data());
    for (const char* name : {"embed_tokens", "lm_head"}) {
      const ParamSpec& s = m.table().get(name);
      r.padded_grads.insert(r.padded_grads.end(), g + s.offset + V * H, g + s.offset + s.numel());
    }
    return r;
  };
  const Run want = run(config), got = run(padded);
  EXPECT_NEAR(got.loss.loss, want.loss.loss, 1e-6 * std::fabs(want.loss.loss));
  EXPECT_EQ(got.loss.tokens, want.loss.tokens);
  EXPECT_EQ(got.padded_grads.size(), static_cast<size_t>(2 * 37 * H));
  for (float g : got.padded_grads) ASSERT_EQ(g, 0.0f) << "a padded row got a gradient";
  double worst = 0, scale = 0;
  for (size_t i = 0; i < want.grads.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(got.grads[i] - want.grads[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want.grads[i])));
  }
  EXPECT_LE(worst, 1e-5 * scale) << "real rows' gradients";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, VocabPadding, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

// The shard map of a padded vocabulary under TP 2: 257 real ids padded to 768 (384 per rank); rank 0 holds ids
// 0-256 real and 257-383 padding, rank 1 padding only. Every real element is placed exactly once over the ranks.
TEST(VocabPaddingMap, RanksHoldTheirRealRowsOnly) {
  ModelConfig c = read_hf_config(std::string(NEXTRON_FIXTURES_DIR) + "/dense");
  c.vocab_size = 257;
  c.padded_vocab_size = 768;
  const ParamTable whole(c);
  const int64_t H = c.hidden_size, F = whole.total_numel();
  std::vector<float> full(F, 0.0f);  // the alignment gaps between entries (ParamTable::kAlign) stay zero
  for (const ParamSpec& s : whole.specs())
    for (int64_t i = s.offset; i < s.offset + s.numel(); ++i) full[i] = static_cast<float>(i % 1009) + 1.0f;
  std::vector<float> sum(F, 0.0f);
  for (int r = 0; r < 2; ++r) {
    const TpShardMap map(c, r, 2);
    const ParamSpec& e = map.local_table().get("embed_tokens");
    EXPECT_EQ(e.shape[0], 384);
    std::vector<float> local(map.local_table().total_numel(), 0.0f);
    map.scatter(full.data(), local.data());
    const int64_t real = std::clamp<int64_t>(257 - 384 * r, 0, 384);
    for (int64_t row = 0; row < 384; ++row) {
      const float v = local[e.offset + row * H];
      if (row < real)
        EXPECT_EQ(v, full[whole.get("embed_tokens").offset + (384 * r + row) * H]) << "rank " << r << " row " << row;
      else
        EXPECT_EQ(v, 0.0f) << "padded row " << row << " of rank " << r;
    }
    std::vector<float> placed(F, 0.0f);
    map.place_owned(local.data(), placed.data());
    for (int64_t i = 0; i < F; ++i) sum[i] += placed[i];
  }
  for (int64_t i = 0; i < F; ++i) ASSERT_EQ(sum[i], full[i]) << i;
}

}  // namespace nextron::test
