// The layout planner (plan/planner.h): memory per rank against hand-written arithmetic, the 80B configs' sizes,
// invalid layouts left out, the ranking, the cluster file's errors. Its communication bytes are checked against a
// counting communicator in tests/mpi/test_planner_volume.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "core/error.h"
#include "model/activation_memory.h"
#include "plan/planner.h"

namespace nextron::plan {
namespace {

std::string source(const std::string& rel) { return std::string(NEXTRON_SOURCE_DIR) + "/" + rel; }

Workload tiny(int64_t seq_len, int64_t global_batch) {
  Workload w;
  w.config = ModelConfig::from_file(source("configs/models/qwen3-next-tiny.json"));
  w.seq_len = seq_len;
  w.global_batch = global_batch;
  return w;
}

Candidate layout(int world, int tp, bool sp, int pp = 1, int cp = 1, int ep = 1, int64_t mb = 1) {
  Candidate c;
  c.world = world;
  c.sizes.tp = tp;
  c.sizes.pp = pp;
  c.sizes.cp = cp;
  c.sizes.ep = ep;
  c.sizes.etp = tp;
  c.sequence_parallel = sp;
  c.micro_batch = mb;
  return c;
}

// qwen3-next-tiny (configs/models): V 512, H 128, I 256, 4 layers (3 Gated DeltaNet, then 1 attention: interval 4),
// every MLP sparse (8 experts of 128, top-2, shared 128); NH 4, NKV 2, D 32; Hk 2, Hv 4, dk = dv = 32, Kc 4.
// Parameters of one TP 2 rank, by hand:
//   DeltaNet layer: in_proj_qkvz (2*64 + 2*128) x 128 / 2 = 24576, in_proj_ba 8 x 128 / 2 = 512,
//                   conv1d (2*64 + 128) x 4 / 2 = 512, A_log 2, dt_bias 2, norm 32 (per head, whole),
//                   out_proj 128 x 128 / 2 = 8192                                                   = 33828
//   attention:      q_proj (2*4*32) x 128 / 2 = 16384, k_proj 1 head 32 x 128 = 4096, v_proj 4096,
//                   o_proj 128 x 128 / 2 = 8192, q_norm 32, k_norm 32                              = 32832
//   MoE:            router 8 x 128 = 1024 (whole), experts gate_up 8 x 256 x 128 / 2 = 131072,
//                   down 8 x 128 x 128 / 2 = 65536, shared gate_up 256 x 128 / 2 = 16384,
//                   shared down 128 x 128 / 2 = 8192, shared gate 128 (whole)                       = 222336
//   norms 2 x 128 per layer, final norm 128, embedding and lm_head 512 / 2 x 128 each
//   total = 3*33828 + 32832 + 4*222336 + 4*256 + 128 + 2*32768                                    = 1090348
//   + the alignment of every entry to 8 elements (ParamTable::kAlign): A_log and dt_bias (Hv 2 each) take 8,
//     +6 each in 3 DeltaNet layers                                                                 = 1090384
// TP gradient sync under SP: q_norm + k_norm 64, 3 DeltaNet norms 96, residual norms 8*128 + 128 = 1312.
// The scratch of that rank (scratch_bytes) at B 1, S 64 on the CPU (f32), by hand from the modules' members: N 64,
// Nl 32; local NH 2, NKV 1, D 32, rotary 8; Hk 1, Hv 2, KD 32, VD 64, CD 128, qkvz 192; MoE I 64, shared 64; V 256.
//   every layer (decoder.h):  mix_region_, mlp_region_ 2 N H 4 = 65536; mix_, mlp_ 2 Nl H 4 = 32768; dregion_full_
//                             N H 4 = 32768; dh1_, dh2_ 65536; dx_mid_ 16384; dh1_local_, dh2_local_, dscratch_
//                             3 Nl H 4 = 49152; dh2_replicated_ 32768                                     = 294912
//   MoE (moe.h, mlp.h):       logits_ N E 4 = 2048; dtopw_ 512; dprobs_, dlogits_ 4096; shared_gated_ 32768;
//                             dshared_ 32768; dshared_gate_ 256; shared dh_, dgu_ 3 N 64 4 = 49152        = 121600
//   DeltaNet (gated_deltanet.h): column tables (q, k, v of the conv output: CD) 4 = 512; don_, do_, dz_ 49152;
//                             dqn_, dkn_ 16384; dqkv_, dmixed_ 65536; dbeta_, dg_ 1024; db_, da_ 1024 (the
//                             projections and the conv write the record's tensors and read their gradients:
//                             no qkvz_, ba_, conv_, dqkvz_, dba_, dq_, dk_, dv_, dconv_ since #18)             = 133632
//   attention (attention.h):  q_cols_, gate_cols_ 512; cos_, sin_ 2 S 8 4 = 4096; dog_, dqg_ (2), do_, dq_, dqn_,
//                             dq_raw_ 7 N 64 4 = 114688; dk_, dv_, dkn_, dk_raw_ 4 N 32 4 = 32768             = 152064
//   model (model.h):          dhidden_a_, dhidden_b_ 32768; embed_region_ 32768; dembed_full_ 32768; dlogits_
//                             N 256 4 = 65536; dfinal_h_ 32768; dfinal_h_local_, dscratch_ 32768; ce_stats_ (1 + 2)
//                             3 N 4 = 2304                                                                 = 231680
//   Layers of one kind share everything but their index and RoPE tables (DecoderLayer::Scratch): the two kinds,
//   DeltaNet + MoE (3 layers) and attention + MoE (1), hold one copy each of the decoder's, the MoE's and their
//   mixer's buffers; the DeltaNet column tables (512) are per layer.
//   total = 2 (294912 + 121600) + 3 512 + (133632 - 512) + 152064 + 231680                           = 1351424
//   (one copy per layer, before the sharing: 4 (294912 + 121600) + 3 133632 + 152064 + 231680 = 2450688)
constexpr int64_t kTinyTp2Params = 1090384, kTinyTp2SpGradSync = 1312, kTinyTp2SpScratch = 1351424;

TEST(Planner, MemoryOfATp2SpDp2RankIsTheSumOfItsParts) {
  const Workload w = tiny(64, 8);
  Candidate c = layout(4, 2, true);
  ASSERT_EQ(layout_error(w, c), "");
  for (Device device : {Device::cpu, Device::cuda}) {
    const RankPlan r = plan_rank(w, c, 0, 0, device);
    EXPECT_EQ(r.params, kTinyTp2Params);
    const int64_t P = kTinyTp2Params, shard = (P + 1) / 2;  // ZeRO over DP 2
    EXPECT_EQ(r.memory.weights, (device == Device::cuda ? 6 : 4) * P) << "fp32 (+ bf16 on CUDA)";
    EXPECT_EQ(r.memory.grads, 4 * P);
    EXPECT_EQ(r.memory.optimizer, 2 * 4 * shard) << "AdamW's two fp32 moments of the shard";
    EXPECT_EQ(r.memory.buffers, 4 * (2 * shard + shard) + 4 * kTinyTp2SpGradSync)
        << "ZeRO's padded exchange buffer and received shard, the TP sync buffer";
    // One record at PP 1 (activation_record_bytes is checked byte for byte in test_activation_memory.cpp), of the
    // TP 2 rank's config (vocabulary padded to 128 x 2 = 256's multiple: 512 stays).
    ModelConfig full = w.config;
    full.padded_vocab_size = 512;
    ActivationShape shape;
    shape.B = 1;
    shape.S = 64;
    shape.tp = 2;
    shape.sequence_parallel = true;
    shape.device = device;
    const ActivationBytes rec =
        activation_record_bytes(tp_local_config(full, 2), StageRange::whole(full), shape, RecomputeOptions{});
    const int64_t record = rec.total() - rec.host;  // the CPU MoE state's host vectors are not tensor memory
    if (device == Device::cuda) {
      EXPECT_EQ(rec.host, 64 * 8 + 4 * (8 + 1) * 8) << "host targets, 4 x offsets";
    }
    EXPECT_EQ(r.memory.activations, record);
    if (device == Device::cpu) {
      EXPECT_EQ(r.memory.scratch, kTinyTp2SpScratch);
    }
    EXPECT_EQ(r.memory.total(), (device == Device::cuda ? 6 : 4) * P + 4 * P + 8 * shard + 12 * shard +
                                    4 * kTinyTp2SpGradSync + record + r.memory.scratch);
  }
}

TEST(Planner, PipelineRanksHoldTheirStagesAndTheScheduleRecords) {
  const Workload w = tiny(64, 8);
  Candidate c = layout(2, 1, false, 2);
  ASSERT_EQ(layout_error(w, c), "");
  const RankPlan r0 = plan_rank(w, c, 0, 0, Device::cpu), r1 = plan_rank(w, c, 1, 0, Device::cpu);
  // Stage 0: embedding 65536 + 2 DeltaNet layers with MoE + their norms; stage 1: a DeltaNet and the attention layer,
  // final norm, lm_head. DeltaNet layer whole: 67624, attention 65600, MoE 443520 (tests/unit's hand count at TP 1),
  // each DeltaNet layer + 8 elements of alignment (A_log and dt_bias, Hv 4 each, take 8: ParamTable::kAlign).
  EXPECT_EQ(r0.params, 65536 + 2 * (67624 + 8 + 443520 + 256));
  EXPECT_EQ(r1.params, 67624 + 8 + 65600 + 2 * (443520 + 256) + 128 + 65536);
  EXPECT_EQ(r0.params + r1.params, 2174776 + 3 * 8) << "docs/parallel.md: qwen3-next-tiny has 2,174,776 parameters";
  // 8 micro-batches of 1F1B: rank 0 keeps min(p - r, M) = 2 records, rank 1 one, plus its send buffer.
  ModelConfig full = w.config;
  full.padded_vocab_size = 512;
  ActivationShape shape;
  shape.B = 1;
  shape.S = 64;
  shape.pipeline = true;
  const ActivationBytes a0 = activation_record_bytes(full, {0, 2, true, false}, shape, {}),
                        a1 = activation_record_bytes(full, {2, 4, false, true}, shape, {});
  const int64_t rec0 = a0.total() - a0.host, rec1 = a1.total() - a1.host;
  EXPECT_EQ(r0.memory.activations, 2 * rec0);
  EXPECT_EQ(r1.memory.activations, rec1 + (64 * 128 + 2 * 8) * 4);
}

TEST(Planner, Qwen3Next80BHasAbout80BParametersAnd3BActive) {
  for (const char* name : {"configs/models/qwen3-next-80b-a3b.json", "configs/models/qwen3-next-80b-a3b-64e.json"}) {
    const ModelConfig config = ModelConfig::from_file(source(name));
    const ModelSize s = model_size(config);
    if (config.num_experts == 512) {
      // 79,674,391,296 without the multi-token-prediction layer (not implemented; HF's "80B" counts it).
      EXPECT_GE(s.total, 79.6e9) << name;
      EXPECT_LE(s.total, 81.5e9) << name;
    }
    EXPECT_GE(s.active, 2.5e9) << name;
    EXPECT_LE(s.active, 4.5e9) << name;
    // The planner's one-rank parameter count is the model's.
    Workload w;
    w.config = config;
    w.seq_len = 4096;
    w.global_batch = 8;
    const RankPlan r = plan_rank(w, layout(1, 1, false), 0, 0, Device::cuda);
    EXPECT_EQ(r.params, s.total) << name << " (151936 is a multiple of 128: no padding)";
  }
}

TEST(Planner, InvalidLayoutsAreExcluded) {
  const Workload w = tiny(64, 8);
  EXPECT_NE(layout_error(w, layout(3, 3, false)), "") << "TP 3 does not divide 4 heads";
  EXPECT_NE(layout_error(w, layout(2, 2, false, 1, 1, 1, 3)), "") << "global batch 8 is not a multiple of 3 x 1";
  EXPECT_NE(layout_error(w, layout(8, 1, false, 8)), "") << "PP 8 over 4 layers";
  EXPECT_NE(layout_error(w, layout(3, 1, false, 1, 1, 3)), "") << "EP 3 does not divide 8 experts";
  EXPECT_NE(layout_error(tiny(65, 8), layout(2, 2, true)), "") << "SP needs seq_len % TP == 0";
  EXPECT_NE(layout_error(tiny(64, 8), layout(16, 1, false, 1, 16)), "") << "CP 16 zigzag: chunks of 2 < conv 3";
  SearchSpace space;
  space.micro_batches = {1, 2};
  Cluster cluster;
  const std::vector<Plan> plans = enumerate(tiny(64, 24), 6, space, cluster, 0.5);
  ASSERT_FALSE(plans.empty());
  for (const Plan& p : plans) {
    const ParallelSizes& s = p.layout.sizes;
    EXPECT_EQ(4 % s.tp, 0) << p.layout.describe();
    EXPECT_EQ(8 % s.ep, 0) << p.layout.describe();
    EXPECT_EQ(4 % (s.pp * s.vpp), 0) << p.layout.describe();
    EXPECT_EQ(24 % (p.layout.micro_batch * p.dp), 0) << p.layout.describe();
    EXPECT_EQ(layout_error(tiny(64, 24), p.layout), "") << p.layout.describe();
  }
  EXPECT_TRUE(std::any_of(plans.begin(), plans.end(), [](const Plan& p) { return p.layout.sizes.tp == 2; }));
  EXPECT_TRUE(std::any_of(plans.begin(), plans.end(), [](const Plan& p) { return p.layout.sizes.ep == 2; }));
}

TEST(Planner, RankedByEstimatedTimeFittingFirst) {
  const Workload w = tiny(256, 16);
  SearchSpace space;
  space.micro_batches = {1, 2};
  Cluster cluster;
  cluster.memory_bytes = 40e6;  // some fit, some do not
  cluster.gpus_per_node = 2;
  const std::vector<Plan> plans = enumerate(w, 4, space, cluster, 0.5);
  ASSERT_GT(plans.size(), 10u);
  const auto fitting = std::count_if(plans.begin(), plans.end(), [](const Plan& p) { return p.fits; });
  EXPECT_GT(fitting, 0);
  EXPECT_LT(fitting, static_cast<long>(plans.size()));
  for (size_t i = 1; i < plans.size(); ++i) {
    EXPECT_FALSE(!plans[i - 1].fits && plans[i].fits) << "a fitting layout after one that does not fit at " << i;
    if (plans[i - 1].fits == plans[i].fits) {
      EXPECT_LE(plans[i - 1].step_s, plans[i].step_s) << i;
    }
    const Plan& p = plans[i];
    EXPECT_NEAR(
        p.step_s,
        p.compute_s + p.recompute_s + p.bubble_s + p.optimizer_s +
            [&] {
              double c = 0;
              for (double s : p.comm_s) c += s;
              return c;
            }(),
        1e-12 * p.step_s);
    EXPECT_EQ(p.fits, static_cast<double>(p.largest.memory.total()) <= cluster.memory_bytes);
  }
  // Recomputation costs time and saves memory.
  Candidate none = layout(1, 1, false), full = none;
  full.recompute_name = "full";
  full.recompute = recompute_preset("full");
  const Plan a = evaluate(w, none, cluster, 0.5), b = evaluate(w, full, cluster, 0.5);
  EXPECT_LT(b.largest.memory.activations, a.largest.memory.activations);
  EXPECT_GT(b.step_s, a.step_s);
  // Full recomputation reruns every layer's forward: a third of the training FLOPs less the lm_head's share.
  EXPECT_NEAR(b.recompute_s, a.compute_s / 3, a.compute_s / 3 * 0.1) << "about one forward";
}

// enumerate() shares per-layer parameter tables across layouts (PlanCache); every layout it returns must have the
// figures evaluate() gives it alone, from scratch: the tiny model on 8 ranks (TP, CP, PP, VPP, EP, all recomputation
// presets) and the 80B model on 64 H100s (512 experts, uneven chunk contents across PP and VPP).
TEST(Planner, EnumerationEqualsEvaluatingEachLayoutAlone) {
  const Cluster h100 = load_cluster(source("configs/clusters/h100-dgx.json"));
  Workload big;
  big.config = ModelConfig::from_file(source("configs/models/qwen3-next-80b-a3b.json"));
  big.seq_len = 4096;
  big.global_batch = 1024;
  SearchSpace space;
  space.max_cp = 4;
  for (const auto& [w, world] : {std::pair<Workload, int>{tiny(64, 16), 8}, {big, 64}}) {
    const std::vector<Plan> plans = enumerate(w, world, space, h100, 0.5);
    ASSERT_GT(plans.size(), 20u);
    for (const Plan& p : plans) {
      const Plan alone = evaluate(w, p.layout, h100, 0.5);
      ASSERT_EQ(p.largest.memory.total(), alone.largest.memory.total()) << p.layout.describe();
      ASSERT_EQ(p.largest.params, alone.largest.params) << p.layout.describe();
      for (int a = 0; a < kAxes; ++a) ASSERT_EQ(p.max_bytes.bytes[a], alone.max_bytes.bytes[a]) << p.layout.describe();
      ASSERT_EQ(p.step_s, alone.step_s) << p.layout.describe();
    }
  }
}

TEST(Planner, ClusterFileErrorsNameTheKey) {
  const Cluster h100 = load_cluster(source("configs/clusters/h100-dgx.json"));
  EXPECT_EQ(h100.gpus_per_node, 8);
  EXPECT_DOUBLE_EQ(h100.peak_flops, 989e12);
  EXPECT_DOUBLE_EQ(h100.inter_node_bytes_per_s, 50e9);
  EXPECT_DOUBLE_EQ(h100.intra_node_bytes_per_s, 450e9);
  const std::string good =
      R"("gpus_per_node": 8, "gpu_memory_gib": 80, "peak_tflops": 989, "intra_node_gbps": 450, "inter_node_gbps": 50,
         "hbm_gbps": 3350)";
  EXPECT_NO_THROW(cluster_from_json("{" + good + "}", "x"));
  try {
    cluster_from_json("{" + good + R"(, "gpu_memry_gib": 80})", "my.json");
    ADD_FAILURE() << "an unknown key must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown key \"gpu_memry_gib\""), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("gpu_memory_gib"), std::string::npos) << "names the keys: " << e.what();
  }
  try {
    cluster_from_json(R"({"gpus_per_node": 8})", "my.json");
    ADD_FAILURE() << "a missing key must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing \"gpu_memory_gib\""), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_cluster("/nonexistent/cluster.json"), Error);
  EXPECT_THROW(recompute_preset("partial"), Error);
}

}  // namespace
}  // namespace nextron::plan
