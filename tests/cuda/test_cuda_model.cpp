// The whole model on the GPU (CudaOps: bf16 activations, fp32 master weights and gradients) against the HF golden
// fixtures (tests/fixtures, computed by transformers in fp32), a short training run against the same fp32 golden
// loss curve as the CPU backend, and the steady-state allocation check (no cudaMalloc after the first step).
//
// Tolerances (bf16): every activation is rounded to 8 significant bits (relative 2^-9) after each op, and a layer
// chains about a dozen such roundings. For well-conditioned outputs we require logits within 3e-2 of their largest
// magnitude, the losses within 1e-2 relative, every parameter gradient within 1e-1 of its tensor's largest magnitude,
// and the training losses within 2e-2 relative of the fp32 curve. A convention error (1 + w vs w, a swapped split, a
// wrong head grouping) moves results by O(1) relative.
//
// The fixtures' large random weights make some outputs ill-conditioned at bf16, which the first H200 run showed
// (hybrid_moe: logits 0.29 off, an expert's gradient 1.9) and transformers' own bf16 run reproduces (0.23). Two
// measures keep the test meaningful there:
// - Routing replay: the CPU model (fp32, equal to transformers to 1e-5) runs the batch first and records its expert
//   choice, which the GPU model replays; otherwise the tokens whose k-th and (k+1)-th router probabilities are
//   closer than bf16 rounding pick other experts and differ by O(1).
// - The bf16 envelope (tests/fixtures/*/bf16_envelope.json, tools/make_bf16_envelope.py): how far transformers'
//   own bf16 run, replaying the same choice, lands from its fp32 golden per quantity. Each quantity may be off by
//   the larger of its fixed tolerance and kEnvelopeFactor times that: our DeltaNet core multiplies bf16 operands on
//   the tensor cores where transformers computes it in fp32, so ours can be somewhat worse (on the first H200 run,
//   before replay, the logits were up to 1.8 times transformers' bf16 error in eight comparisons).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/safetensors.h"
#include "cuda_test_util.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/model.h"
#include "model/routing_replay.h"
#include "train/trainer.h"

namespace nextron::test {

namespace fs = std::filesystem;

namespace {

// max |ours - ref| relative to max |ref| over one tensor.
double relative_error(const float* ours, const float* ref, int64_t n) {
  double err = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    err = std::max(err, static_cast<double>(std::abs(ours[i] - ref[i])));
    scale = std::max(scale, static_cast<double>(std::abs(ref[i])));
  }
  return scale > 0 ? err / scale : err;
}

std::vector<float> host_copy(const Tensor& t) {
  Tensor h = Tensor::zeros(t.shape(), t.dtype());
  h.copy_from(t);
  return std::vector<float>(h.f32(), h.f32() + h.numel());
}

constexpr double kLogitsTol = 3e-2, kLossTol = 1e-2, kGradTol = 1e-1, kCurveTol = 2e-2, kEnvelopeFactor = 3.0;

// transformers' bf16 error per quantity (see the header); zero where the fixture has no envelope file.
struct Bf16Envelope {
  nlohmann::json j;
  explicit Bf16Envelope(const std::string& dir) {
    std::ifstream f((fs::path(dir) / "bf16_envelope.json").string());
    if (f) j = nlohmann::json::parse(f);
  }
  double logits() const { return j.value("logits", 0.0); }
  double lm_loss() const { return j.value("lm_loss", 0.0); }
  double grad(const std::string& name) const { return j.contains("grads") ? j["grads"].value(name, 0.0) : 0.0; }
};

}  // namespace

class CudaModelGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModelGolden, ForwardAndBackwardMatchTransformersInBf16) {
  NEXTRON_REQUIRE_GPU();
  const std::string dir = (fs::path(fixtures_dir()) / GetParam()).string();
  const ModelConfig config = read_hf_config(dir);
  const Bf16Envelope envelope(dir);
  Model model(config, {}, std::make_shared<CudaOps>(0));
  Model cpu_model(config);  // records the expert choice the GPU model replays
  {
    Tensor host = Tensor::zeros({model.table().total_numel()});
    load_hf_weights(dir, model.table(), host.f32());
    model.params().copy_from(host);
    model.params_changed();
    cpu_model.params().copy_from(host);
    cpu_model.params_changed();
  }
  SafetensorsReader golden((fs::path(dir) / "golden.safetensors").string());
  const auto ids = golden.read_i64("input_ids");
  const auto labels = golden.read_i64("labels");
  const Shape id_shape = golden.entry("input_ids").shape;
  RoutingReplay replay(RoutingReplay::Mode::record);
  cpu_model.set_routing_replay(&replay);
  cpu_model.forward(ids.data(), labels.data(), id_shape[0], id_shape[1]);
  replay.set_mode(RoutingReplay::Mode::replay);
  model.set_routing_replay(&replay);
  const LossValues loss = model.forward(ids.data(), labels.data(), id_shape[0], id_shape[1]);

  const Tensor ref_logits = golden.read_f32("logits");
  const Tensor logits = model.logits();
  ASSERT_EQ(ref_logits.numel(), logits.numel());
  const double logits_err = relative_error(logits.f32(), ref_logits.f32(), ref_logits.numel());
  EXPECT_LE(logits_err, std::max(kLogitsTol, kEnvelopeFactor * envelope.logits())) << "logits";
  const double ref_loss = golden.read_f32("lm_loss").f32()[0];
  EXPECT_NEAR(loss.lm_loss, ref_loss, std::max(kLossTol, kEnvelopeFactor * envelope.lm_loss()) * std::abs(ref_loss));
  const double ref_aux = golden.read_f32("aux_loss").f32()[0];
  EXPECT_NEAR(loss.aux_loss, ref_aux, kLossTol * std::max(1.0, std::abs(ref_aux)));

  model.zero_grad();
  model.backward();
  const std::vector<float> grads = host_copy(model.grads());
  int checked = 0;
  double worst = 0;
  std::string worst_name;
  for (const ParamSpec& spec : model.table().specs())
    for (const HfPiece& piece : spec.hf) {
      const std::string name = "grad." + piece.hf_name;
      ASSERT_TRUE(golden.contains(name)) << "fixture lacks " << name;
      const Tensor ref = golden.read_f32(name);
      const double e =
          relative_error(in_hf_order(piece, grads.data() + spec.offset + piece.offset).data(), ref.f32(), ref.numel());
      EXPECT_LE(e, std::max(kGradTol, kEnvelopeFactor * envelope.grad(name))) << name;
      if (e > worst) {
        worst = e;
        worst_name = name;
      }
      ++checked;
    }
  EXPECT_GT(checked, 0);
  std::printf("%s (cuda, bf16): logits %.3g relative; lm_loss %.6f vs %.6f; worst gradient %s at %.3g relative\n",
              GetParam().c_str(), logits_err, loss.lm_loss, ref_loss, worst_name.c_str(), worst);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModelGolden, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

// The training fixture's run (tests/golden/test_training.cpp does it on the CPU to 2e-5) on the GPU: the loss falls
// like the fp32 curve, and steps after the first allocate no device memory.
TEST(CudaTraining, LossFollowsTheFp32CurveAndStepsAllocateNothing) {
  NEXTRON_REQUIRE_GPU();
  const TrainCurveFixture fx;
  TrainOptions o = fx.options();
  o.device = "cuda";
  o.peak_tflops = 989;  // only the MFU denominator
  TrainBackend backend;
  backend.ops = std::make_shared<CudaOps>(0);
  Trainer trainer(
      o,
      [&](int64_t index, int64_t* out) {
        ASSERT_LT(index, fx.steps * fx.accum * fx.micro);
        fx.sample(index, out);
      },
      nullptr, backend);
  const Tensor loss = fx.expected.read_f32("loss");
  int64_t allocations_after_first = 0;
  for (int64_t s = 0; s < fx.steps; ++s) {
    const StepRecord r = trainer.step();
    EXPECT_NEAR(r.loss, loss.f32()[s], kCurveTol * loss.f32()[s]) << "step " << s;
    std::printf("step %lld: loss %.6f (fp32 curve %.6f)\n", static_cast<long long>(s), r.loss, loss.f32()[s]);
    if (s == 0) allocations_after_first = device_allocation_count();
  }
  EXPECT_EQ(device_allocation_count(), allocations_after_first) << "a step after the first allocated device memory";
}

// The vocab-parallel loss through CudaOps (its kernels are tested in test_loss_optim.cpp): combine defers the loss
// sum and the device's bad-target flag to resolve_reads(), which writes the sum or raises an error naming the
// vocabulary.
TEST(CudaOpsLoss, CombineSumsTheLossAndRejectsATargetOutsideTheVocabulary) {
  NEXTRON_REQUIRE_GPU();
  CudaOps ops(0);
  const int64_t N = 3, V = 10;
  // One rank's stats (1, 3, N): max 0 and sum of exponentials e^1 in every row, so lse = 1; target logits -2, 0, 0.
  const std::vector<float> stats_host = {0, 0, 0, std::exp(1.0f), std::exp(1.0f), std::exp(1.0f), -2, 0, 0};
  Tensor stats, targets, row_loss, lse;
  ops.upload(ops.f32(stats, {1, 3, N}), stats_host.data(), stats_host.size() * sizeof(float));
  ops.f32(row_loss, {N});
  ops.f32(lse, {N});
  const std::vector<int64_t> good = {4, -100, 9}, bad = {4, -100, 10};
  ops.upload(ops.i64(targets, {N}), good.data(), N * sizeof(int64_t));
  double sum = -1;
  ops.cross_entropy_combine(&sum, row_loss, lse, stats, targets, V);
  EXPECT_EQ(ops.pending_reads(), 2);  // the sum and the bad-target flag
  ops.resolve_reads();
  EXPECT_EQ(ops.pending_reads(), 0);
  EXPECT_NEAR(sum, (1.0 + 2.0) + 0.0 + (1.0 - 0.0), 1e-5);
  ops.upload(targets, bad.data(), N * sizeof(int64_t));
  ops.cross_entropy_combine(&sum, row_loss, lse, stats, targets, V);
  try {
    ops.resolve_reads();
    ADD_FAILURE() << "target 10 of a 10-id vocabulary was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("outside the vocabulary [0, 10)"), std::string::npos) << e.what();
  }
  EXPECT_EQ(ops.pending_reads(), 0);  // nothing is left pending after an error
}

// Deferred reads: read_later copies the value when it is enqueued (a later upload into the same tensor does not
// change what is read), resolve_reads delivers every pending value in one wait, sum_squares resolves them too, and
// a read-back larger than the buffer grows it. Uploads are staged: the host buffer may be overwritten at once, and
// more uploads than the 1 MiB ring holds (it wraps) or one larger than it (it grows) all arrive intact.
TEST(CudaOpsReads, DeferredReadsAndStagedUploads) {
  NEXTRON_REQUIRE_GPU();
  CudaOps ops(0);
  Tensor a, b;
  std::vector<float> host(1000);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(i);
  ops.upload(ops.f32(a, {1000}), host.data(), host.size() * sizeof(float));
  std::fill(host.begin(), host.end(), -1.0f);  // the upload was staged: overwriting the source is safe
  float first = 0, last = 0;
  ops.read_later(&first, a, sizeof(float));
  const std::vector<float> twos(1000, 2.0f);
  ops.upload(a, twos.data(), twos.size() * sizeof(float));  // after the read: the read sees the old value
  std::vector<float> all(1000, 0.0f);
  ops.read_later(all.data(), a, all.size() * sizeof(float));
  EXPECT_EQ(ops.pending_reads(), 2);
  ops.resolve_reads();
  EXPECT_EQ(first, 0.0f);
  EXPECT_EQ(all[999], 2.0f);
  // The gradient norm's wait resolves what is pending.
  ops.read_later(&last, a, sizeof(float));
  EXPECT_EQ(ops.sum_squares(a, {FlatRange{0, 1000}}), 4000.0);
  EXPECT_EQ(last, 2.0f);
  EXPECT_EQ(ops.pending_reads(), 0);
  // Wrapping the staging ring (4 MiB of uploads of 256 KiB with no wait between them, each read back) and growing
  // it (a 3 MiB upload).
  std::vector<float> chunk(65536), got(16, -1.0f);
  for (int round = 0; round < 16; ++round) {
    std::fill(chunk.begin(), chunk.end(), static_cast<float>(round));
    ops.upload(ops.f32(b, {65536}), chunk.data(), chunk.size() * sizeof(float));
    std::fill(chunk.begin(), chunk.end(), -7.0f);
    ops.read_later(&got[round], Tensor::view_of(b, 65535, {1}), sizeof(float));
  }
  ops.resolve_reads();
  for (int round = 0; round < 16; ++round) EXPECT_EQ(got[round], static_cast<float>(round)) << "upload " << round;
  // Above Ops::kStagedUploadBytes an upload is a plain copy and a wait (no pinned copy of weights is kept).
  {
    std::vector<float> weights((Ops::kStagedUploadBytes / 4) + 1000, 3.0f);
    Tensor w;
    ops.upload(ops.f32(w, {static_cast<int64_t>(weights.size())}), weights.data(), weights.size() * 4);
    std::fill(weights.begin(), weights.end(), -1.0f);
    float last_w = 0;
    ops.read_later(&last_w, Tensor::view_of(w, static_cast<int64_t>(weights.size()) - 1, {1}), 4);
    ops.resolve_reads();
    EXPECT_EQ(last_w, 3.0f);
  }
  std::vector<float> big(3 << 18, 5.0f);
  Tensor c;
  ops.upload(ops.f32(c, {static_cast<int64_t>(big.size())}), big.data(), big.size() * sizeof(float));
  std::vector<float> back(big.size(), 0.0f);
  ops.read_later(back.data(), c, back.size() * sizeof(float));  // larger than the read-back buffer: it grows
  ops.resolve_reads();
  EXPECT_EQ(back.front(), 5.0f);
  EXPECT_EQ(back.back(), 5.0f);
  // Many reads that overflow the buffer between two resolves (flushed on the way, grown at the resolve), twice:
  // every value arrives both times.
  for (int round = 0; round < 2; ++round) {
    std::vector<std::vector<float>> parts(40, std::vector<float>(8192, -1.0f));  // 40 x 32 KiB
    for (size_t i = 0; i < parts.size(); ++i)
      ops.read_later(parts[i].data(), Tensor::view_of(c, static_cast<int64_t>(i) * 8192, {8192}), 8192 * 4);
    ops.resolve_reads();
    for (size_t i = 0; i < parts.size(); ++i) ASSERT_EQ(parts[i][8191], 5.0f) << "round " << round << " read " << i;
  }
}

}  // namespace nextron::test
