// Tensor (and sequence) parallelism on the CUDA backend: the tiny Qwen3-Next of the MPI equivalence tests trained
// for 2 AdamW steps at TP = world size over NCCL, one GPU per rank, against the same run on one GPU (in every rank's
// process, on its own GPU, before the parallel run). Needs 2 GPUs (np 2); skips otherwise.
//
// Tolerances (bf16 activations, fp32 master weights, gradients and statistics): TP changes where bf16 rounding
// happens: a row-parallel GEMM's partial sums are rounded to bf16 on each rank and summed in bf16 over the group
// (Megatron's reduce_from_tensor_region), where one GPU rounds the fp32-accumulated total once. Each region exit thus
// adds about one bf16 ulp (2^-8 = 3.9e-3) of relative noise, ~6 region exits deep before the loss. Losses: 1e-2
// relative. Gradients of the first step: every tensor's largest difference within 5e-2 of its largest |value| (the
// GPU model test holds bf16 against fp32 to 1e-1). Weights after 2 steps: AdamW moves every element by about lr
// whatever its gradient, so an element whose gradient is near zero may move by up to 2 lr differently (2e-3 at
// lr 1e-3): 2.5e-3 absolute plus 1e-2 of the tensor's largest |value|.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "../mpi/mpi_fixture.h"
#include "../mpi/tiny_model.h"
#include "comm/cuda/nccl_communicator.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/param_table.h"
#include "nccl_env.h"
#include "train/trainer.h"

namespace nextron::test {

namespace {

constexpr int64_t kSeq = 16, kBatch = 4, kSteps = 2;

void sample(int64_t index, int64_t* out) { tiny_sample(index, out, kSeq); }

TrainOptions options(int tp, bool sp) {
  TrainOptions o;
  o.model_config = tiny_config_path();
  o.device = "cuda";
  o.peak_tflops = 989;  // MFU's denominator only
  o.seq_len = kSeq;
  o.micro_batch = kBatch;
  o.global_batch = 2 * kBatch;  // two micro-batches: gradient accumulation
  o.train_steps = kSteps;
  o.lr.lr = 1e-3;
  o.lr.warmup_steps = 1;
  o.adam.weight_decay = 0.1;
  o.clip_grad = 0.5;
  o.initializer_range = 0.2;
  o.resume = "none";
  o.progress = false;
  o.parallel.tp = tp;
  o.sequence_parallel = sp;
  return o;
}

struct RunResult {
  std::vector<double> loss;
  std::vector<float> first_grads, final_params;
};

RunResult train(const TrainOptions& o, Communicator* world, const std::shared_ptr<CudaOps>& ops) {
  TrainBackend backend;
  backend.ops = ops;
  backend.device_comm = [ops](Communicator& mpi) -> std::unique_ptr<Communicator> {
    return NcclCommunicator::create(dynamic_cast<MpiCommunicator&>(mpi), ops->device_index(), ops->stream());
  };
  Trainer t(o, sample, world, backend);
  RunResult r;
  for (int64_t s = 0; s < kSteps; ++s) {
    r.loss.push_back(t.step().loss);
    if (s == 0) r.first_grads = t.full_grads();
  }
  r.final_params = t.full_params();
  return r;
}

class CudaTensorParallel : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (!g_skip_reason.empty()) GTEST_SKIP() << g_skip_reason;
    if (world_size() < 2) GTEST_SKIP() << "tensor parallelism on GPUs needs 2 ranks with a GPU each (np 2)";
  }
  void TearDown() override { fail_on_rank0_when_another_rank_failed(HasFailure()); }
};

TEST_P(CudaTensorParallel, MatchesOneGpu) {
  const bool sp = GetParam();
  auto ops = std::make_shared<CudaOps>(g_device);
  const RunResult want = train(options(1, false), nullptr, ops);
  const RunResult got = train(options(world_size(), sp), g_mpi, ops);
  double loss_rel = 0;
  for (int64_t s = 0; s < kSteps; ++s) {
    loss_rel = std::max(loss_rel, std::fabs(got.loss[s] - want.loss[s]) / std::fabs(want.loss[s]));
    EXPECT_NEAR(got.loss[s], want.loss[s], 1e-2 * std::fabs(want.loss[s])) << "loss of step " << s + 1;
  }
  const double grad_rel = expect_tensors_close(got.first_grads, want.first_grads, 5e-2, 0, "gradient (step 1)");
  const double weight_rel =
      expect_tensors_close(got.final_params, want.final_params, 1e-2, 2.5e-3, "weights after 2 steps");
  if (world_rank() == 0)
    std::printf("TP%d%s on GPUs vs one GPU: loss %.1e (relative); worst tensor: gradients %.1e, weights %.1e\n",
                world_size(), sp ? " + SP" : "", loss_rel, grad_rel, weight_rel);
}

INSTANTIATE_TEST_SUITE_P(Modes, CudaTensorParallel, ::testing::Values(false, true),
                         [](const auto& param_info) { return std::string(param_info.param ? "SP" : "NoSP"); });

// Pipeline parallelism on GPUs: PP = the world (1F1B over 2 micro-batches, and interleaved with 2 chunks per rank):
// activations, gradients and router statistics cross between the GPUs over NCCL (batched send/recv on the compute
// stream). The same kernels run on the same shapes as on one GPU, so the tolerances of tensor parallelism are loose
// here; what they catch is a wrong tensor crossing a boundary.
class CudaPipeline : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (!g_skip_reason.empty()) GTEST_SKIP() << g_skip_reason;
    if (world_size() < 2) GTEST_SKIP() << "pipeline parallelism on GPUs needs 2 ranks with a GPU each (np 2)";
  }
  void TearDown() override { fail_on_rank0_when_another_rank_failed(HasFailure()); }
};

TEST_P(CudaPipeline, MatchesOneGpu) {
  const int vpp = GetParam();
  auto ops = std::make_shared<CudaOps>(g_device);
  const RunResult want = train(options(1, false), nullptr, ops);
  TrainOptions o = options(1, false);
  o.parallel.pp = world_size();
  o.parallel.vpp = vpp;
  const RunResult got = train(o, g_mpi, ops);
  for (int64_t s = 0; s < kSteps; ++s)
    EXPECT_NEAR(got.loss[s], want.loss[s], 1e-2 * std::fabs(want.loss[s])) << "loss of step " << s + 1;
  const double grad_rel = expect_tensors_close(got.first_grads, want.first_grads, 5e-2, 0, "gradient (step 1)");
  const double weight_rel =
      expect_tensors_close(got.final_params, want.final_params, 1e-2, 2.5e-3, "weights after 2 steps");
  if (world_rank() == 0)
    std::printf(
        "PP%d x VPP%d on GPUs vs one GPU: loss step 1 %.9g vs %.9g; worst tensor: gradients %.1e, weights %.1e\n",
        world_size(), vpp, got.loss[0], want.loss[0], grad_rel, weight_rel);
}

INSTANTIATE_TEST_SUITE_P(Schedules, CudaPipeline, ::testing::Values(1, 2),
                         [](const auto& param_info) { return "VPP" + std::to_string(param_info.param); });

// Expert parallelism on GPUs: EP = DP = the world, the 8 experts split over the GPUs, each micro-batch's routed rows
// crossing by NCCL all-to-all (bf16 rows; counts and expert ids over MPI), the dense parameters reduced over DP and
// the experts over EDP (1 here). The reference is one GPU with the whole global micro-batch.
TEST(CudaExpertParallel, MatchesOneGpu) {
  if (!g_skip_reason.empty()) GTEST_SKIP() << g_skip_reason;
  if (world_size() < 2) GTEST_SKIP() << "expert parallelism on GPUs needs 2 ranks with a GPU each (np 2)";
  auto ops = std::make_shared<CudaOps>(g_device);
  const RunResult want = train(options(1, false), nullptr, ops);
  TrainOptions o = options(1, false);
  o.micro_batch = kBatch / world_size();
  o.parallel.ep = world_size();
  const RunResult got = train(o, g_mpi, ops);
  for (int64_t s = 0; s < kSteps; ++s)
    EXPECT_NEAR(got.loss[s], want.loss[s], 1e-2 * std::fabs(want.loss[s])) << "loss of step " << s + 1;
  const double grad_rel = expect_tensors_close(got.first_grads, want.first_grads, 5e-2, 0, "gradient (step 1)");
  const double weight_rel =
      expect_tensors_close(got.final_params, want.final_params, 1e-2, 2.5e-3, "weights after 2 steps");
  if (world_rank() == 0)
    std::printf("EP%d on GPUs vs one GPU: loss step 1 %.9g vs %.9g; worst tensor: gradients %.1e, weights %.1e\n",
                world_size(), got.loss[0], want.loss[0], grad_rel, weight_rel);
  fail_on_rank0_when_another_rank_failed(HasFailure());
}

}  // namespace

}  // namespace nextron::test
