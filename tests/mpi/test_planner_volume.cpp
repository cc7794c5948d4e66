// The layout planner's communication model (plan/planner.h) against the bytes a real training step sends.
//
// For each layout: one optimizer step of the tiny model (tests/mpi/tiny_model.h, S = 16, 16 sequences per step) with
// a CountingCommunicator world; every group's counted bytes of this rank (ctx.tp(), cp(), dp_cp(), pp(), ep(),
// edp() and the world's own calls) must equal the planner's prediction for this rank's pipeline and context-parallel
// coordinates, to 1e-9 relative. The planner derives its bytes from the model's dimensions and the layout (the
// general form of tests/mpi/test_comm_volume.cpp's formulas); the reference here is the counting communicator.
// Layouts of the comm-volume tests plus combinations they do not cover (TP x EP, PP x EP, PP x DP, PP x CP, TP x CP).
// A case runs only at its world size (nextron_mpi_tests runs at 1, 2, 4 and 8 ranks).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>

#include "comm/counting_communicator.h"
#include "mpi_fixture.h"
#include "plan/planner.h"
#include "tiny_model.h"
#include "tiny_train_options.h"
#include "train/trainer.h"

namespace nextron::test {

namespace {

constexpr int64_t kSeq = 16, kGlobalBatch = 16;

void sample(int64_t index, int64_t* out) { tiny_sample(index, out, kSeq); }

struct PlanCase {
  const char* name;
  int world, tp;
  bool sp;
  int pp = 1, vpp = 1, cp = 1;
  CpOrder order = CpOrder::zigzag;
  int ep = 1;
  int64_t micro_batch = 2;
};
void PrintTo(const PlanCase& c, std::ostream* os) { *os << c.name; }

// test_comm_volume.cpp's step with the case's sizes (forced balance under EP: its bytes are then exact).
TrainOptions options(const PlanCase& c) {
  TrainOptions o = tiny_step_options(kSeq, kGlobalBatch, c.micro_batch);
  o.parallel.tp = c.tp;
  o.sequence_parallel = c.sp;
  o.parallel.pp = c.pp;
  o.parallel.vpp = c.vpp;
  o.parallel.cp = c.cp;
  o.parallel.cp_order = c.order;
  o.parallel.ep = c.ep;
  o.force_load_balancing = c.ep > 1;
  return o;
}

plan::Candidate candidate(const PlanCase& c) {
  plan::Candidate k;
  k.world = c.world;
  k.sizes.tp = c.tp;
  k.sizes.pp = c.pp;
  k.sizes.vpp = c.vpp;
  k.sizes.cp = c.cp;
  k.sizes.cp_order = c.order;
  k.sizes.ep = c.ep;
  k.sizes.etp = c.tp;
  k.sequence_parallel = c.sp;
  k.micro_batch = c.micro_batch;
  return k;
}

class PlannerVolume : public Mpi, public ::testing::WithParamInterface<PlanCase> {};

TEST_P(PlannerVolume, BytesPerGroupEqualTheCountedStep) {
  const PlanCase& c = GetParam();
  if (c.world != world_size()) GTEST_SKIP() << c.name << " runs at " << c.world << " ranks";
  plan::Workload w;
  w.config = ModelConfig::from_json(nlohmann::json::parse(kTinyConfig));
  w.seq_len = kSeq;
  w.global_batch = kGlobalBatch;
  const plan::Candidate k = candidate(c);
  ASSERT_EQ(plan::layout_error(w, k), "") << c.name;

  CountingCommunicator world(*comm_);
  Trainer trainer(options(c), sample, &world);
  const ParallelContext* ctx = trainer.parallel();
  auto counted = [](Communicator& g) {
    auto* cc = dynamic_cast<CountingCommunicator*>(&g);
    EXPECT_TRUE(cc != nullptr);
    return cc;
  };
  std::vector<std::pair<plan::Axis, CountingCommunicator*>> groups;
  if (ctx) {
    groups = {{plan::Axis::tp, counted(ctx->tp())},       {plan::Axis::cp, counted(ctx->cp())},
              {plan::Axis::dp_cp, counted(ctx->dp_cp())}, {plan::Axis::pp, counted(ctx->pp())},
              {plan::Axis::ep, counted(ctx->ep())},       {plan::Axis::edp, counted(ctx->edp())}};
    for (auto& [axis, g] : groups) {
      ASSERT_TRUE(g) << plan::axis_name(axis);
      g->reset_own();
    }
  }
  world.reset_own();
  world.volume()->reset();
  trainer.step();

  const int pp_rank = ctx ? ctx->pp_rank() : 0, cp_rank = ctx ? ctx->cp_rank() : 0;
  const plan::RankPlan want = plan::plan_rank(w, k, pp_rank, cp_rank, Device::cpu);
  auto expect = [&](double got, double predicted, const std::string& what) {
    EXPECT_NEAR(got, predicted, 1e-9 * std::max(1.0, std::fabs(predicted)))
        << c.name << " rank " << world_rank() << " (pp " << pp_rank << ", cp " << cp_rank << ") " << what;
  };
  double sum = 0;
  for (auto& [axis, g] : groups) {
    expect(g->own().total_bytes(), want.bytes[axis], std::string(plan::axis_name(axis)) + ": " + g->own().describe());
    sum += want.bytes[axis];
  }
  expect(world.own().total_bytes(), want.bytes[plan::Axis::world], "world: " + world.own().describe());
  sum += want.bytes[plan::Axis::world];
  // Nothing is sent outside these groups (the dp group proper is unused: the model reduces over DP x CP).
  expect(world.volume()->total_bytes(), sum, "every group: " + world.volume()->describe());
  EXPECT_EQ(want.params, [&] {
    int64_t p = 0;
    for (int ch = 0; ch < trainer.num_chunks(); ++ch) p += trainer.chunk_model(ch).table().total_numel();
    return p;
  }()) << "local parameters";
  if (world_rank() == 0) {
    std::printf("%s rank 0:", c.name);
    for (int a = 0; a < plan::kAxes; ++a)
      if (want.bytes.bytes[a] > 0)
        std::printf(" %s %.0f", plan::axis_name(static_cast<plan::Axis>(a)), want.bytes.bytes[a]);
    std::printf(" (bytes/step, planner = counted)\n");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PlannerVolume,
    ::testing::Values(PlanCase{"Single", 1, 1, false}, PlanCase{"TP2", 2, 2, false}, PlanCase{"TP2_SP", 2, 2, true},
                      PlanCase{"DP2", 2, 1, false}, PlanCase{"PP2", 2, 1, false, 2},
                      PlanCase{"PP2_VPP2", 2, 1, false, 2, 2}, PlanCase{"CP2", 2, 1, false, 1, 1, 2, CpOrder::zigzag},
                      PlanCase{"CP2_Contiguous", 2, 1, false, 1, 1, 2, CpOrder::contiguous},
                      PlanCase{"EP2", 2, 1, false, 1, 1, 1, CpOrder::zigzag, 2}, PlanCase{"TP4", 4, 4, false},
                      PlanCase{"TP4_SP", 4, 4, true}, PlanCase{"TP2xDP2", 4, 2, false},
                      PlanCase{"TP2xDP2_SP", 4, 2, true}, PlanCase{"PP2xTP2_SP", 4, 2, true, 2},
                      PlanCase{"PP4", 4, 1, false, 4}, PlanCase{"PP2xDP2", 4, 1, false, 2},
                      PlanCase{"CP2xDP2", 4, 1, false, 1, 1, 2, CpOrder::zigzag},
                      PlanCase{"CP4_Contiguous", 4, 1, false, 1, 1, 4, CpOrder::contiguous},
                      PlanCase{"CP2xTP2_SP", 4, 2, true, 1, 1, 2, CpOrder::zigzag},
                      PlanCase{"PP2xCP2", 4, 1, false, 2, 1, 2, CpOrder::zigzag},
                      PlanCase{"EP2xEDP2", 4, 1, false, 1, 1, 1, CpOrder::zigzag, 2},
                      PlanCase{"EP4", 4, 1, false, 1, 1, 1, CpOrder::zigzag, 4},
                      PlanCase{"TP2xEP2_SP", 4, 2, true, 1, 1, 1, CpOrder::zigzag, 2},
                      PlanCase{"PP2xEP2", 4, 1, false, 2, 1, 1, CpOrder::zigzag, 2},
                      PlanCase{"TP2xDP4_SP", 8, 2, true, 1, 1, 1, CpOrder::zigzag, 1, 1},
                      PlanCase{"DP8", 8, 1, false, 1, 1, 1, CpOrder::zigzag, 1, 1},
                      PlanCase{"PP2xTP2xDP2_SP", 8, 2, true, 2}, PlanCase{"PP2_VPP2xTP2xDP2_SP", 8, 2, true, 2, 2},
                      PlanCase{"CP2xDP4", 8, 1, false, 1, 1, 2, CpOrder::zigzag, 1, 1},
                      PlanCase{"EP8", 8, 1, false, 1, 1, 1, CpOrder::zigzag, 8, 1},
                      PlanCase{"PP2xTP2xEP2_SP", 8, 2, true, 2, 1, 1, CpOrder::zigzag, 2}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace

}  // namespace nextron::test
