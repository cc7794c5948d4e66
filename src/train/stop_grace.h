// How long the ranks of this job have, after a stop signal (Ctrl-C or SIGTERM to the launcher), before the launcher
// kills them with SIGKILL: the time the trainer has to finish its step and save the final checkpoint.
//
// Open MPI 4's mpirun, on Ctrl-C or SIGTERM, waits its odls_base_sigkill_timeout T (1 s unless raised with
// `mpirun --mca odls_base_sigkill_timeout T` or OMPI_MCA_odls_base_sigkill_timeout in its environment, which the
// ranks inherit), sends SIGTERM to every rank, waits T again and sends SIGKILL: the ranks have T seconds. SIGUSR1
// to mpirun is forwarded to the ranks at once and kills nothing (measured with Open MPI 4.1.4). Slurm's srun / scancel
// send SIGTERM and SIGKILL KillWait seconds later (slurm.conf, 30 by default; not visible to the job). A process not
// started by a launcher has no deadline, nor has one under launch/nextron-mpirun (NEXTRON_LAUNCHER=nextron-mpirun),
// which turns Ctrl-C and SIGTERM into SIGUSR1 for mpirun to forward at once.
#pragma once

#include <string>

namespace nextron {

struct StopGrace {
  double seconds = -1;   // < 0: no known deadline
  std::string launcher;  // who kills the ranks: "Open MPI's mpirun", "Slurm"; empty for none
  std::string advice;    // how to give the ranks more time
};

// From this process's environment.
StopGrace stop_grace_from_env();

// A line to print before training when a stop could lose the final checkpoint (a --save run whose grace is under
// `needed_seconds`), else empty.
std::string stop_grace_note(const StopGrace& grace, double needed_seconds);

}  // namespace nextron
