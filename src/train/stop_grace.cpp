#include "train/stop_grace.h"

#include <cstdlib>
#include <string>

#include "core/error.h"

namespace nextron {

namespace {

constexpr const char* kOpenMpiAdvice =
    "stop the job with `kill -USR1 <mpirun pid>` (forwarded to the ranks at once; they save and exit), or give "
    "mpirun --mca odls_base_sigkill_timeout 300 (Ctrl-C and SIGTERM then reach the ranks after 300 s and leave "
    "them 300 s to save)";

}  // namespace

StopGrace stop_grace_from_env() {
  StopGrace g;
  const char* launcher = std::getenv("NEXTRON_LAUNCHER");
  if (launcher && std::string(launcher) == "nextron-mpirun") return g;  // stops arrive at once, as SIGUSR1
  if (std::getenv("OMPI_COMM_WORLD_SIZE") && !std::getenv("SLURM_STEP_ID")) {
    g.launcher = "Open MPI's mpirun";
    g.advice = kOpenMpiAdvice;
    g.seconds = 1;  // Open MPI 4's default
    if (const char* v = std::getenv("OMPI_MCA_odls_base_sigkill_timeout")) {
      char* end = nullptr;
      const double s = std::strtod(v, &end);
      if (end != v && *end == '\0' && s >= 0) g.seconds = s;
    }
  } else if (std::getenv("SLURM_STEP_ID") && std::getenv("SLURM_JOB_ID")) {
    g.launcher = "Slurm";
    g.advice =
        "KillWait in slurm.conf (30 s by default) bounds the time to save; sbatch --signal=TERM@120 asks "
        "for the signal 120 s before the time limit";
  }
  return g;
}

std::string stop_grace_note(const StopGrace& grace, double needed_seconds) {
  if (grace.seconds < 0 || grace.seconds >= needed_seconds) return "";
  return detail::concat(
      "note: ", grace.launcher, " kills the ranks ", grace.seconds,
      " s after they receive Ctrl-C or SIGTERM, which may not leave the time to save the final checkpoint: ",
      grace.advice);
}

}  // namespace nextron
