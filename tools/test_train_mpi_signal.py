#!/usr/bin/env python3
"""Stopping a 2-rank nextron-train job under Open MPI's mpirun while its save takes several seconds
(NEXTRON_FAULT_SAVE_DELAY_S), as real processes. Open MPI 4 handles Ctrl-C / SIGTERM by waiting its
odls_base_sigkill_timeout T (1 s by default), sending SIGTERM to the ranks, waiting T again and sending SIGKILL;
it forwards SIGUSR1 at once. Checked:

1. `kill -USR1 <mpirun>` on a bare mpirun: the ranks finish their step, save the final checkpoint (complete: the
   run resumes from it) and exit 3; the start-up note told how to stop the job (USR1, or a longer T);
2. SIGTERM with `--mca odls_base_sigkill_timeout 12`: the ranks get it after 12 s and have 12 s: saved;
3. SIGTERM on a bare mpirun: the slow save is killed as the note warned; no checkpoint appears, half-written or not;
4. launch/nextron-mpirun (which turns Ctrl-C / SIGTERM into SIGUSR1): Ctrl-C typed on a terminal (a pseudo-terminal
   here) and SIGTERM to the script both save, and the run resumes.

    python tools/test_train_mpi_signal.py --train build/nextron-train --mpiexec mpiexec --work build/train_mpi_signal

Prints "train_mpi_signal: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import os
import pty
import signal
import subprocess
import threading
import time

from checks import Checks
from train_test_data import REPO, TINY, fresh_byte_dataset

SAVE_DELAY_S = 4  # the save of a large model: over Open MPI's default 1 s
GRACE_S = 12  # odls_base_sigkill_timeout of case 2: room for the rest of a step and the save


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = os.path.abspath(args.work)
    data = fresh_byte_dataset(w)
    base = ["--model-config", TINY, "--data", data, "--seq-len", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "1e-3", "--no-progress", "--threads", "1", "--peak-tflops", "1"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1",
               NEXTRON_FAULT_SAVE_DELAY_S=str(SAVE_DELAY_S))
    env.pop("OMPI_MCA_odls_base_sigkill_timeout", None)
    check = Checks()

    def checkpoints(save):
        return sorted(x for x in os.listdir(save) if x.startswith("step_")) if os.path.isdir(save) else []

    def wait_steps(metrics, p_alive, n=3, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline and p_alive():
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= n:
                return True
            time.sleep(0.05)
        return False

    def train_args(save):
        metrics = save + ".jsonl"
        if os.path.exists(metrics):
            os.remove(metrics)
        return metrics, [args.train] + base + ["--train-steps", "100000", "--log-interval", "100000", "--metrics",
                                               metrics, "--save", save, "--resume", "none"]

    def stopped_run(save, mpirun_opts, sig, launcher=None, again_after=None):
        """Starts 2 ranks, sends `sig` to mpirun once step 3 is in the metrics; returns (rc, stdout, stderr, secs).

        The ranks log only at the end: while mpirun aborts a job it stops reading the ranks' output, and ranks
        logging a line per millisecond step would block on the full pipe before they could save."""
        metrics, train = train_args(save)
        cmd = (launcher or [args.mpiexec]) + ["--allow-run-as-root", "--oversubscribe", "-np", "2"] + mpirun_opts + train
        with open(save + ".out", "w") as out_f, open(save + ".err", "w") as err_f:
            p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)
            wait_steps(metrics, lambda: p.poll() is None)
            t0 = time.time()
            p.send_signal(sig)
            if again_after is not None:  # a second signal while the ranks save
                time.sleep(again_after)
                p.send_signal(sig)
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode, open(save + ".out").read(), open(save + ".err").read(), time.time() - t0

    def saved_and_resumable(name, save, rc, out, err, secs, min_secs):
        saved = checkpoints(save)
        ok = check(f"{name}: the final checkpoint is saved ({secs:.1f} s after the signal, save {SAVE_DELAY_S} s)",
                   len(saved) == 1 and secs >= min_secs,
                   f"rc {rc}, checkpoints {saved}\n{out[-500:]}\n{err[-500:]}")
        if not ok:
            return
        step = int(saved[0][5:])
        check(f"{name}: the checkpoint is complete (manifest written)",
              os.path.exists(os.path.join(save, saved[0], "manifest.json")))
        r = subprocess.run([args.mpiexec, "--allow-run-as-root", "--oversubscribe", "-np", "2", args.train] + base +
                           ["--train-steps", str(step + 1), "--save", save],
                           capture_output=True, text=True, timeout=300, env=dict(env, NEXTRON_FAULT_SAVE_DELAY_S="0"))
        check(f"{name}: the run resumes from it", r.returncode == 0 and f"continuing at step {step}" in r.stdout,
              r.stdout[-400:] + r.stderr[-400:])

    # 1. SIGUSR1 to a bare mpirun: forwarded at once, the ranks save and exit.
    s1 = os.path.join(w, "usr1")
    rc, out, err, secs = stopped_run(s1, [], signal.SIGUSR1)
    check("bare mpirun: the start-up note names the problem and both ways out",
          "kills the ranks 1 s after they receive Ctrl-C or SIGTERM" in err and "kill -USR1 <mpirun pid>" in err and
          "--mca odls_base_sigkill_timeout" in err, err[-600:])
    saved_and_resumable("SIGUSR1", s1, rc, out, err, secs, SAVE_DELAY_S)
    check("SIGUSR1: logged as the stop signal", "stopped early by SIGUSR1" in out, out[-300:])

    # 1b. A second SIGUSR1 in the middle of the final save (an impatient user, a scheduler repeating its signal): the
    # stop handlers stay installed until the save is complete, so it is ignored and the checkpoint still appears.
    s1b = os.path.join(w, "usr1_twice")
    rc, out, err, secs = stopped_run(s1b, [], signal.SIGUSR1, again_after=SAVE_DELAY_S / 2)
    saved_and_resumable("SIGUSR1 twice", s1b, rc, out, err, secs, SAVE_DELAY_S)

    # 2. SIGTERM with a longer odls_base_sigkill_timeout: the ranks get it late but have the time.
    s2 = os.path.join(w, "term_grace")
    rc, out, err, secs = stopped_run(s2, ["--mca", "odls_base_sigkill_timeout", str(GRACE_S)], signal.SIGTERM)
    saved_and_resumable(f"SIGTERM, odls_base_sigkill_timeout {GRACE_S}", s2, rc, out, err, secs, SAVE_DELAY_S)

    # 3. SIGTERM to a bare mpirun: the slow save is killed, as the note said.
    s3 = os.path.join(w, "term_bare")
    rc, out, err, secs = stopped_run(s3, [], signal.SIGTERM)
    left = [x for x in (os.listdir(s3) if os.path.isdir(s3) else []) if x != ".lock"]
    check(f"bare mpirun, SIGTERM: the save was killed ({secs:.1f} s after the signal), no checkpoint appears",
          not checkpoints(s3) and secs < SAVE_DELAY_S, f"rc {rc}, left {left}\n{out[-300:]}\n{err[-300:]}")
    # 4. launch/nextron-mpirun: Ctrl-C on a terminal, and SIGTERM, become SIGUSR1.
    launcher = [os.path.join(REPO, "launch", "nextron-mpirun")]
    s4 = os.path.join(w, "launcher_term")
    rc, out, err, secs = stopped_run(s4, [], signal.SIGTERM, launcher=launcher)
    saved_and_resumable("nextron-mpirun, SIGTERM", s4, rc, out, err, secs, SAVE_DELAY_S)
    check("nextron-mpirun, SIGTERM: exit status 3 (stopped early, saved)", rc == 3, f"rc {rc}\n{err[-300:]}")
    check("nextron-mpirun: no start-up note about mpirun's kill delay", "odls_base_sigkill_timeout" not in err,
          err[-400:])

    s5 = os.path.join(w, "launcher_ctrl_c")
    metrics, train = train_args(s5)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the launcher on a terminal of its own, as a user would start it
        os.execve(launcher[0], launcher + ["--allow-run-as-root", "--oversubscribe", "-np", "2"] + train, env)
    output = []

    def drain():
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            output.append(chunk.decode(errors="replace"))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    alive = lambda: os.waitpid(pid, os.WNOHANG) == (0, 0)
    started = wait_steps(metrics, alive)
    t0 = time.time()
    os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
    status = None
    deadline = time.time() + 300
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    secs = time.time() - t0
    reader.join(timeout=5)
    text = "".join(output)
    rc = os.waitstatus_to_exitcode(status) if status is not None else None
    check("nextron-mpirun on a terminal: training started", started, text[-300:])
    saved_and_resumable("nextron-mpirun, Ctrl-C", s5, rc, text, "", secs, SAVE_DELAY_S)
    check("nextron-mpirun, Ctrl-C: said it is stopping, exit status 3", rc == 3 and "stopping" in text,
          f"rc {rc}\n{text[-400:]}")
    return check.report("train_mpi_signal")


if __name__ == "__main__":
    raise SystemExit(main())
