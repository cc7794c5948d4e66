// NcclCommunicator over real MPI processes, one GPU per rank (CMakeLists.txt registers np 1 and 2). Buffers are
// filled on the host, copied to the device, and the results copied back and compared with closed-form values built
// from the rank ids.
//
// The bf16 collectives and the shared-stream mode (a communicator on CudaOps' stream) are what tensor parallelism on
// the CUDA backend runs on.
//
// Without a usable GPU for every rank (no device, or more ranks on a node than it has GPUs: NCCL refuses two ranks
// on one device) every test is skipped on every rank and the job passes. The decision is agreed on over MPI, so all
// ranks skip together or none does. Only rank 0 prints GoogleTest's report; other ranks print their failed
// assertions prefixed with their rank, and a test fails on rank 0 when it failed on any rank.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "../cuda/cuda_test_util.h"
#include "../mpi/mpi_fixture.h"
#include "comm/cuda/nccl_communicator.h"
#include "comm/mpi_communicator.h"
#include "core/cuda/check.h"
#include "core/cuda/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cuda/cuda_ops.h"
#include "nccl_env.h"

namespace nextron::test {

std::string g_skip_reason;
int g_device = -1;
MpiCommunicator* g_mpi = nullptr;

namespace {

std::unique_ptr<NcclCommunicator> g_nccl;  // the world, over NCCL
std::string g_create_error;                // why g_nccl is null when nothing is skipped

// A test whose failure on any rank fails it on rank 0 too (rank 0 is the one that reports).
class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!g_skip_reason.empty()) GTEST_SKIP() << g_skip_reason;
    ASSERT_NE(g_nccl, nullptr) << "NcclCommunicator::create failed: " << g_create_error;
    comm_ = g_nccl.get();
  }
  void TearDown() override { fail_on_rank0_when_another_rank_failed(HasFailure()); }
  NcclCommunicator* comm_ = nullptr;
};

}  // namespace

TEST_F(Nccl, RankAndSizeMatchWorld) {
  EXPECT_EQ(comm_->rank(), world_rank());
  EXPECT_EQ(comm_->size(), world_size());
}

TEST_F(Nccl, AllReduceSumFloat) {
  // buf[i] = rank + i on every rank: the sum is size * i + size * (size - 1) / 2.
  const int p = comm_->size(), r = comm_->rank();
  std::vector<float> host(1000);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(r + static_cast<int>(i));
  DeviceArray<float> buf(host);
  comm_->all_reduce_sum(buf.get(), static_cast<int64_t>(host.size()));
  const std::vector<float> out = buf.download();
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_EQ(out[i], static_cast<float>(p * static_cast<int>(i) + p * (p - 1) / 2)) << i;
  }
}

TEST_F(Nccl, AllReduceSumDouble) {
  const int p = comm_->size(), r = comm_->rank();
  std::vector<double> host(333);
  for (size_t i = 0; i < host.size(); ++i) host[i] = (r + 1) + 0.5 * static_cast<double>(i);
  DeviceArray<double> buf(host);
  comm_->all_reduce_sum(buf.get(), static_cast<int64_t>(host.size()));
  const std::vector<double> out = buf.download();
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], p * (p + 1) / 2.0 + 0.5 * i * p) << i;
}

TEST_F(Nccl, EmptyCallsAreNoOps) {
  comm_->all_reduce_sum(static_cast<float*>(nullptr), 0);
  comm_->all_reduce_sum(static_cast<double*>(nullptr), 0);
  comm_->all_gather(nullptr, nullptr, 0);
  comm_->reduce_scatter_sum(nullptr, nullptr, 0);
  comm_->broadcast(nullptr, 0, 0);
  SUCCEED();
}

TEST_F(Nccl, ReduceScatterSum) {
  const int p = comm_->size(), r = comm_->rank();
  const int64_t count = 37;
  std::vector<float> in(p * count);
  // Block j (destined for rank j), element k, on rank r: (r + 1) * (j + 1) + k.
  for (int j = 0; j < p; ++j) {
    for (int64_t k = 0; k < count; ++k) in[j * count + k] = static_cast<float>((r + 1) * (j + 1) + k);
  }
  DeviceArray<float> d_in(in), d_out(std::vector<float>(count, -1.0f));
  comm_->reduce_scatter_sum(d_in.get(), d_out.get(), count);
  const std::vector<float> out = d_out.download();
  for (int64_t k = 0; k < count; ++k) {
    ASSERT_EQ(out[k], static_cast<float>(p * (p + 1) / 2 * (r + 1) + p * k)) << k;
  }
}

TEST_F(Nccl, AllGather) {
  const int p = comm_->size(), r = comm_->rank();
  const int64_t count = 19;
  std::vector<float> in(count);
  for (int64_t k = 0; k < count; ++k) in[k] = static_cast<float>(r * 1000 + k);
  DeviceArray<float> d_in(in), d_out(std::vector<float>(p * count, -1.0f));
  comm_->all_gather(d_in.get(), d_out.get(), count);
  const std::vector<float> out = d_out.download();
  for (int j = 0; j < p; ++j) {
    for (int64_t k = 0; k < count; ++k) ASSERT_EQ(out[j * count + k], static_cast<float>(j * 1000 + k)) << j;
  }
}

// bf16 (the TP region boundaries of the CUDA backend): values are small integers, exact in bf16 and in every
// partial sum, so the results are exact whatever order NCCL sums in.
std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = f32_to_bf16(x[i]);
  return out;
}

TEST_F(Nccl, AllReduceSumBf16) {
  const int p = comm_->size(), r = comm_->rank();
  std::vector<float> host(515);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(r + static_cast<int>(i % 32));
  DeviceArray<uint16_t> buf(to_bf16(host));
  comm_->all_reduce_sum(buf.get(), static_cast<int64_t>(host.size()), DType::bf16);
  const std::vector<uint16_t> out = buf.download();
  for (size_t i = 0; i < out.size(); ++i)
    ASSERT_EQ(bf16_to_f32(out[i]), static_cast<float>(p * static_cast<int>(i % 32) + p * (p - 1) / 2)) << i;
}

TEST_F(Nccl, ReduceScatterAndAllGatherBf16) {
  const int p = comm_->size(), r = comm_->rank();
  const int64_t count = 21;
  std::vector<float> in(p * count);
  for (int j = 0; j < p; ++j)
    for (int64_t k = 0; k < count; ++k) in[j * count + k] = static_cast<float>((r + 1) * (j + 1) + k);
  DeviceArray<uint16_t> d_in(to_bf16(in)), d_out(std::vector<uint16_t>(count, 0));
  comm_->reduce_scatter_sum(d_in.get(), d_out.get(), count, DType::bf16);
  const std::vector<uint16_t> out = d_out.download();
  for (int64_t k = 0; k < count; ++k)
    ASSERT_EQ(bf16_to_f32(out[k]), static_cast<float>(p * (p + 1) / 2 * (r + 1) + p * k)) << k;

  std::vector<float> mine(count);
  for (int64_t k = 0; k < count; ++k) mine[k] = static_cast<float>(r * 50 + k);
  DeviceArray<uint16_t> g_in(to_bf16(mine)), g_out(std::vector<uint16_t>(p * count, 0));
  comm_->all_gather(g_in.get(), g_out.get(), count, DType::bf16);
  const std::vector<uint16_t> all = g_out.download();
  for (int j = 0; j < p; ++j)
    for (int64_t k = 0; k < count; ++k) ASSERT_EQ(bf16_to_f32(all[j * count + k]), static_cast<float>(j * 50 + k));
}

TEST_F(Nccl, SharedStreamOrdersAfterQueuedKernels) {
  // A communicator on the compute backend's stream: a collective right after an asynchronous kernel must see its
  // result without any host synchronisation in between (the trainer relies on it).
  CudaOps ops(comm_->device());
  auto shared = NcclCommunicator::create(*g_mpi, comm_->device(), ops.stream());
  ASSERT_EQ(shared->stream(), ops.stream());
  const int64_t n = 1 << 20;  // large enough that the add is still running when the collective is enqueued
  Tensor a, b, y;
  ops.f32(a, {n});
  ops.f32(b, {n});
  ops.f32(y, {n});
  std::vector<float> ha(n), hb(n);
  for (int64_t i = 0; i < n; ++i) {
    ha[i] = static_cast<float>(i % 7);
    hb[i] = static_cast<float>(comm_->rank());
  }
  ops.upload(a, ha.data(), n * sizeof(float));
  ops.upload(b, hb.data(), n * sizeof(float));
  for (int rep = 0; rep < 8; ++rep) ops.add(y, a, b);  // queued, not waited for
  shared->all_reduce_sum(y.f32(), n);                  // returns without waiting on the shared stream
  Tensor z;
  ops.add(ops.f32(z, {n}), y, a);  // queued after the collective: reads its result
  std::vector<float> out(n), outz(n);
  ops.download(out.data(), y, n * sizeof(float));
  ops.download(outz.data(), z, n * sizeof(float));
  const int p = comm_->size();
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(out[i], static_cast<float>(p * (i % 7) + p * (p - 1) / 2)) << i;
    ASSERT_EQ(outz[i], static_cast<float>((p + 1) * (i % 7) + p * (p - 1) / 2)) << i;
  }
  auto child = shared->split(0, comm_->rank());
  EXPECT_EQ(dynamic_cast<NcclCommunicator&>(*child).stream(), ops.stream());  // splits keep the caller's stream
}

TEST_F(Nccl, AllToAllVUneven) {
  // Rank i sends i + j + 1 elements to rank j, so every pair has a different count.
  const int p = comm_->size(), r = comm_->rank();
  std::vector<int64_t> send_counts(p), recv_counts(p);
  std::vector<float> send;
  int64_t total = 0;
  for (int d = 0; d < p; ++d) {
    send_counts[d] = r + d + 1;
    recv_counts[d] = d + r + 1;
    total += recv_counts[d];
    for (int i = 0; i < r + d + 1; ++i) send.push_back(a2a_value(r, d, i));
  }
  DeviceArray<float> d_send(send), d_recv(std::vector<float>(total + 1, -1.0f));  // +1: detects overruns
  comm_->all_to_all_v(d_send.get(), send_counts, d_recv.get(), recv_counts);
  const std::vector<float> recv = d_recv.download();
  int64_t at = 0;
  for (int s = 0; s < p; ++s) {
    for (int i = 0; i < s + r + 1; ++i) ASSERT_EQ(recv[at++], a2a_value(s, r, i)) << "from " << s << " index " << i;
  }
  EXPECT_EQ(recv[total], -1.0f);  // nothing written past the end
}

TEST_F(Nccl, AllToAllVWithEmptyPairs) {
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
  DeviceArray<float> d_send(send), d_recv(std::vector<float>(total + 1, -1.0f));
  comm_->all_to_all_v(d_send.get(), send_counts, d_recv.get(), recv_counts);
  const std::vector<float> recv = d_recv.download();
  int64_t at = 0;
  for (int s = 0; s < p; ++s) {
    for (int i = 0; i < (s + r) % 3; ++i) ASSERT_EQ(recv[at++], a2a_value(s, r, i)) << "from " << s;
  }
  EXPECT_EQ(recv[total], -1.0f);
}

TEST_F(Nccl, BroadcastFromLastRank) {
  const int root = comm_->size() - 1;
  std::vector<float> host(101, -7.0f);
  if (comm_->rank() == root) {
    for (size_t i = 0; i < host.size(); ++i) host[i] = 3.0f * i + 0.5f;
  }
  DeviceArray<float> buf(host);
  comm_->broadcast(buf.get(), static_cast<int64_t>(host.size()), root);
  const std::vector<float> out = buf.download();
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], 3.0f * i + 0.5f) << i;
}

TEST_F(Nccl, SendRecvRing) {
  const int p = comm_->size(), r = comm_->rank();
  if (p == 1) GTEST_SKIP() << "a blocking ring needs two ranks";
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  std::vector<float> host(64);
  for (int i = 0; i < 64; ++i) host[i] = static_cast<float>(r * 100 + i);
  DeviceArray<float> out(host), in(std::vector<float>(64, -1.0f));
  // Even ranks send first, odd ranks receive first: NCCL's send blocks until the peer receives.
  if (r % 2 == 0) {
    comm_->send(out.get(), 64, next, 7);
    comm_->recv(in.get(), 64, prev, 7);
  } else {
    comm_->recv(in.get(), 64, prev, 7);
    comm_->send(out.get(), 64, next, 7);
  }
  const std::vector<float> got = in.download();
  for (int i = 0; i < 64; ++i) ASSERT_EQ(got[i], static_cast<float>(prev * 100 + i)) << i;
}

TEST_F(Nccl, SendRecvCombinedRing) {
  // Works at one rank too: the send to oneself and the receive are in one NCCL group.
  const int p = comm_->size(), r = comm_->rank();
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  std::vector<float> host(10);
  for (int i = 0; i < 10; ++i) host[i] = static_cast<float>(r * 100 + i);
  DeviceArray<float> out(host), in(std::vector<float>(12, -1.0f));
  comm_->send_recv(out.get(), 10, next, in.get(), 10, prev, 3);
  const std::vector<float> got = in.download();
  for (int i = 0; i < 10; ++i) ASSERT_EQ(got[i], static_cast<float>(prev * 100 + i)) << i;
  EXPECT_EQ(got[10], -1.0f);
}

TEST_F(Nccl, Barrier) {
  comm_->barrier();
  comm_->barrier();
  SUCCEED();
}

TEST_F(Nccl, SplitByParity) {
  const int p = comm_->size(), r = comm_->rank();
  auto sub = comm_->split(r % 2, r);
  const int sub_size = (p + 1 - r % 2) / 2;
  ASSERT_EQ(sub->size(), sub_size);
  EXPECT_EQ(sub->rank(), r / 2);
  // The group sum of world ranks...
  DeviceArray<double> v(std::vector<double>{static_cast<double>(r)});
  sub->all_reduce_sum(v.get(), 1);
  double expect = 0;
  for (int q = r % 2; q < p; q += 2) expect += q;
  EXPECT_EQ(v.download()[0], expect);
  // ...and the gather in group order lists them ascending: the key (world rank) orders the group.
  DeviceArray<float> mine(std::vector<float>{static_cast<float>(r)});
  DeviceArray<float> gathered(std::vector<float>(sub_size, -1.0f));
  sub->all_gather(mine.get(), gathered.get(), 1);
  const std::vector<float> got = gathered.download();
  for (int i = 0; i < sub_size; ++i) EXPECT_EQ(got[i], static_cast<float>(r % 2 + 2 * i)) << i;
}

TEST_F(Nccl, SplitReversedKeys) {
  // A descending key reverses the order, as MPI_Comm_split would.
  const int p = comm_->size(), r = comm_->rank();
  auto sub = comm_->split(0, p - r);
  ASSERT_EQ(sub->size(), p);
  EXPECT_EQ(sub->rank(), p - 1 - r);
}

TEST_F(Nccl, BadArgumentsAreErrorsOnEveryRank) {
  // Checked before any NCCL call, so every rank throws and nobody waits in a collective.
  EXPECT_THROW(comm_->all_reduce_sum(static_cast<float*>(nullptr), -1), Error);
  EXPECT_THROW(comm_->all_gather(nullptr, nullptr, -3), Error);
  EXPECT_THROW(comm_->reduce_scatter_sum(nullptr, nullptr, -3), Error);
  EXPECT_THROW(comm_->all_to_all_v(nullptr, std::vector<int64_t>(comm_->size() + 1), nullptr,
                                   std::vector<int64_t>(comm_->size())),
               Error);
  EXPECT_THROW(comm_->all_to_all_v(nullptr, std::vector<int64_t>(comm_->size(), -1), nullptr,
                                   std::vector<int64_t>(comm_->size(), -1)),
               Error);
  EXPECT_THROW(comm_->send(nullptr, 0, comm_->size(), 0), Error);
  EXPECT_THROW(comm_->send(nullptr, 4, comm_->rank(), 0), Error);  // to oneself: would never complete
  EXPECT_THROW(comm_->recv(nullptr, 4, comm_->rank(), 0), Error);
  EXPECT_THROW(comm_->send_recv(nullptr, -1, 0, nullptr, 0, 0, 0), Error);
  EXPECT_THROW(comm_->broadcast(nullptr, 0, -1), Error);
  EXPECT_THROW(comm_->split(-1, 0), Error);
  EXPECT_THROW(comm_->all_gather(nullptr, nullptr, -2, DType::bf16), Error);
}

}  // namespace nextron::test

namespace {

// Why this job cannot run the tests ("" when it can), the same on every rank. Ranks sharing a node need distinct
// GPUs, so the node-local rank picks the device and the node must have at least as many GPUs as ranks.
std::string skip_reason(MPI_Comm node, int* device) {
  int local_rank = 0, local_size = 1;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  const int count = nextron::cuda::device_count();
  *device = count > 0 ? local_rank % count : -1;
  const int mine[2] = {count == 0 ? 1 : 0, count > 0 && local_size > count ? 1 : 0};
  int any[2] = {0, 0};
  MPI_Allreduce(mine, any, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any[0]) return "skipped: no CUDA device";
  if (any[1]) return "skipped: more ranks per node than CUDA devices (NCCL needs one GPU per rank)";
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  setenv("NEXTRON_MPI", "1", 0);  // an MPI test: initialise MPI even when started without mpiexec (a singleton)
  nextron::MpiSession session(&argc, &argv);
  const int rank = session.world_rank(), size = session.world_size();
  ::testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new nextron::test::RankFailurePrinter(rank));
  }

  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  int device = -1;
  nextron::test::g_skip_reason = skip_reason(node, &device);
  nextron::test::g_device = device;
  MPI_Comm_free(&node);
  auto world = nextron::MpiCommunicator::world();
  nextron::test::g_mpi = world.get();
  if (nextron::test::g_skip_reason.empty()) {
    try {
      nextron::test::g_nccl = nextron::NcclCommunicator::create(*world, device);
    } catch (const nextron::Error& e) {
      nextron::test::g_create_error = e.what();
    }
  }
  if (rank == 0 && !nextron::test::g_skip_reason.empty()) std::printf("%s\n", nextron::test::g_skip_reason.c_str());

  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  nextron::test::g_nccl.reset();  // before MPI_Finalize (the session's destructor)
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("nextron_nccl_tests: world size %d: %s\n", size,
                any_failed ? "FAILED on some rank" : "all ranks passed or skipped");
  }
  return any_failed;
}
