// What main (test_nccl_communicator.cpp) decides before the tests of nextron_nccl_tests run, the same on every rank.
#pragma once

#include <string>

#include "comm/mpi_communicator.h"

namespace nextron::test {

extern std::string g_skip_reason;  // non-empty: every test skips (no GPU for every rank)
extern int g_device;               // this rank's GPU (node-local rank)
extern MpiCommunicator* g_mpi;     // the world over MPI

}  // namespace nextron::test
