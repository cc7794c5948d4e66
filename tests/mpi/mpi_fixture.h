// The harness of the MPI tests (tests/mpi): a GoogleTest fixture whose failure on any rank also fails the test on
// rank 0, the rank that reports.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "comm/mpi_communicator.h"

namespace nextron::test {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// Collective at the end of every test: rank 0 learns which other ranks failed and fails the test too (rank 0 is the
// one that reports).
inline void fail_on_rank0_when_another_rank_failed(bool failed_here) {
  int failed = failed_here ? 1 : 0;
  std::vector<int> all(world_size());
  MPI_Allgather(&failed, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD);
  if (world_rank() != 0) return;
  std::string ranks;
  for (size_t r = 1; r < all.size(); ++r) {
    if (all[r]) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  }
  if (!ranks.empty()) ADD_FAILURE() << "failed on rank(s) " << ranks << " (their messages are above, on stderr)";
}

// Value rank `src` sends to rank `dst` at position `i` of an all-to-all (exact in float for small ids).
inline float a2a_value(int src, int dst, int i) { return static_cast<float>(src * 10000 + dst * 100 + i); }

// A test whose failure on any rank fails it on rank 0 too.
class Mpi : public ::testing::Test {
 protected:
  void SetUp() override { comm_ = MpiCommunicator::world(); }
  void TearDown() override { fail_on_rank0_when_another_rank_failed(HasFailure()); }
  std::unique_ptr<MpiCommunicator> comm_;
};

// On ranks other than 0: print only failed assertions, prefixed with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.message());
  }

 private:
  int rank_;
};

}  // namespace nextron::test
