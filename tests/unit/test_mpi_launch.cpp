// launched_by_mpi(): a process started without an MPI launcher is a one-rank job that never initialises MPI (so it
// runs where MPI's run-time is absent, as on the bare GPU machine of tools/gpu_check.sh); one started by mpirun /
// mpiexec / srun does. NEXTRON_MPI=1|0 overrides, and any other value is an error naming the choices.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "comm/mpi_communicator.h"
#include "core/error.h"

namespace nextron::test {

namespace {

// Sets or unsets environment variables for one scope and restores them after.
class ScopedEnv {
 public:
  void set(const char* name, const char* value) {
    save(name);
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second)
        setenv(it->first.c_str(), it->second->c_str(), 1);
      else
        unsetenv(it->first.c_str());
    }
  }

 private:
  void save(const char* name) {
    const char* v = std::getenv(name);
    saved_.emplace_back(name, v ? std::optional<std::string>(v) : std::nullopt);
  }
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

const char* const kLauncherVars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK",  "PMI_RANK", "PMI_SIZE",
                                     "MPI_LOCALNRANKS",      "NEXTRON_MPI"};

}  // namespace

TEST(MpiLaunch, OnlyALauncherOrTheOverrideInitialisesMpi) {
  ScopedEnv env;
  for (const char* v : kLauncherVars) env.set(v, nullptr);
  EXPECT_FALSE(launched_by_mpi()) << "no launcher variable set";
  {
    // A process that is not launched is a one-rank world without MPI.
    MpiSession session;
    EXPECT_EQ(session.world_size(), 1);
    EXPECT_EQ(session.world_rank(), 0);
    int initialized = 1;
    MPI_Initialized(&initialized);
    EXPECT_EQ(initialized, 0) << "MPI was initialised without a launcher";
  }
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"}) {
    ScopedEnv one;
    one.set(v, "2");
    EXPECT_TRUE(launched_by_mpi()) << v;
  }
  env.set("NEXTRON_MPI", "1");
  EXPECT_TRUE(launched_by_mpi());
  env.set("OMPI_COMM_WORLD_SIZE", "4");
  env.set("NEXTRON_MPI", "0");
  EXPECT_FALSE(launched_by_mpi()) << "NEXTRON_MPI=0 wins over the launcher's variables";
  env.set("NEXTRON_MPI", "yes");
  try {
    launched_by_mpi();
    ADD_FAILURE() << "NEXTRON_MPI=yes was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use 1 (always initialise MPI) or 0 (never)"), std::string::npos) << e.what();
  }
}

}  // namespace nextron::test
