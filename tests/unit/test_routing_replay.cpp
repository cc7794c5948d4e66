// Routing replay (model/routing_replay.h) through the whole CPU model on the hybrid_moe fixture: replaying a run's
// own choice reproduces it bit for bit, replaying another model's choice changes the result (the replay is not a
// no-op) and equals that model's run where the routers agree, and mismatched replays fail with an error naming the
// problem. The weights from a replayed choice are checked in test_ops_moe.cpp (closed form, finite differences).
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "checkpoint/hf_checkpoint.h"
#include "core/error.h"
#include "model/model.h"
#include "model/routing_replay.h"

namespace nextron::test {

namespace {

const std::string kFixture = std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe";

struct RunResult {
  LossValues loss;
  std::vector<float> logits, grads;
};

RunResult run(Model& m, const std::vector<int64_t>& ids, int64_t B, int64_t S) {
  RunResult r;
  r.loss = m.forward(ids.data(), ids.data(), B, S);
  const Tensor l = m.logits();
  r.logits.assign(l.f32(), l.f32() + l.numel());
  m.zero_grad();
  m.backward();
  r.grads.assign(m.grads().f32(), m.grads().f32() + m.grads().numel());
  return r;
}

void load(Model& m, const Tensor& host) {
  m.params().copy_from(host);
  m.params_changed();
}

}  // namespace

TEST(RoutingReplay, ReplaysTheRecordedChoiceThroughTheModel) {
  const ModelConfig config = read_hf_config(kFixture);
  Tensor weights = Tensor::zeros({Model(config).table().total_numel()});
  Model a(config), b(config);
  load_hf_weights(kFixture, a.table(), weights.f32());
  load(a, weights);
  // b: a with every router's gate negated, so that it chooses other experts for most tokens.
  Tensor flipped = Tensor::zeros({weights.numel()});
  flipped.copy_from(weights);
  int64_t gates = 0;
  for (const ParamSpec& spec : b.table().specs())
    if (spec.name.ends_with("mlp.gate")) {
      for (int64_t i = 0; i < spec.numel(); ++i) flipped.f32()[spec.offset + i] *= -1.0f;
      ++gates;
    }
  ASSERT_GT(gates, 0);
  load(b, flipped);
  const int64_t B = 2, S = 33;
  std::vector<int64_t> ids(B * S);
  for (int64_t i = 0; i < B * S; ++i) ids[i] = (i * 7919 + 13) % config.vocab_size;

  RoutingReplay rec_a(RoutingReplay::Mode::record), rec_b(RoutingReplay::Mode::record);
  a.set_routing_replay(&rec_a);
  const RunResult free_a = run(a, ids, B, S);
  EXPECT_GT(rec_a.layers_recorded(), 0);
  b.set_routing_replay(&rec_b);
  const RunResult free_b = run(b, ids, B, S);

  // Its own choice: bit for bit.
  rec_a.set_mode(RoutingReplay::Mode::replay);
  a.set_routing_replay(&rec_a);
  const RunResult again_a = run(a, ids, B, S);
  EXPECT_EQ(again_a.logits, free_a.logits);
  EXPECT_EQ(again_a.grads, free_a.grads);
  EXPECT_EQ(again_a.loss.aux_loss, free_a.loss.aux_loss);

  // b replaying a's choice differs from b's own run (the choice changed), and b replaying its own is b.
  b.set_routing_replay(&rec_a);
  const RunResult b_with_a = run(b, ids, B, S);
  EXPECT_NE(b_with_a.logits, free_b.logits);
  EXPECT_NE(b_with_a.loss.aux_loss, free_b.loss.aux_loss);
  rec_b.set_mode(RoutingReplay::Mode::replay);
  b.set_routing_replay(&rec_b);
  EXPECT_EQ(run(b, ids, B, S).logits, free_b.logits);

  // A replay recorded for another batch shape, or never recorded, is refused with the reason.
  try {
    b.forward(ids.data(), ids.data(), 1, S);
    ADD_FAILURE() << "a replay of 2 x 33 rows was used for 1 x 33";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("replay needs the same batch"), std::string::npos) << e.what();
  }
  RoutingReplay empty(RoutingReplay::Mode::replay);
  b.set_routing_replay(&empty);
  try {
    b.forward(ids.data(), ids.data(), B, S);
    ADD_FAILURE() << "an empty replay was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nothing was recorded"), std::string::npos) << e.what();
  }
  b.set_routing_replay(nullptr);
  EXPECT_EQ(run(b, ids, B, S).logits, free_b.logits);
}

}  // namespace nextron::test
