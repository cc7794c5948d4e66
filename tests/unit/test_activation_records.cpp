// Per-micro-batch activation records (ModelActivations): a forward writes everything its backward needs into the
// record the caller passes, so several micro-batches can be in flight, as pipeline schedules need. On the CPU
// backend, two micro-batches forwarded one after the other and then backpropagated in the same order give the
// gradients, losses and logits of running each forward + backward in turn, bit for bit (same operations in the same
// order); backpropagated in the other order, the same up to the order of the gradient sums. On every fixture
// (dense, hybrid attention + DeltaNet + MoE, unnormalised top-k).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "core/error.h"
#include "model/model.h"

namespace nextron::test {

namespace {

std::vector<float> grads_of(Model& m) { return {m.grads().f32(), m.grads().f32() + m.grads().numel()}; }
std::vector<float> logits_of(const Model& m, const ModelActivations& a) {
  const Tensor l = m.logits(a);
  return {l.f32(), l.f32() + l.numel()};
}

}  // namespace

class ActivationRecords : public ::testing::TestWithParam<std::string> {};

TEST_P(ActivationRecords, MicroBatchesInFlightMatchOneAtATime) {
  const std::string dir = std::string(NEXTRON_FIXTURES_DIR) + "/" + GetParam();
  const ModelConfig config = read_hf_config(dir);
  Model model(config);
  {
    Tensor host = Tensor::zeros({model.table().total_numel()});
    load_hf_weights(dir, model.table(), host.f32());
    model.params().copy_from(host);
    model.params_changed();
  }
  const int64_t B = 2, S = 37;
  std::vector<int64_t> ids1(B * S), ids2(B * S), t1(B * S), t2(B * S);
  for (int64_t i = 0; i < B * S; ++i) {
    ids1[i] = (i * 31 + 7) % config.vocab_size;
    ids2[i] = (i * 17 + 3) % config.vocab_size;
    t1[i] = (i * 13 + 1) % config.vocab_size;
    t2[i] = i % 5 == 0 ? -100 : (i * 7 + 2) % config.vocab_size;
  }
  // One at a time, through the model's own record.
  model.zero_grad();
  const LossValues seq1 = model.forward_targets(ids1.data(), t1.data(), B, S);
  const Tensor l1 = model.logits();
  const std::vector<float> seq_logits1(l1.f32(), l1.f32() + l1.numel());
  model.backward(0.5f);
  const LossValues seq2 = model.forward_targets(ids2.data(), t2.data(), B, S);
  model.backward(0.5f);
  const std::vector<float> seq_grads = grads_of(model);

  // Both in flight: forward 1, forward 2, backward 1, backward 2.
  ModelActivations r1, r2;
  model.zero_grad();
  const LossValues fl1 = model.forward_targets(r1, ids1.data(), t1.data(), B, S);
  const LossValues fl2 = model.forward_targets(r2, ids2.data(), t2.data(), B, S);
  EXPECT_EQ(logits_of(model, r1), seq_logits1) << "the second forward must not touch the first's record";
  model.backward(r1, 0.5f);
  model.backward(r2, 0.5f);
  EXPECT_EQ(grads_of(model), seq_grads);
  EXPECT_EQ(fl1.loss, seq1.loss);
  EXPECT_EQ(fl1.aux_loss, seq1.aux_loss);
  EXPECT_EQ(fl2.loss, seq2.loss);
  EXPECT_EQ(fl2.aux_loss, seq2.aux_loss);

  // Backward in the other order: only the order of the gradient sums differs.
  model.zero_grad();
  model.forward_targets(r1, ids1.data(), t1.data(), B, S);
  model.forward_targets(r2, ids2.data(), t2.data(), B, S);
  model.backward(r2, 0.5f);
  model.backward(r1, 0.5f);
  const std::vector<float> rev = grads_of(model);
  double worst = 0, scale = 0;
  for (size_t i = 0; i < rev.size(); ++i) {
    worst = std::max(worst, double(std::abs(rev[i] - seq_grads[i])));
    scale = std::max(scale, double(std::abs(seq_grads[i])));
  }
  EXPECT_LE(worst, 1e-6 * scale);

  // A record that holds no forward with labels cannot be backpropagated.
  ModelActivations empty;
  EXPECT_THROW(model.backward(empty), Error);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ActivationRecords, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace nextron::test
