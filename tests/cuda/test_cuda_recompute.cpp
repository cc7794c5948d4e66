// Activation recomputation on the GPU (CudaOps): every selective module (core_attn on both mixers, layernorm, mlp,
// moe, moe_act with its CUDA scratch, shared_experts) and full recomputation give the gradients of the run without
// it, with two micro-batches in flight in their own records. The rerun is the same kernels on the same inputs, and
// those kernels are deterministic (test_blas RepeatedCallsAreBitIdentical, test_attention
// DeterministicBackwardOverwritesAndIsReproducible), so the comparison is bit for bit, as on the CPU
// (tests/unit/test_recompute.cpp).
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "cuda_test_util.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/init.h"
#include "model/model.h"

namespace nextron::test {

namespace {

struct GpuRun {
  std::vector<double> losses;
  std::vector<float> grads;
};

GpuRun run_on_gpu(const ModelConfig& config, const RecomputeOptions& options) {
  Model model(config, {}, std::make_shared<CudaOps>(0));
  Tensor host = Tensor::zeros({model.table().total_numel()});
  init_parameters(model.table(), host.f32(), 11);
  model.params().copy_from(host);
  model.params_changed();
  model.set_recompute(options);
  const int64_t B = 2, S = 70;  // two delta-rule chunks, the second partial
  std::mt19937_64 rng(5);
  std::vector<int64_t> ids1(B * S), ids2(B * S), t1(B * S), t2(B * S);
  for (auto* v : {&ids1, &ids2, &t1, &t2})
    for (auto& t : *v) t = int64_t(rng() % uint64_t(config.vocab_size));
  ModelActivations a1, a2;
  model.zero_grad();
  GpuRun r;
  r.losses.push_back(model.forward_targets(a1, ids1.data(), t1.data(), B, S).loss);
  r.losses.push_back(model.forward_targets(a2, ids2.data(), t2.data(), B, S).loss);
  model.backward(a1, 0.5f);
  model.backward(a2, 0.5f);
  Tensor grads = Tensor::zeros(model.grads().shape());
  grads.copy_from(model.grads());
  r.grads.assign(grads.f32(), grads.f32() + grads.numel());
  return r;
}

}  // namespace

TEST(CudaRecompute, EveryModuleEqualsTheRunWithoutIt) {
  NEXTRON_REQUIRE_GPU();
  const ModelConfig config = read_hf_config((std::filesystem::path(fixtures_dir()) / "hybrid_moe").string());
  const GpuRun want = run_on_gpu(config, {});
  const std::vector<RecomputeOptions> cases = {
      {"selective", "", 0, {"core_attn"}},
      {"selective", "", 0, {"moe_act"}},
      {"selective", "", 0, {"shared_experts"}},
      {"selective", "", 0, {"layernorm"}},
      {"selective", "", 0, {"moe"}},
      {"full", "uniform", 1, {}},
      {"selective", "", 0, {"core_attn", "layernorm", "moe_act", "shared_experts"}}};
  for (const RecomputeOptions& o : cases) {
    std::string name = o.granularity;
    for (const auto& m : o.modules) name += " " + m;
    SCOPED_TRACE(name);
    const GpuRun got = run_on_gpu(config, o);
    EXPECT_EQ(got.losses, want.losses);
    ASSERT_EQ(got.grads.size(), want.grads.size());
    size_t differ = 0;
    for (size_t i = 0; i < got.grads.size(); ++i) differ += got.grads[i] != want.grads[i];
    EXPECT_EQ(differ, 0u) << "gradient elements that differ";
  }
}

}  // namespace nextron::test
