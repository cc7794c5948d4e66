// Activation memory on the GPU backend: a fresh record's growth of live memory (device and host Tensor storage plus
// the record's host vectors) through its forward and backward equals model/activation_memory.h's closed form for
// CudaOps (bf16 activations, the CUDA MoE dispatch layout), without recomputation and with every module recomputed.
// The CPU side of the same rule runs in tests/unit/test_activation_memory.cpp on every fixture and stage kind.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "cuda_test_util.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/activation_memory.h"
#include "model/model.h"

namespace nextron::test {

TEST(CudaActivationMemory, AFreshRecordHoldsWhatTheFormulaSays) {
  NEXTRON_REQUIRE_GPU();
  const ModelConfig config = read_hf_config((std::filesystem::path(fixtures_dir()) / "hybrid_moe").string());
  const int64_t B = 2, S = 70;
  std::vector<int64_t> ids(B * S), targets(B * S);
  for (int64_t i = 0; i < B * S; ++i) {
    ids[i] = (i * 29 + 5) % config.vocab_size;
    targets[i] = (i * 11 + 4) % config.vocab_size;
  }
  const auto live = [] { return live_tensor_bytes(Device::cuda) + live_tensor_bytes(Device::cpu); };
  for (const RecomputeOptions& recompute :
       std::vector<RecomputeOptions>{{},
                                     {"full", "uniform", 2, {}},
                                     {"selective", "", 0, {"core_attn", "layernorm", "moe_act", "shared_experts"}},
                                     {"selective", "", 0, {"mlp", "moe"}}}) {
    std::string name = recompute.granularity;
    for (const auto& m : recompute.modules) name += " " + m;
    SCOPED_TRACE(name);
    Model model(config, {}, std::make_shared<CudaOps>(0));
    model.set_recompute(recompute);
    ModelActivations warm, fresh;
    model.forward_targets(warm, ids.data(), targets.data(), B, S);
    model.backward(warm, 1.0f);
    const int64_t before = live();
    model.forward_targets(fresh, ids.data(), targets.data(), B, S);
    model.backward(fresh, 1.0f);
    const int64_t measured = live() - before + record_host_bytes(fresh);
    ActivationShape shape;
    shape.B = B;
    shape.S = S;
    shape.device = Device::cuda;
    EXPECT_EQ(measured, activation_record_bytes(model.local_config(), model.stage(), shape, recompute).total());
  }
}

}  // namespace nextron::test
