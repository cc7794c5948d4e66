// Golden test against HF transformers: for every fixture made by tools/make_fixtures.py, load the HF checkpoint
// with our reader, run forward and backward, and compare logits, losses and the gradient of every parameter
// (under its HF checkpoint name) with what transformers computed in fp32.
//
// Tolerance: both sides compute in fp32 with different summation orders (OpenBLAS vs torch GEMMs, chunked
// delta-rule scan vs torch's), so values agree to a few float32 ulps times the depth of accumulation. We require
// max |ours - ref| <= 2e-4 * max(|ref|) per tensor (the max over a tensor, so tiny entries are judged on the
// tensor's scale) and 1e-5 relative on the scalar losses. A convention error (1 + w vs w, a swapped split, a
// wrong head grouping) moves results by 1e-2 or more relative, far outside these bounds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/safetensors.h"
#include "fixtures.h"
#include "model/model.h"

namespace nextron::test {

namespace fs = std::filesystem;

namespace {

struct Diff {
  double max_err = 0, max_ref = 0;
};
Diff compare(const float* ours, const float* ref, int64_t n) {
  Diff d;
  for (int64_t i = 0; i < n; ++i) {
    d.max_err = std::max(d.max_err, static_cast<double>(std::abs(ours[i] - ref[i])));
    d.max_ref = std::max(d.max_ref, static_cast<double>(std::abs(ref[i])));
  }
  return d;
}

constexpr double kTensorTol = 2e-4;
constexpr double kLossTol = 1e-5;

}  // namespace

class Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Golden, ForwardAndBackwardMatchTransformers) {
  const std::string dir = (fs::path(fixtures_dir()) / GetParam()).string();
  const ModelConfig config = read_hf_config(dir);
  Model model(config);
  load_hf_weights(dir, model.table(), model.params().f32());
  SafetensorsReader golden((fs::path(dir) / "golden.safetensors").string());

  const auto ids = golden.read_i64("input_ids");
  const auto labels = golden.read_i64("labels");
  const Shape id_shape = golden.entry("input_ids").shape;
  const int64_t B = id_shape[0], S = id_shape[1];
  const LossValues loss = model.forward(ids.data(), labels.data(), B, S);

  const Tensor ref_logits = golden.read_f32("logits");
  ASSERT_EQ(ref_logits.numel(), model.logits().numel());
  const Diff dl = compare(model.logits().f32(), ref_logits.f32(), ref_logits.numel());
  EXPECT_LE(dl.max_err, kTensorTol * dl.max_ref) << "logits";
  auto scalar = [&](const char* name) { return static_cast<double>(golden.read_f32(name).f32()[0]); };
  EXPECT_NEAR(loss.lm_loss, scalar("lm_loss"), kLossTol * std::abs(scalar("lm_loss")));
  EXPECT_NEAR(loss.aux_loss, scalar("aux_loss"), kLossTol * std::max(1.0, std::abs(scalar("aux_loss"))));
  EXPECT_NEAR(loss.loss, scalar("loss"), kLossTol * std::abs(scalar("loss")));
  const Tensor ref_seq = golden.read_f32("per_seq_loss");
  const auto seq = model.per_sequence_loss();
  for (int64_t b = 0; b < B; ++b) EXPECT_NEAR(seq[b], ref_seq.f32()[b], kLossTol * std::abs(ref_seq.f32()[b]));

  model.zero_grad();
  model.backward();
  int checked = 0;
  double worst = 0;
  std::string worst_name;
  for (const ParamSpec& spec : model.table().specs()) {
    for (const HfPiece& piece : spec.hf) {
      const std::string name = "grad." + piece.hf_name;
      ASSERT_TRUE(golden.contains(name)) << "fixture lacks " << name;
      const Tensor ref = golden.read_f32(name);
      ASSERT_EQ(ref.numel(), shape_numel(piece.shape)) << name;
      const Diff d =
          compare(in_hf_order(piece, model.grads().f32() + spec.offset + piece.offset).data(), ref.f32(), ref.numel());
      EXPECT_LE(d.max_err, kTensorTol * d.max_ref + 1e-9) << name << " (max |ref| " << d.max_ref << ")";
      if (d.max_ref > 0 && d.max_err / d.max_ref > worst) {
        worst = d.max_err / d.max_ref;
        worst_name = name;
      }
      ++checked;
    }
  }
  // Every gradient in the fixture belongs to a parameter we have (nothing silently unchecked).
  int in_fixture = 0;
  for (const auto& n : golden.names()) in_fixture += n.rfind("grad.", 0) == 0;
  EXPECT_EQ(checked, in_fixture);
  std::printf("%s: logits max err %.3g of max |ref| %.3g; lm_loss %.9f vs %.9f; worst gradient %s at %.3g relative\n",
              GetParam().c_str(), dl.max_err, dl.max_ref, loss.lm_loss, scalar("lm_loss"), worst_name.c_str(), worst);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Golden, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace nextron::test
