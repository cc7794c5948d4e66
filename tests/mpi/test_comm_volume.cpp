// Communication volume and optimizer memory of the parallel layouts.
//
// 1. Bytes sent per rank per optimizer step, counted by a CountingCommunicator around the world (ring accounting,
//    see comm/counting_communicator.h), equal the analytic formula of the layout, derived here from the model's
//    dimensions and the design of the TP/SP regions, the vocab-parallel loss, the TP gradient sync and ZeRO-1, and
//    not read back from the code under test (only P_local, the local flat parameter count, comes from the model).
//
//    Notation: t = TP, d = DP, w = t d; N = micro_batch * seq_len tokens per micro-batch per DP rank; A accumulation
//    steps; H hidden; L layers (Lf full-attention, Ll DeltaNet); Lm MoE layers, Ls of them with a shared expert; K
//    experts per token; E experts; D head_dim; NKV KV heads; dv DeltaNet value head dim. ar(p, n, b) = 2 (p-1)/p n b
//    (ring all-reduce of n elements of b bytes), ag/rs(p, c, b) = (p-1) c b (c per rank).
//
//      TP group, per micro-batch (t > 1):
//        regions  without SP: 4L+2 all-reduces of N H floats (forward: the embedding exit and 2 exits per layer;
//                 backward: the lm_head entry and 2 entries per layer)                       (4L+2) ar(t, N H, 4)
//                 with SP: those become 4L+2 all-gathers + 4L+2 reduce-scatters of N/t H     (8L+4) (t-1) N/t H 4
//        MoE      dtopw (N K floats) per MoE layer, dsg (N floats) per shared expert     Lm ar(t, N K, 4) + Ls ar(t, N,
//        4) loss     all-gather of the N row maxima, all-reduce of 2N doubles               (t-1) N 4 + ar(t, 2N, 8)
//      TP group, per step: the gradient sync, one all-reduce of G floats                            ar(t, G, 4)
//        G = Lf 2D (q_norm, k_norm) + Ll dv (gated norm) + [SP] (2L+1) H (residual norms)
//            + [NKV < t] Lf 2 NKV D H (full-size k_proj and v_proj slots)
//      DP group, per micro-batch (d > 1): the scored-token count (1 double), the MoE statistics (2E+1 doubles)
//                                                                              ar(d, 1, 8) + [Lm > 0] ar(d, 2E+1, 8)
//      DP group, per step: the A micro-batches' loss sums, read after the step's one wait (one all-reduce)
//                                                                                                   ar(d, A, 8)
//      DP group, per step: ZeRO-1 reduce-scatter + all-gather of ceil(P_local/d) floats     2 (d-1) ceil(P_local/d) 4
//      world, per step: the gradient norm's sum of squares                                          ar(w, 1, 8)
//
//    bytes/rank/step = A (TP_mb + DP_mb) + TP_sync + ZeRO + world. Exact (counts times 2(p-1)/p): 1e-9 relative.
//
// 2. ZeRO-1 optimizer state per rank (AdamW's two fp32 moments of the rank's shard) is 2 * 4 * shard bytes, the
//    shard being the ceil(P/d) split of the flat buffer: it falls as 1/DP, within one padding element.
//
// 3. Pipeline point-to-point bytes (below, with their formula).
//
// 4. Expert parallelism (below): with --moe-router-force-load-balancing every rank sends N K / EP routed rows to each
//    EP rank per MoE layer and micro-batch, so the EP group's bytes are exact, and the experts' ZeRO runs over EDP.
//
// 5. Context parallelism (below): the CP group's bytes per step from the mixers' exchanges, exact.
//
// 6. Pipeline activation memory: the records a real pipeline run keeps per chunk (the runner's pools) hold
//    exactly model/activation_memory.h's bytes each, and their count is the schedule's in-flight count of that chunk.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <ostream>

#include "comm/counting_communicator.h"
#include "model/activation_memory.h"
#include "mpi_fixture.h"
#include "parallel/schedule.h"
#include "tiny_model.h"
#include "tiny_train_options.h"
#include "train/trainer.h"

namespace nextron::test {

namespace {

constexpr int64_t kVocab = kTinyVocab, kH = kTinyHidden, kL = kTinyLayers, kLfull = kTinyFullLayers,
                  kLlin = kTinyLinearLayers, kLmoe = kTinyMoeLayers, kLshared = kTinySharedLayers, kK = kTinyTopK,
                  kE = kTinyExperts, kHeadDim = kTinyHeadDim, kNkv = kTinyKvHeads, kDv = kTinyValueHeadDim;
constexpr int64_t kSeq = 16, kGlobalBatch = 16;

void sample(int64_t index, int64_t* out) { tiny_sample(index, out, kSeq); }

// micro_batch 2 up to DP 4 and 1 at DP 8: A = 8, 4, 2, 2 accumulation steps at DP 1, 2, 4, 8.
int64_t micro_batch(int dp) { return dp <= 4 ? 2 : 1; }

TrainOptions options(int tp, bool sp, int dp) {
  TrainOptions o = tiny_step_options(kSeq, kGlobalBatch, micro_batch(dp));
  o.parallel.tp = tp;
  o.sequence_parallel = sp;
  return o;
}

// Ring all-reduce bytes a rank sends for n elements of b bytes over p ranks.
double ar(int p, double n, double b) { return p > 1 ? 2.0 * (p - 1) / p * n * b : 0.0; }
// All-gather / reduce-scatter bytes for c elements per rank.
double ag(int p, double c, double b) { return (p - 1) * c * b; }

struct Expected {
  double tp_bytes = 0, dp_bytes = 0, world_bytes = 0;
  int64_t tp_all_reduce = 0, tp_all_gather = 0, tp_reduce_scatter = 0;
  int64_t dp_all_reduce = 0, dp_all_gather = 0, dp_reduce_scatter = 0;
  int64_t world_all_reduce = 0;
  double total() const { return tp_bytes + dp_bytes + world_bytes; }
};

// The analytic volume of one optimizer step for TP t (with or without SP) x DP d. p_local: the rank's flat
// parameter count (its TP shard).
Expected formula(int t, bool sp, int d, int64_t p_local) {
  const int w = t * d;
  const double N = static_cast<double>(micro_batch(d) * kSeq), H = kH;
  const int64_t A = kGlobalBatch / (micro_batch(d) * d), regions = 4 * kL + 2;
  Expected e;
  if (t > 1) {
    const double region_bytes =
        sp ? 2.0 * static_cast<double>(regions) * ag(t, N / t * H, 4) : static_cast<double>(regions) * ar(t, N * H, 4);
    const double moe_bytes = kLmoe * ar(t, N * kK, 4) + kLshared * ar(t, N, 4);
    const double loss_bytes = ag(t, 3 * N, 4);  // vocab-parallel cross-entropy: (max, sum exp, target logit)
    const int64_t G = kLfull * 2 * kHeadDim + kLlin * kDv + (sp ? (2 * kL + 1) * kH : 0) +
                      (kNkv < t ? kLfull * 2 * kNkv * kHeadDim * kH : 0);
    e.tp_bytes = static_cast<double>(A) * (region_bytes + moe_bytes + loss_bytes) + (G > 0 ? ar(t, G, 4) : 0.0);
    e.tp_all_reduce = A * ((sp ? 0 : regions) + kLmoe + kLshared) + (G > 0 ? 1 : 0);
    e.tp_all_gather = A * ((sp ? regions : 0) + 1);
    e.tp_reduce_scatter = A * (sp ? regions : 0);
  }
  if (d > 1) {
    const int64_t capacity = (p_local + d - 1) / d;
    e.dp_bytes = static_cast<double>(A) * (ar(d, 1, 8) + (kLmoe > 0 ? ar(d, 2 * kE + 1, 8) : 0.0)) + ar(d, A, 8) +
                 2 * ag(d, static_cast<double>(capacity), 4);
    e.dp_all_reduce = A * (1 + (kLmoe > 0 ? 1 : 0)) + 1;
    e.dp_all_gather = 1;
    e.dp_reduce_scatter = 1;
  }
  if (w > 1) {
    e.world_bytes = ar(w, 1, 8);
    e.world_all_reduce = 1;
  }
  return e;
}

void expect_bytes(double got, double want, const std::string& what) {
  EXPECT_NEAR(got, want, 1e-9 * std::max(1.0, std::fabs(want))) << what;
}

struct LayoutCase {
  const char* name;
  int world, tp;
  bool sp;
};

// Names the layout in gtest's messages (instead of the struct's bytes).
void PrintTo(const LayoutCase& c, std::ostream* os) { *os << c.name; }

class CommVolumeLayouts : public Mpi, public ::testing::WithParamInterface<LayoutCase> {};

TEST_P(CommVolumeLayouts, BytesPerStepMatchFormula) {
  const LayoutCase& c = GetParam();
  if (c.world != world_size()) GTEST_SKIP() << c.name << " runs at " << c.world << " ranks";
  const int t = c.tp, d = c.world / c.tp;
  CountingCommunicator world(*comm_);
  Trainer trainer(options(t, c.sp, d), sample, &world);
  // Construction splits the world into the TP, DP, PP, EP, EDP, CP and DP x CP groups and agrees once on whether rank
  // 0's start-up checks of the output paths passed (one all-reduce of one double), nothing else.
  const CommVolume& built = *world.volume();
  const bool parallel = c.world > 1;
  // (the ring all-reduce's counted bytes, 2 (p - 1) / p x n x b, for n = 1 double over the world of p ranks)
  const double check_bytes = 2.0 * (c.world - 1) / c.world * double(sizeof(double));
  EXPECT_DOUBLE_EQ(built.total_bytes(), parallel ? check_bytes : 0.0) << built.describe();
  EXPECT_EQ(built.calls_of(CommOp::split), parallel ? 7 : 0) << built.describe();
  EXPECT_EQ(built.calls_of(CommOp::all_reduce), parallel ? 1 : 0) << built.describe();
  EXPECT_EQ(built.total_calls(), built.calls_of(CommOp::split) + built.calls_of(CommOp::all_reduce))
      << built.describe();
  world.volume()->reset();
  world.reset_own();

  // The TP and DP groups are the world's splits, so CountingCommunicators too (the dense gradients and the loss reduce
  // over DP x CP: the DP group itself at CP 1).
  CountingCommunicator* tp = nullptr;
  CountingCommunicator* dp = nullptr;
  if (trainer.parallel()) {
    tp = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->tp());
    dp = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->dp_cp());
    ASSERT_TRUE(tp && dp);
    ASSERT_EQ(tp->size(), t);
    ASSERT_EQ(dp->size(), d);
    EXPECT_EQ(tp->own().total_calls() + dp->own().total_calls(), 0);
  }

  trainer.step();

  const Expected want = formula(t, c.sp, d, trainer.model().table().total_numel());
  const double got = world.volume()->total_bytes();
  expect_bytes(got, want.total(), "bytes sent by this rank in one step: " + world.volume()->describe());
  const CommVolume none;
  const CommVolume& tp_v = tp ? tp->own() : none;
  const CommVolume& dp_v = dp ? dp->own() : none;
  expect_bytes(tp_v.total_bytes(), want.tp_bytes, "TP group: " + tp_v.describe());
  expect_bytes(dp_v.total_bytes(), want.dp_bytes, "DP group: " + dp_v.describe());
  expect_bytes(world.own().total_bytes(), want.world_bytes, "world: " + world.own().describe());
  EXPECT_EQ(tp_v.calls_of(CommOp::all_reduce), want.tp_all_reduce) << tp_v.describe();
  EXPECT_EQ(tp_v.calls_of(CommOp::all_gather), want.tp_all_gather) << tp_v.describe();
  EXPECT_EQ(tp_v.calls_of(CommOp::reduce_scatter), want.tp_reduce_scatter) << tp_v.describe();
  EXPECT_EQ(tp_v.total_calls(), want.tp_all_reduce + want.tp_all_gather + want.tp_reduce_scatter) << tp_v.describe();
  EXPECT_EQ(dp_v.calls_of(CommOp::all_reduce), want.dp_all_reduce) << dp_v.describe();
  EXPECT_EQ(dp_v.calls_of(CommOp::all_gather), want.dp_all_gather) << dp_v.describe();
  EXPECT_EQ(dp_v.calls_of(CommOp::reduce_scatter), want.dp_reduce_scatter) << dp_v.describe();
  EXPECT_EQ(dp_v.total_calls(), want.dp_all_reduce + want.dp_all_gather + want.dp_reduce_scatter) << dp_v.describe();
  EXPECT_EQ(world.own().calls_of(CommOp::all_reduce), want.world_all_reduce) << world.own().describe();
  EXPECT_EQ(world.own().total_calls(), want.world_all_reduce) << world.own().describe();
  if (world_rank() == 0)
    std::printf("%s: rank bytes/step = %.0f (formula %.0f; TP %.0f, DP %.0f, world %.0f)\n", c.name, got, want.total(),
                want.tp_bytes, want.dp_bytes, want.world_bytes);
}

INSTANTIATE_TEST_SUITE_P(Layouts, CommVolumeLayouts,
                         ::testing::Values(LayoutCase{"Single", 1, 1, false}, LayoutCase{"TP2", 2, 2, false},
                                           LayoutCase{"TP2_SP", 2, 2, true}, LayoutCase{"DP2", 2, 1, false},
                                           LayoutCase{"TP4", 4, 4, false}, LayoutCase{"TP4_SP", 4, 4, true},
                                           LayoutCase{"TP2xDP2", 4, 2, false}, LayoutCase{"TP2xDP2_SP", 4, 2, true},
                                           LayoutCase{"DP4", 4, 1, false}, LayoutCase{"TP2xDP4_SP", 8, 2, true},
                                           LayoutCase{"TP4xDP2", 8, 4, false}, LayoutCase{"DP8", 8, 1, false}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

// ZeRO-1: every DP size that fits the world (TP 1, the first d ranks), the optimizer state of each rank is AdamW's two
// fp32 moments of its ceil(P/d) shard (the last rank's is shorter), so the largest per-rank state is 8 ceil(P/d)
// bytes: 1/DP of the whole state plus less than one padding element.
TEST_F(Mpi, OptimizerStateFallsAsOneOverDp) {
  const int r = world_rank(), w = world_size();
  std::vector<std::string> rows;
  for (int d = 1; d <= w; d *= 2) {
    std::unique_ptr<Communicator> group = comm_->split(r < d ? 0 : 1, r);
    long long mine = -1;  // -1: not in the group
    int64_t P = 0;
    if (r < d) {
      Trainer trainer(options(1, false, d), sample, group.get());
      P = trainer.model().table().total_numel();
      const int64_t capacity = (P + d - 1) / d;
      const int64_t shard = std::min(P, (r + 1) * capacity) - std::min(P, r * capacity);
      mine = trainer.optimizer().state_bytes();
      EXPECT_EQ(mine, 2 * 4 * shard) << "DP " << d << " rank " << r;
      // What the rank actually holds: AdamW's two moment buffers.
      const AdamW& adam = trainer.optimizer().adam();
      EXPECT_EQ(mine, static_cast<int64_t>(sizeof(float)) * (adam.exp_avg().numel() + adam.exp_avg_sq().numel()))
          << "DP " << d << " rank " << r;
    }
    std::vector<long long> all(w);
    MPI_Allgather(&mine, 1, MPI_LONG_LONG, all.data(), 1, MPI_LONG_LONG, MPI_COMM_WORLD);
    long long P0 = P;
    MPI_Bcast(&P0, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    long long sum = 0, largest = 0, smallest = all[0];
    for (int k = 0; k < d; ++k) {
      sum += all[k];
      largest = std::max(largest, all[k]);
      smallest = std::min(smallest, all[k]);
    }
    const double ideal = 8.0 * static_cast<double>(P0) / d;  // the whole state split evenly
    EXPECT_EQ(sum, 8 * P0) << "DP " << d << ": the shards must cover the flat buffer once";
    EXPECT_EQ(largest, 8 * ((P0 + d - 1) / d)) << "DP " << d;
    EXPECT_LT(static_cast<double>(largest) - ideal, 8.0) << "DP " << d << ": more than one padding element over 1/DP";
    char line[160];
    std::snprintf(line, sizeof(line),
                  "  DP %d: optimizer state bytes/rank = %lld (largest; smallest %lld), 1/DP of "
                  "8 P = %.1f",
                  d, largest, smallest, ideal);
    rows.push_back(line);
  }
  if (r == 0) {
    std::printf("ZeRO-1 optimizer state per rank (tiny config, TP 1):\n");
    for (const auto& l : rows) std::printf("%s\n", l.c_str());
  }
}

// 4. Expert parallelism, TP 1: EP x EDP = DP = the world. Per micro-batch (A of them) and MoE layer (Lm), with forced
//    balance (each of the N K slots of a rank goes to expert (n K + k) mod E, so N K / EP rows to every EP rank):
//      plan     the row counts (one i64 per rank pair) and a local expert id (i32) per row      (EP-1) 8 + (EP-1) N
//      K/EP 4 rows     token_dispatch and token_combine forward, both again backward (N K / EP rows of H f32 to each
//      other
//               rank)                                                                          4 (EP-1) N K/EP H 4
//    The dense parameters reduce over DP (loss sums, router statistics, ZeRO of P_dense) and the experts over EDP
//    (ZeRO of P_expert); world: the gradient norm.
struct ExpertCase {
  const char* name;
  int world, ep;
};
void PrintTo(const ExpertCase& c, std::ostream* os) { *os << c.name; }
class ExpertParallelVolume : public Mpi, public ::testing::WithParamInterface<ExpertCase> {};

TEST_P(ExpertParallelVolume, BytesPerStepEqualTheFormula) {
  const ExpertCase& c = GetParam();
  if (c.world != world_size()) GTEST_SKIP() << c.name << " runs at " << c.world << " ranks";
  const int d = c.world, edp = d / c.ep;
  TrainOptions o = options(1, false, d);
  o.parallel.ep = c.ep;
  o.force_load_balancing = true;
  CountingCommunicator world(*comm_);
  Trainer trainer(o, sample, &world);
  auto* ep = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->ep());
  auto* edp_group = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->edp());
  auto* dp = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->dp_cp());
  ASSERT_TRUE(ep && edp_group && dp);
  ep->reset_own();
  edp_group->reset_own();
  dp->reset_own();
  world.reset_own();
  trainer.step();
  const int64_t A = kGlobalBatch / (micro_batch(d) * d), N = micro_batch(d) * kSeq, NK = N * kK;
  ASSERT_EQ(NK % kE, 0) << "forced balance is exact when every rank's slots cover the experts evenly";
  const double per_rank_rows = static_cast<double>(NK) / c.ep;
  const double plan = (c.ep - 1) * 8.0 + (c.ep - 1) * per_rank_rows * 4.0;
  const double rows = 4.0 * (c.ep - 1) * per_rank_rows * kH * 4.0;
  const double want_ep = static_cast<double>(A * kLmoe) * (plan + rows);
  expect_bytes(ep->own().total_bytes(), want_ep, std::string(c.name) + " EP group: " + ep->own().describe());
  EXPECT_EQ(ep->own().calls_of(CommOp::all_to_all), A * kLmoe * 6) << ep->own().describe();
  const FlatRange experts = trainer.model().table().expert_range();
  const int64_t p_dense = experts.begin, p_expert = experts.size();
  const double want_dp = static_cast<double>(A) * (ar(d, 1, 8) + ar(d, 2 * kE + 1, 8)) + ar(d, A, 8) +
                         2 * ag(d, static_cast<double>((p_dense + d - 1) / d), 4);
  expect_bytes(dp->own().total_bytes(), want_dp, std::string(c.name) + " DP group: " + dp->own().describe());
  const double want_edp = edp > 1 ? 2 * ag(edp, static_cast<double>((p_expert + edp - 1) / edp), 4) : 0.0;
  expect_bytes(edp_group->own().total_bytes(), want_edp,
               std::string(c.name) + " EDP group: " + edp_group->own().describe());
  expect_bytes(world.own().total_bytes(), ar(c.world, 1, 8), "world: " + world.own().describe());
  // The experts' optimizer state is 1/EDP of the experts (and 1/DP of the rest).
  EXPECT_EQ(trainer.optimizer(1).shard_capacity(), (p_expert + edp - 1) / edp);
  EXPECT_EQ(trainer.optimizer(0).shard_capacity(), (p_dense + d - 1) / d);
  if (world_rank() == 0)
    std::printf("%s: EP bytes/step = %.0f (formula %.0f), DP %.0f, EDP %.0f\n", c.name, ep->own().total_bytes(),
                want_ep, want_dp, want_edp);
}

INSTANTIATE_TEST_SUITE_P(Experts, ExpertParallelVolume,
                         ::testing::Values(ExpertCase{"EP2", 2, 2}, ExpertCase{"EP4", 4, 4},
                                           ExpertCase{"EP2xEDP2", 4, 2}, ExpertCase{"EP8", 8, 8}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

// Context parallelism: a whole optimizer step's bytes per rank, split by group, equal the formula. Per micro-batch
// (M rows of Sl = S / CP tokens, G segments per rank: 2 zigzag, 1 contiguous) the CP group carries
//   attention (Lf layers)  keys and values all-gathered forward, their gradients reduce-scattered backward
//                                                                                     4 (CP-1) M Sl NKV D 4
//   DeltaNet (Ll layers)   the conv halo, M (K-1) CD floats per chunk boundary crossing ranks, each way, and the
//                          states: G (CP-1) M Hv dk (dk + dv) 4 forward + G (CP-1) M Hv dk dv 4 backward
// the DP x CP group the loss and MoE statistics per micro-batch and ZeRO-1 per step (section 1's DP terms with
// d = DP x CP), the world the gradient norm. Nothing in the CP group depends on anything but these dimensions.
struct CpCase {
  const char* name;
  int world, cp;
  CpOrder order;
};
void PrintTo(const CpCase& c, std::ostream* os) { *os << c.name; }

class ContextParallelVolume : public Mpi, public ::testing::WithParamInterface<CpCase> {};

TEST_P(ContextParallelVolume, BytesPerStepEqualTheFormula) {
  const CpCase& c = GetParam();
  if (c.world != world_size()) GTEST_SKIP() << c.name << " runs at " << c.world << " ranks";
  const int cp = c.cp, d = c.world / cp, dcp = c.world;
  CountingCommunicator world(*comm_);
  TrainOptions o = options(1, false, d);
  o.parallel.cp = cp;
  o.parallel.cp_order = c.order;
  Trainer trainer(o, sample, &world);
  world.volume()->reset();
  world.reset_own();
  auto* cpg = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->cp());
  auto* dpg = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->dp_cp());
  ASSERT_TRUE(cpg && dpg);
  trainer.step();

  const ModelConfig mc = ModelConfig::from_json(nlohmann::json::parse(kTinyConfig));
  const int r = trainer.parallel()->cp_rank();
  const double M = static_cast<double>(micro_batch(d)), Sl = static_cast<double>(kSeq / cp),
               A = static_cast<double>(kGlobalBatch / (micro_batch(d) * d)), G = c.order == CpOrder::zigzag ? 2 : 1,
               Hv = static_cast<double>(mc.linear_num_value_heads), dk = static_cast<double>(mc.linear_key_head_dim),
               dv = static_cast<double>(mc.linear_value_head_dim);
  // Chunk boundaries this rank's halo crosses each way: contiguous r -> r + 1 forward, r -> r - 1 backward; zigzag
  // (chunks r and 2CP-1-r) (r > 0) + (r < CP - 1) each way (the middle boundary stays on rank CP - 1).
  const int edges = (r > 0) + (r + 1 < cp);
  const double halo_messages = c.order == CpOrder::zigzag ? 2.0 * edges : edges;
  const double halo = M * static_cast<double>((mc.linear_conv_kernel_dim - 1) * mc.conv_dim()) * 4;
  const double per_micro =
      static_cast<double>(kLfull) * 4 * ag(cp, M * Sl * kNkv * kHeadDim, 4) +
      static_cast<double>(kLlin) * (halo_messages * halo + G * (cp - 1) * M * Hv * dk * (dk + 2 * dv) * 4);
  const double cp_bytes = A * per_micro;
  const int64_t p_local = trainer.model().table().total_numel(), capacity = (p_local + dcp - 1) / dcp;
  const double dp_bytes =
      A * (ar(dcp, 1, 8) + ar(dcp, 2 * kE + 1, 8)) + ar(dcp, A, 8) + 2 * ag(dcp, static_cast<double>(capacity), 4);
  const double world_bytes = ar(c.world, 1, 8);
  expect_bytes(cpg->own().total_bytes(), cp_bytes, "CP group: " + cpg->own().describe());
  expect_bytes(dpg->own().total_bytes(), dp_bytes, "DP x CP group: " + dpg->own().describe());
  expect_bytes(world.own().total_bytes(), world_bytes, "world: " + world.own().describe());
  expect_bytes(world.volume()->total_bytes(), cp_bytes + dp_bytes + world_bytes,
               "every group: " + world.volume()->describe());
  if (world_rank() == 0)
    std::printf("%s: rank 0 bytes/step = %.0f (CP %.0f, DP x CP %.0f, world %.0f)\n", c.name,
                world.volume()->total_bytes(), cp_bytes, dp_bytes, world_bytes);
}

INSTANTIATE_TEST_SUITE_P(Contexts, ContextParallelVolume,
                         ::testing::Values(CpCase{"CP2", 2, 2, CpOrder::zigzag},
                                           CpCase{"CP2_Contiguous", 2, 2, CpOrder::contiguous},
                                           CpCase{"CP2xDP2", 4, 2, CpOrder::zigzag},
                                           CpCase{"CP4_Contiguous", 4, 4, CpOrder::contiguous},
                                           CpCase{"CP2xDP4", 8, 2, CpOrder::zigzag}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

// --log-step-stats attributes every byte to its group: the StepRecord's per-group bytes equal what the groups of a
// counting world saw in the same step (TP2 x CP2 + SP: TP, CP, DP x CP and world traffic), its forward/backward share
// of each group's time is at most the group's, and every rank reports a peak of tensor memory at least what it holds
// after the step.
TEST_F(Mpi, StepStatsAttributeTheBytesOfEveryGroup) {
  if (world_size() != 4) GTEST_SKIP() << "runs at 4 ranks";
  TrainOptions o = options(2, true, 1);
  o.parallel.cp = 2;
  o.log_step_stats = true;
  CountingCommunicator world(*comm_);
  Trainer trainer(o, sample, &world);
  const ParallelContext& ctx = *trainer.parallel();
  auto own = [](Communicator& c) {
    auto* counted = dynamic_cast<CountingCommunicator*>(&c);
    return counted ? counted->own().total_bytes() : -1.0;
  };
  const double before[3] = {own(ctx.tp()), own(ctx.cp()), own(ctx.dp_cp())};
  const StepRecord rec = trainer.step();
  ASSERT_TRUE(rec.stats.has_value());
  const double counted[3] = {own(ctx.tp()) - before[0], own(ctx.cp()) - before[1], own(ctx.dp_cp()) - before[2]};
  std::map<std::string, StepStats::Group> groups;
  for (const StepStats::Group& g : rec.stats->groups) groups[g.name] = g;
  const char* names[3] = {"tp", "cp", "dp_cp"};
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(groups.count(names[i])) << names[i];
    EXPECT_GT(counted[i], 0) << names[i];
    EXPECT_DOUBLE_EQ(groups[names[i]].bytes, counted[i]) << names[i];
    EXPECT_LE(groups[names[i]].forward_backward_seconds, groups[names[i]].seconds) << names[i];
  }
  EXPECT_DOUBLE_EQ(groups["world"].bytes, ar(4, 1, 8)) << "the gradient norm's sum of squares";
  EXPECT_EQ(groups.count("pp"), 0u) << "PP 1 has no pipeline group";
  ASSERT_EQ(rec.stats->peak_tensor_bytes.size(), 4u);
  EXPECT_GE(rec.stats->peak_tensor_bytes[static_cast<size_t>(world_rank())],
            static_cast<double>(live_tensor_bytes(Device::cpu)));
  for (double b : rec.stats->max_rss_bytes) EXPECT_GT(b, 0);
  EXPECT_LE(rec.stats->forward_backward + rec.stats->optimizer, rec.seconds * (1 + 1e-9));
}

// 3. Pipeline parallelism: the pipeline group's bytes per rank per step. Every micro-batch crosses each boundary
//    between consecutive virtual stages once forward (the Nl x H activation and the 2E router statistics, f32) and
//    once backward (its gradient and the final statistics): a rank sends M (Nl H + 2E) 4 bytes for each of its chunks
//    that is not the model's last virtual stage and as many for each that is not the first. Nl = N / t under SP. Plus
//    the losses the last stage shares with the others: one all-reduce of 3 doubles, ar(p, 3, 8). One
//    batch_send_recv call per communicate action of the schedule table (parallel/schedule.h).
struct PipelineCase {
  const char* name;
  int world, pp, vpp, tp;
  bool sp;
};
void PrintTo(const PipelineCase& c, std::ostream* os) { *os << c.name; }
class PipelineVolume : public Mpi, public ::testing::WithParamInterface<PipelineCase> {};

TEST_P(PipelineVolume, P2PBytesEqualTheFormula) {
  const PipelineCase& c = GetParam();
  if (c.world != world_size()) GTEST_SKIP() << c.name << " runs at " << c.world << " ranks";
  const int d = c.world / (c.tp * c.pp);
  ASSERT_EQ(d, 1);
  TrainOptions o = options(c.tp, c.sp, d);
  o.parallel.pp = c.pp;
  o.parallel.vpp = c.vpp;
  CountingCommunicator world(*comm_);
  Trainer trainer(o, sample, &world);
  auto* pp = dynamic_cast<CountingCommunicator*>(&trainer.parallel()->pp());
  ASSERT_TRUE(pp);
  pp->reset_own();
  trainer.step();
  const int64_t M = kGlobalBatch / micro_batch(d), N = micro_batch(d) * kSeq, Nl = c.sp ? N / c.tp : N;
  const int r = trainer.parallel()->pp_rank(), stages = c.pp * c.vpp;
  int crossings = 0;  // boundaries this rank's chunks send over: forward (not the last stage) and backward (not first)
  for (int chunk = 0; chunk < c.vpp; ++chunk) {
    const int v = chunk * c.pp + r;
    crossings += (v + 1 < stages) + (v > 0);
  }
  const double want_p2p = static_cast<double>(crossings) * M * (Nl * kH + 2 * kE) * 4.0;
  const CommVolume& got = pp->own();
  expect_bytes(got.bytes_of(CommOp::batch_send_recv), want_p2p, std::string(c.name) + ": " + got.describe());
  expect_bytes(got.bytes_of(CommOp::all_reduce), ar(c.pp, 3, 8), std::string(c.name) + ": " + got.describe());
  const ScheduleTable table = schedule_table({c.pp, c.vpp, static_cast<int>(M)});
  const int64_t actions = std::count_if(table[r].begin(), table[r].end(),
                                        [](const Action& a) { return a.kind == ActionKind::communicate; });
  EXPECT_EQ(got.calls_of(CommOp::batch_send_recv), actions) << got.describe();
  EXPECT_EQ(got.total_calls(), actions + 1) << got.describe();
  if (world_rank() == 0)
    std::printf("%s: pipeline bytes/step of rank 0 = %.0f (formula %.0f), %lld exchanges\n", c.name, got.total_bytes(),
                want_p2p + ar(c.pp, 3, 8), static_cast<long long>(actions));
}

INSTANTIATE_TEST_SUITE_P(Pipelines, PipelineVolume,
                         ::testing::Values(PipelineCase{"PP2", 2, 2, 1, 1, false},
                                           PipelineCase{"PP2_VPP2", 2, 2, 2, 1, false},
                                           PipelineCase{"PP4", 4, 4, 1, 1, false},
                                           PipelineCase{"PP2xTP2_SP", 4, 2, 1, 2, true}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

struct MemoryCase {
  const char* name;
  int world, pp, vpp, tp;
  bool sp;
  RecomputeOptions recompute;
  int ep = 1;  // with forced balance, so every rank receives as many routed rows as it sends
  int etp = 0;
  int cp = 1;  // context parallel: every record holds a slice of kSeq / CP tokens
};
void PrintTo(const MemoryCase& c, std::ostream* os) { *os << c.name; }
class PipelineMemory : public Mpi, public ::testing::WithParamInterface<MemoryCase> {};

// Two runs of the trainer's pipeline runner: a small one (M = 1, or PP for the interleaved schedule) allocates the
// layers' scratch and some records, then M = 8 adds records up to the schedule's in-flight count per chunk. What live
// memory grew by between the two is the added records, each of the formula's bytes for its chunk (the measured side
// counts Tensor storage and the records' host vectors).
TEST_P(PipelineMemory, RecordsHoldTheFormulaBytesAndTheScheduleCount) {
  const MemoryCase& c = GetParam();
  if (c.world != world_size()) GTEST_SKIP() << c.name << " runs at " << c.world << " ranks";
  TrainOptions o = options(c.tp, c.sp, 1);
  o.parallel.pp = c.pp;
  o.parallel.vpp = c.vpp;
  o.recompute = c.recompute;
  o.parallel.ep = c.ep;
  o.parallel.etp = c.etp;
  o.force_load_balancing = c.ep > 1;
  o.parallel.cp = c.cp;
  Trainer trainer(o, sample, comm_.get());
  PipelineRunner& runner = trainer.pipeline_runner();
  const int64_t B = micro_batch(1), S = kSeq / c.cp;
  std::vector<int64_t> ids(B * S), targets(B * S);
  for (int64_t i = 0; i < B * S; ++i) {
    ids[i] = (i * 5 + 3) % kVocab;
    targets[i] = (i * 11 + 1) % kVocab;
  }
  const auto tokens = [&](int) { return MicroBatchTokens{ids.data(), targets.data()}; };
  const int r = trainer.parallel()->pp_rank();
  const auto live = [&] { return live_tensor_bytes(Device::cpu) + runner.records_host_bytes(); };
  runner.run({c.pp, c.vpp, c.vpp > 1 ? c.pp : 1}, tokens, B, S, 1.0f);
  std::vector<int> before(c.vpp);
  for (int k = 0; k < c.vpp; ++k) before[k] = runner.records_allocated(k);
  const int grad_buffers_before = runner.grad_buffers_allocated();
  const int64_t live_before = live();
  const ScheduleSpec spec{c.pp, c.vpp, 8};
  runner.run(spec, tokens, B, S, 1.0f);
  const int64_t grown = live() - live_before;
  const ScheduleTable table = schedule_table(spec);
  int64_t want = 0;
  std::string report;
  for (int k = 0; k < c.vpp; ++k) {
    Model& m = trainer.chunk_model(k);
    EXPECT_EQ(runner.peak_records(k), max_in_flight(table, r, k)) << "chunk " << k;
    EXPECT_EQ(runner.records_allocated(k), std::max(before[k], runner.peak_records(k))) << "chunk " << k;
    if (k == 0) {
      // Send buffers stay allocated: the most gradients the schedule ever holds unsent (the planner's count).
      EXPECT_EQ(runner.grad_buffers_allocated(), std::max(grad_buffers_before, max_gradients_unsent(table, r)));
    }
    ActivationShape shape;
    shape.B = B;
    shape.S = S;
    shape.tp = c.tp;
    shape.sequence_parallel = c.sp;
    shape.pipeline = true;
    shape.cp = c.cp;
    shape.cp_rank = trainer.parallel()->cp_rank();
    shape.cp_order = trainer.parallel()->layout().sizes().cp_order;
    const int64_t record = activation_record_bytes(m.local_config(), m.stage(), shape, c.recompute).total();
    want += (runner.records_allocated(k) - before[k]) * record;
    report += " chunk " + std::to_string(k) + ": " + std::to_string(runner.peak_records(k)) + " x " +
              std::to_string(record) + " B;";
  }
  // Input gradients waiting to be sent, with their router statistics: (Nl, H) + 2 (E) floats each.
  const int64_t Nl = c.sp ? B * S / c.tp : B * S;
  want += (runner.grad_buffers_allocated() - grad_buffers_before) * (Nl * kH + 2 * kE) * 4;
  report += " send buffers " + std::to_string(runner.grad_buffers_allocated()) + ";";
  EXPECT_EQ(grown, want) << report;
  EXPECT_LE(runner.peak_records(), in_flight_bound(spec, r));
  if (r == 0) {
    EXPECT_GT(want, 0) << "the second run added no record: the test measures nothing";
  }
  if (world_rank() == 0 || (trainer.parallel()->tp_rank() == 0 && trainer.parallel()->dp_rank() == 0))
    std::printf("%s pp rank %d (M 8): peak activation records%s grown %lld B (formula %lld B)\n", c.name, r,
                report.c_str(), static_cast<long long>(grown), static_cast<long long>(want));
}

INSTANTIATE_TEST_SUITE_P(
    Pipelines, PipelineMemory,
    ::testing::Values(MemoryCase{"PP2", 2, 2, 1, 1, false, {}}, MemoryCase{"PP4", 4, 4, 1, 1, false, {}},
                      MemoryCase{"PP2_VPP2", 2, 2, 2, 1, false, {}}, MemoryCase{"PP2xTP2_SP", 4, 2, 1, 2, true, {}},
                      MemoryCase{"PP2_RecomputeFull", 2, 2, 1, 1, false, {"full", "uniform", 1, {}}},
                      MemoryCase{"PP2xTP2_SP_RecomputeSelective",
                                 4,
                                 2,
                                 1,
                                 2,
                                 true,
                                 {"selective", "", 0, {"core_attn", "layernorm", "moe_act", "shared_experts"}}},
                      MemoryCase{"PP2xEP2", 4, 2, 1, 1, false, {}, 2},
                      MemoryCase{"PP2xTP2_SP_ETP1", 4, 2, 1, 2, true, {}, 1, 1},
                      MemoryCase{"PP2xCP2", 4, 2, 1, 1, false, {}, 1, 0, 2},
                      MemoryCase{
                          "PP2xCP2_RecomputeCore", 4, 2, 1, 1, false, {"selective", "", 0, {"core_attn"}}, 1, 0, 2}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace

}  // namespace nextron::test
