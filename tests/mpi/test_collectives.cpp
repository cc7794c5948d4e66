// Collectives over real MPI processes (run under mpiexec at several world sizes; CMakeLists.txt registers np 1, 4
// and 8). Every expected value is closed-form in the rank ids. Only rank 0 prints GoogleTest's report; other
// ranks print their failed assertions prefixed with their rank, and each test fails on rank 0 when it failed on
// any rank. The exit status is nonzero when any rank failed.
//
// `nextron_mpi_tests --abort-test`: rank 1 (rank 0 in a one-rank job) calls abort_all while the others wait in a
// barrier; the job must end with a nonzero status instead of hanging (tests/mpi/abort_test.cmake).
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "comm/mpi_communicator.h"
#include "core/error.h"
#include "model/config.h"
#include "mpi_fixture.h"
#include "parallel/layout.h"

namespace nextron::test {

namespace {

ModelConfig tiny_moe_config() {
  ModelConfig c;
  c.vocab_size = 512;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 32;
  c.linear_num_key_heads = 2;
  c.linear_num_value_heads = 4;
  c.linear_key_head_dim = 32;
  c.linear_value_head_dim = 32;
  c.num_experts = 8;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 128;
  c.shared_expert_intermediate_size = 128;
  c.layer_types = {MixerType::linear_attention, MixerType::linear_attention, MixerType::linear_attention,
                   MixerType::full_attention};
  return c;
}

}  // namespace

TEST_F(Mpi, RankAndSizeMatchWorld) {
  EXPECT_EQ(comm_->rank(), world_rank());
  EXPECT_EQ(comm_->size(), world_size());
}

TEST_F(Mpi, AllReduceSumFloat) {
  const int p = comm_->size();
  std::vector<float> buf(1000);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>((comm_->rank() + 1) * (i % 7 + 1));
  comm_->all_reduce_sum(buf.data(), static_cast<int64_t>(buf.size()));
  for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], static_cast<float>(p * (p + 1) / 2 * (i % 7 + 1))) << i;
}

TEST_F(Mpi, AllReduceSumDouble) {
  const int p = comm_->size();
  std::vector<double> buf(333);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = (comm_->rank() + 1) + 0.5 * static_cast<double>(i);
  comm_->all_reduce_sum(buf.data(), static_cast<int64_t>(buf.size()));
  for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], p * (p + 1) / 2.0 + 0.5 * i * p) << i;
}

TEST_F(Mpi, AllReduceOfNothingIsANoOp) {
  comm_->all_reduce_sum(static_cast<float*>(nullptr), 0);
  SUCCEED();
}

TEST_F(Mpi, ReduceScatterSum) {
  const int p = comm_->size(), r = comm_->rank();
  const int64_t count = 37;
  std::vector<float> in(p * count), out(count, -1.0f);
  // Block j (destined for rank j), element k, on rank r: (r + 1) * (j + 1) + k.
  for (int j = 0; j < p; ++j) {
    for (int64_t k = 0; k < count; ++k) in[j * count + k] = static_cast<float>((r + 1) * (j + 1) + k);
  }
  comm_->reduce_scatter_sum(in.data(), out.data(), count);
  for (int64_t k = 0; k < count; ++k) {
    ASSERT_EQ(out[k], static_cast<float>(p * (p + 1) / 2 * (r + 1) + p * k)) << k;
  }
}

TEST_F(Mpi, AllGather) {
  const int p = comm_->size(), r = comm_->rank();
  const int64_t count = 19;
  std::vector<float> in(count), out(p * count, -1.0f);
  for (int64_t k = 0; k < count; ++k) in[k] = static_cast<float>(r * 1000 + k);
  comm_->all_gather(in.data(), out.data(), count);
  for (int j = 0; j < p; ++j) {
    for (int64_t k = 0; k < count; ++k) ASSERT_EQ(out[j * count + k], static_cast<float>(j * 1000 + k)) << j;
  }
}

TEST_F(Mpi, AllToAllVUneven) {
  // Rank r sends r + d + 1 elements to rank d, so every pair has a different count.
  const int p = comm_->size(), r = comm_->rank();
  std::vector<int64_t> send_counts(p), recv_counts(p);
  std::vector<float> send;
  for (int d = 0; d < p; ++d) {
    send_counts[d] = r + d + 1;
    recv_counts[d] = d + r + 1;
    for (int i = 0; i < r + d + 1; ++i) send.push_back(a2a_value(r, d, i));
  }
  int64_t total = 0;
  for (int64_t c : recv_counts) total += c;
  std::vector<float> recv(total, -1.0f);
  comm_->all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
  int64_t at = 0;
  for (int s = 0; s < p; ++s) {
    for (int i = 0; i < s + r + 1; ++i) ASSERT_EQ(recv[at++], a2a_value(s, r, i)) << "from " << s << " index " << i;
  }
}

TEST_F(Mpi, AllToAllVWithEmptyPairs) {
  // Rank r sends (r + d) % 3 elements to rank d: some pairs exchange nothing.
  const int p = comm_->size(), r = comm_->rank();
  std::vector<int64_t> send_counts(p), recv_counts(p);
  std::vector<float> send;
  int64_t total = 0;
  for (int d = 0; d < p; ++d) {
    send_counts[d] = recv_counts[d] = (r + d) % 3;
    total += recv_counts[d];
    for (int i = 0; i < (r + d) % 3; ++i) send.push_back(a2a_value(r, d, i));
  }
  std::vector<float> recv(total + 1, -1.0f);  // +1: never a zero-size buffer
  send.push_back(0.0f);
  comm_->all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
  int64_t at = 0;
  for (int s = 0; s < p; ++s) {
    for (int i = 0; i < (s + r) % 3; ++i) ASSERT_EQ(recv[at++], a2a_value(s, r, i)) << "from " << s;
  }
  EXPECT_EQ(recv[total], -1.0f);  // nothing written past the end
}

TEST_F(Mpi, Broadcast) {
  const int root = comm_->size() - 1;
  std::vector<float> buf(101, -7.0f);
  if (comm_->rank() == root) {
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = 3.0f * i + 0.5f;
  }
  comm_->broadcast(buf.data(), static_cast<int64_t>(buf.size()), root);
  for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], 3.0f * i + 0.5f) << i;
}

TEST_F(Mpi, SendRecvRing) {
  const int p = comm_->size(), r = comm_->rank();
  if (p == 1) GTEST_SKIP() << "a blocking ring needs two ranks";
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  std::vector<float> out(64), in(64, -1.0f);
  for (int i = 0; i < 64; ++i) out[i] = static_cast<float>(r * 100 + i);
  // Even ranks send first, odd ranks receive first: no deadlock whatever MPI buffers.
  if (r % 2 == 0) {
    comm_->send(out.data(), 64, next, 7);
    comm_->recv(in.data(), 64, prev, 7);
  } else {
    comm_->recv(in.data(), 64, prev, 7);
    comm_->send(out.data(), 64, next, 7);
  }
  for (int i = 0; i < 64; ++i) ASSERT_EQ(in[i], static_cast<float>(prev * 100 + i)) << i;
}

TEST_F(Mpi, SendRecvCombinedRing) {
  const int p = comm_->size(), r = comm_->rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  std::vector<float> out(10), in(12, -1.0f);
  for (int i = 0; i < 10; ++i) out[i] = static_cast<float>(r * 100 + i);
  comm_->send_recv(out.data(), 10, next, in.data(), 10, prev, 3);
  for (int i = 0; i < 10; ++i) ASSERT_EQ(in[i], static_cast<float>(prev * 100 + i)) << i;
  EXPECT_EQ(in[10], -1.0f);
}

// Every rank sends to both neighbours and receives from both in one batch, with messages far above MPI's eager limit
// (a blocking send of that size waits for its receive): only posting them together completes. Two tags to the same
// peer keep their own order, as the pipeline's activations and gradients do at PP 2.
TEST_F(Mpi, BatchSendRecvBothWaysDoesNotDeadlock) {
  const int p = comm_->size(), r = comm_->rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  const int64_t n = 1 << 20;
  auto value = [](int from, int tag, int64_t i) { return static_cast<float>(from * 1000 + tag * 100 + i % 97); };
  std::vector<float> to_next(n), to_prev(n), second(n), from_prev(n, -1), from_next(n, -1), second_in(n, -1);
  for (int64_t i = 0; i < n; ++i) {
    to_next[i] = value(r, 1, i);
    to_prev[i] = value(r, 2, i);
    second[i] = value(r, 3, i);
  }
  std::vector<P2PMessage> batch = {
      {true, to_next.data(), n, DType::f32, next, 1}, {false, from_next.data(), n, DType::f32, next, 2},
      {true, to_prev.data(), n, DType::f32, prev, 2}, {false, from_prev.data(), n, DType::f32, prev, 1},
      {true, second.data(), n, DType::f32, next, 1},  {false, second_in.data(), n, DType::f32, prev, 1}};
  comm_->batch_send_recv(batch);
  for (int64_t i = 0; i < n; i += 4099) {
    ASSERT_EQ(from_prev[i], value(prev, 1, i)) << i;
    ASSERT_EQ(from_next[i], value(next, 2, i)) << i;
    ASSERT_EQ(second_in[i], value(prev, 3, i)) << i << ": the second message of one tag arrives second";
  }
  // A bad message is an error naming it, after the good ones before it completed (nothing left posted).
  std::vector<float> small(4, 1.0f), got(4, 0.0f);
  EXPECT_THROW(comm_->batch_send_recv({{true, small.data(), 4, DType::f32, p, 0}}), Error);
  comm_->batch_send_recv({{true, small.data(), 4, DType::f32, next, 5}, {false, got.data(), 4, DType::f32, prev, 5}});
  EXPECT_EQ(got, small);
}

TEST_F(Mpi, SplitByParity) {
  const int p = comm_->size(), r = comm_->rank();
  auto sub = comm_->split(r % 2, r);
  EXPECT_EQ(sub->size(), (p + 1 - r % 2) / 2);
  EXPECT_EQ(sub->rank(), r / 2);
  double v = r;
  sub->all_reduce_sum(&v, 1);
  double expect = 0;
  for (int q = r % 2; q < p; q += 2) expect += q;
  EXPECT_EQ(v, expect);
}

TEST_F(Mpi, SplitIntoLayoutGroups) {
  // Pick sizes the world fits: np 8 -> TP 2 x DP 2 x PP 2 with EP 2 (EDP 2); np 4 -> TP 2 x DP 2, EP 2; np 1 -> 1.
  const int p = comm_->size(), r = comm_->rank();
  ParallelSizes sizes;
  sizes.tp = p % 2 == 0 ? 2 : 1;
  sizes.pp = p % 8 == 0 ? 2 : 1;
  sizes.ep = p % 4 == 0 ? 2 : 1;
  const Layout layout(sizes, p, tiny_moe_config(), 64);
  for (Group g : all_group_kinds()) {
    SCOPED_TRACE(group_name(g));
    const std::vector<int> members = layout.group(g, r);
    auto sub = comm_->split(layout.group_index(g, r), layout.rank_in_group(g, r));
    ASSERT_EQ(sub->size(), static_cast<int>(members.size()));
    EXPECT_EQ(sub->rank(), layout.rank_in_group(g, r));
    // The group sum of world ranks + 1 matches the Layout's member list...
    float sum = static_cast<float>(r + 1);
    sub->all_reduce_sum(&sum, 1);
    float expect = 0;
    for (int m : members) expect += static_cast<float>(m + 1);
    EXPECT_EQ(sum, expect);
    // ...and gathering world ranks in group order reproduces the list itself.
    const float mine = static_cast<float>(r);
    std::vector<float> gathered(members.size());
    sub->all_gather(&mine, gathered.data(), 1);
    for (size_t i = 0; i < members.size(); ++i) EXPECT_EQ(gathered[i], static_cast<float>(members[i])) << i;
  }
}

TEST_F(Mpi, BadArgumentsAreErrorsOnEveryRank) {
  // Checked before any MPI call, so every rank throws and nobody waits in a collective.
  const int64_t too_many = int64_t{INT_MAX} + 1;
  try {
    comm_->all_reduce_sum(static_cast<float*>(nullptr), too_many);
    ADD_FAILURE() << "expected an error for a count above INT_MAX";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds INT_MAX"), std::string::npos) << e.what();
  }
  EXPECT_THROW(comm_->all_to_all_v(nullptr, std::vector<int64_t>(comm_->size() + 1), nullptr,
                                   std::vector<int64_t>(comm_->size())),
               Error);
  EXPECT_THROW(comm_->send(nullptr, 0, comm_->size(), 0), Error);
  EXPECT_THROW(comm_->broadcast(nullptr, 0, -1), Error);
  EXPECT_THROW(comm_->split(-1, 0), Error);
}

// Self-test of the harness (run only by the CTest mpi_failure_on_one_rank_fails_job, with
// --gtest_also_run_disabled_tests): a failure on rank 1 alone must fail the test on rank 0 and the job's status.
// bf16 buffers are the CUDA backend's (NCCL); MPI moves the CPU backend's f32 and says what to use instead.
TEST_F(Mpi, Bf16CollectivesAreRefusedWithTheFix) {
  uint16_t x[2] = {0, 0};
  for (int which = 0; which < 3; ++which) {
    try {
      if (which == 0) comm_->all_reduce_sum(x, 1, DType::bf16);
      if (which == 1) comm_->all_gather(x, x, 1, DType::bf16);
      if (which == 2) comm_->reduce_scatter_sum(x, x, 1, DType::bf16);
      ADD_FAILURE() << "MPI accepted bf16 collective " << which;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("NCCL, with --device cuda"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(comm_->buffer_device(), Device::cpu);
}

TEST_F(Mpi, DISABLED_FailsOnRankOneOnly) { EXPECT_NE(comm_->rank(), 1) << "deliberate failure on rank 1"; }

}  // namespace nextron::test

namespace {}  // namespace

int main(int argc, char** argv) {
  setenv("NEXTRON_MPI", "1", 0);  // an MPI test: initialise MPI even when started without mpiexec (a singleton)
  nextron::MpiSession session(&argc, &argv);
  const int rank = session.world_rank(), size = session.world_size();

  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--abort-test") == 0) {
      const int victim = size > 1 ? 1 : 0;
      if (rank == victim) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the others are waiting by now
        nextron::abort_all("deliberate failure (--abort-test)");
      }
      MPI_Barrier(MPI_COMM_WORLD);  // never completes: the victim never arrives
      std::fprintf(stderr, "rank %d: passed a barrier the aborted rank never entered\n", rank);
      return 3;
    }
  }

  ::testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new nextron::test::RankFailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("nextron_mpi_tests: world size %d: %s\n", size,
                any_failed ? "FAILED on some rank" : "all ranks passed");
  }
  return any_failed;
}
