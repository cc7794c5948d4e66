// Pipeline schedules as data (parallel/schedule.h), checked without any process: every table of 1F1B and
// interleaved 1F1B over a range of sizes passes check_schedule (each micro-batch forwarded then backwarded once per
// chunk, inputs received first, sends matched with receives, no deadlock under rendezvous semantics); the records in
// flight reach exactly the schedule's bound; one small table's exchanges are Megatron's calls, written out by hand;
// the simulated bubble equals (p - 1) / (M + p - 1) for 1F1B and is smaller interleaved; broken tables and
// impossible specs are errors naming the problem.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "parallel/schedule.h"

namespace nextron::test {

namespace {

std::string error_of(const ScheduleSpec& spec, const ScheduleTable& table) {
  try {
    check_schedule(spec, table);
  } catch (const Error& e) {
    return e.what();
  }
  return "accepted";
}

std::vector<std::string> names(const std::vector<Action>& actions) {
  std::vector<std::string> out;
  for (const Action& a : actions) out.push_back(a.name());
  return out;
}

}  // namespace

TEST(Schedule1F1B, EveryTableRunsAndReachesItsBound) {
  for (int p = 1; p <= 8; ++p)
    for (int M = 1; M <= 12; ++M) {
      const ScheduleSpec spec{p, 1, M};
      const ScheduleTable table = schedule_table(spec);
      SCOPED_TRACE("p " + std::to_string(p) + " M " + std::to_string(M));
      EXPECT_NO_THROW(check_schedule(spec, table));
      for (int r = 0; r < p; ++r) {
        EXPECT_EQ(max_in_flight(table, r), in_flight_bound(spec, r)) << "rank " << r;
        EXPECT_EQ(in_flight_bound(spec, r), std::min(p - r, M));
      }
    }
}

TEST(ScheduleInterleaved, EveryTableRunsAndReachesItsBound) {
  for (int p = 2; p <= 8; ++p)
    for (int v = 2; v <= 4; ++v)
      for (int M = p; M <= 4 * p; M += p) {
        const ScheduleSpec spec{p, v, M};
        const ScheduleTable table = schedule_table(spec);
        SCOPED_TRACE("p " + std::to_string(p) + " v " + std::to_string(v) + " M " + std::to_string(M));
        EXPECT_NO_THROW(check_schedule(spec, table));
        for (int r = 0; r < p; ++r) EXPECT_EQ(max_in_flight(table, r), in_flight_bound(spec, r)) << "rank " << r;
      }
}

TEST(Schedule1F1B, OneRankIsGradientAccumulation) {
  const ScheduleTable table = schedule_table({1, 1, 3});
  EXPECT_EQ(names(table[0]), (std::vector<std::string>{"forward m0 c0", "backward m0 c0", "forward m1 c0",
                                                       "backward m1 c0", "forward m2 c0", "backward m2 c0"}));
}

// p 4, M 6, rank 1: 2 warmup forwards, 4 steady pairs, 2 cooldown backwards; between two computes one exchange of
// the previous compute's send and the next one's receive (written out from the algorithm by hand).
TEST(Schedule1F1B, MegatronCallsOfAMiddleRank) {
  const ScheduleTable table = schedule_table({4, 1, 6});
  const std::vector<std::string> want = {"recv_forward",
                                         "forward m0 c0",
                                         "send_forward_recv_forward",
                                         "forward m1 c0",
                                         "send_forward_recv_forward",
                                         "forward m2 c0",
                                         "send_forward_recv_backward",
                                         "backward m0 c0",
                                         "send_backward_recv_forward",
                                         "forward m3 c0",
                                         "send_forward_recv_backward",
                                         "backward m1 c0",
                                         "send_backward_recv_forward",
                                         "forward m4 c0",
                                         "send_forward_recv_backward",
                                         "backward m2 c0",
                                         "send_backward_recv_forward",
                                         "forward m5 c0",
                                         "send_forward_recv_backward",
                                         "backward m3 c0",
                                         "send_backward_recv_backward",
                                         "backward m4 c0",
                                         "send_backward_recv_backward",
                                         "backward m5 c0",
                                         "send_backward"};
  EXPECT_EQ(names(table[1]), want);
  // The last rank: no activation leaves it, no gradient arrives.
  EXPECT_EQ(names(table[3]).front(), "recv_forward");
  EXPECT_EQ(names(table[3])[2], "backward m0 c0");
  EXPECT_EQ(names(table[3])[3], "send_backward_recv_forward");
}

TEST(ScheduleInterleaved, MegatronOrderOfVirtualMicroBatches) {
  // p 2, v 2: forwards run micro-batches 0, 1 on chunk 0, then 0, 1 on chunk 1, then 2, 3 on chunk 0, ...
  const ScheduleSpec spec{2, 2, 4};
  std::vector<std::string> fwd, bwd;
  for (int k = 0; k < 8; ++k) {
    fwd.push_back(forward_action(spec, k).name());
    bwd.push_back(backward_action(spec, k).name());
  }
  EXPECT_EQ(fwd, (std::vector<std::string>{"forward m0 c0", "forward m1 c0", "forward m0 c1", "forward m1 c1",
                                           "forward m2 c0", "forward m3 c0", "forward m2 c1", "forward m3 c1"}));
  EXPECT_EQ(bwd, (std::vector<std::string>{"backward m0 c1", "backward m1 c1", "backward m0 c0", "backward m1 c0",
                                           "backward m2 c1", "backward m3 c1", "backward m2 c0", "backward m3 c0"}));
  // Rank 1 of p 2 (virtual stages 1 and 3): warmup (2 - 1 - 1) 2 + (2 - 1) 2 = 2 forwards.
  const ScheduleTable table = schedule_table(spec);
  EXPECT_EQ(in_flight_bound(spec, 1), 3);
  EXPECT_EQ(in_flight_bound(spec, 0), 5);
  EXPECT_EQ(names(table[1])[0], "recv_forward");
  EXPECT_EQ(names(table[1])[1], "forward m0 c0");
}

TEST(ScheduleBubble, SimulatedEqualsTheFormula) {
  for (int p = 2; p <= 8; ++p)
    for (int M = 1; M <= 16; ++M) {
      const ScheduleSpec spec{p, 1, M};
      EXPECT_NEAR(simulated_bubble_fraction(spec, schedule_table(spec), 1.0, 2.0), ideal_bubble_fraction(spec), 1e-12)
          << "p " << p << " M " << M;
      EXPECT_DOUBLE_EQ(ideal_bubble_fraction(spec), (p - 1.0) / (M + p - 1.0));
    }
  for (int p = 2; p <= 6; ++p)
    for (int v = 2; v <= 4; ++v)
      for (int M = 2 * p; M <= 4 * p; M += p) {
        const ScheduleSpec spec{p, v, M}, plain{p, 1, M};
        const double got = simulated_bubble_fraction(spec, schedule_table(spec), 1.0, 2.0);
        SCOPED_TRACE("p " + std::to_string(p) + " v " + std::to_string(v) + " M " + std::to_string(M));
        EXPECT_LT(got, ideal_bubble_fraction(plain));
        EXPECT_GE(got, ideal_bubble_fraction(spec) - 1e-12);
      }
  EXPECT_DOUBLE_EQ(ideal_bubble_fraction({4, 2, 8}), 3.0 / 19.0);
}

TEST(ScheduleCheck, CatchesBrokenTables) {
  const ScheduleSpec spec{4, 1, 6};
  // (a) A receive dropped: the forward it fed has no input.
  {
    ScheduleTable t = schedule_table(spec);
    ASSERT_EQ(t[2][0].name(), "recv_forward");
    t[2].erase(t[2].begin());
    const std::string m = error_of(spec, t);
    EXPECT_NE(m.find("input activation was not received"), std::string::npos) << m;
  }
  // (b) Two sends of one channel in swapped order: the peer receives them as the other micro-batch.
  {
    ScheduleTable t = schedule_table(spec);
    std::vector<size_t> sends;  // rank 0's exchanges that send an activation
    for (size_t i = 0; i < t[0].size(); ++i)
      if (t[0][i].kind == ActionKind::communicate && !t[0][i].transfers.empty() && t[0][i].transfers[0].send)
        sends.push_back(i);
    ASSERT_GE(sends.size(), 4u);
    // Swap the sent micro-batches of two exchanges that follow both forwards (the 3rd and 4th sends).
    Transfer& a = t[0][sends[2]].transfers[0];
    Transfer& b = t[0][sends[3]].transfers[0];
    ASSERT_EQ(a.kind, TransferKind::activation);
    ASSERT_EQ(b.kind, TransferKind::activation);
    std::swap(a.microbatch, b.microbatch);
    const std::string m = error_of(spec, t);
    EXPECT_TRUE(m.find("posts them in different orders") != std::string::npos ||
                m.find("sent before it was computed") != std::string::npos)
        << m;
  }
  // (c) A backward moved before its forward.
  {
    ScheduleTable t = schedule_table({1, 1, 2});
    std::swap(t[0][0], t[0][1]);
    EXPECT_NE(error_of({1, 1, 2}, t).find("backward before its forward"), std::string::npos);
  }
  // (d) A paired exchange split into a receive and then a send on both neighbours: each waits to receive what the
  // other sends only afterwards.
  {
    const ScheduleSpec two{2, 1, 1};
    auto comm = [](bool send, TransferKind kind, int peer) {
      return Action{ActionKind::communicate, 0, 0, {{send, kind, peer, 0, 0}}};
    };
    const Action f{ActionKind::forward, 0, 0, {}}, b{ActionKind::backward, 0, 0, {}};
    const ScheduleTable t = {{f, comm(false, TransferKind::gradient, 1), comm(true, TransferKind::activation, 1), b},
                             {comm(false, TransferKind::activation, 0), f, b, comm(true, TransferKind::gradient, 0)}};
    const std::string m = error_of(two, t);
    EXPECT_NE(m.find("deadlock"), std::string::npos) << m;
    EXPECT_NE(m.find("rank 0 in action 1 (recv_backward)"), std::string::npos) << m;
    EXPECT_NE(m.find("rank 1 in action 0 (recv_forward)"), std::string::npos) << m;
    // Paired as the schedule pairs them, the same messages run.
    const ScheduleTable ok = {
        {f,
         Action{ActionKind::communicate,
                0,
                0,
                {{true, TransferKind::activation, 1, 0, 0}, {false, TransferKind::gradient, 1, 0, 0}}},
         b},
        {comm(false, TransferKind::activation, 0), f, b, comm(true, TransferKind::gradient, 0)}};
    EXPECT_EQ(error_of(two, ok), "accepted");
  }
}

TEST(ScheduleSpecs, ImpossibleSpecsNameTheFix) {
  auto message = [](const ScheduleSpec& s) {
    try {
      s.validate();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message({0, 1, 4}).find("pipeline-model-parallel-size 0 must be >= 1"), std::string::npos);
  EXPECT_NE(message({2, 1, 0}).find("at least one micro-batch"), std::string::npos);
  EXPECT_NE(message({4, 2, 6}).find("must be a multiple of the pipeline size 4"), std::string::npos);
  EXPECT_NE(message({1, 2, 4}).find("needs at least 2 pipeline ranks"), std::string::npos);
  EXPECT_THROW(schedule_table({4, 2, 6}), Error);
  EXPECT_EQ(message({4, 2, 8}), "accepted");
}

// The pipeline runner's gradient send buffers: rank 0's first chunk sends nothing back; in 1F1B every other rank sends
// each input gradient in the exchange right after its backward (one buffer); the interleaved schedule posts a chunk's
// gradient in the exchange after the next compute, so two can wait at once on a rank whose both chunks send.
TEST(Schedules, GradientsUnsentAreTheRunnersSendBuffers) {
  for (int p : {2, 4})
    for (int M : {p, 2 * p}) {
      const ScheduleTable t = schedule_table({p, 1, M});
      EXPECT_EQ(max_gradients_unsent(t, 0), 0) << "p " << p << " M " << M;
      for (int r = 1; r < p; ++r) EXPECT_EQ(max_gradients_unsent(t, r), 1) << "p " << p << " M " << M << " r " << r;
    }
  const ScheduleTable t = schedule_table({2, 2, 4});
  EXPECT_GE(max_gradients_unsent(t, 0), 1);  // its second chunk sends
  EXPECT_GE(max_gradients_unsent(t, 1), 1);
  EXPECT_LE(max_gradients_unsent(t, 1), 2);
}

}  // namespace nextron::test
