#!/usr/bin/env python3
"""A real Slurm cluster of one node, private to this test, running nextron-train jobs through launch/submit.py and
launch/slurm.sbatch: a 4-rank CPU training job to completion, then a long job "preempted" with SIGTERM to its batch
shell, which must save, requeue itself and resume from its checkpoint.

It starts its own munged (own key and socket), slurmctld and slurmd with a slurm.conf in a temporary directory (the
node claims 8 CPUs on any machine: SlurmdParameters=config_overrides), points every Slurm command at it with
SLURM_CONF, and stops all of them at the end. Needs root (slurmd starts jobs as their user) and the Debian packages
slurm-wlm and munge (tools/setup.sh installs them); without them it prints why and exits 77 (CTest: skipped).

    python tools/test_slurm.py --train build/nextron-train --work build/slurm_test

Prints "slurm: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from checks import Checks
from train_test_data import REPO, TINY, fresh_byte_dataset

SKIP = 77
SUBMIT = os.path.join(REPO, "launch", "submit.py")
DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")


def missing_requirements():
    """Why this test cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root (slurmd must run as root to start jobs)"
    lacking = [b for b in DAEMONS + COMMANDS
               if shutil.which(b) is None and shutil.which(b, path="/usr/sbin:/sbin:/usr/local/sbin") is None]
    if lacking:
        return f"{', '.join(lacking)} not installed (Debian: apt-get install slurm-wlm munge; tools/setup.sh does)"
    return None


def binary(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class Cluster:
    """munged + slurmctld + slurmd in `tmp`, all stopped by stop()."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(tmp, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        # Everything under tmp; munged wants the directories of its socket searchable by all.
        os.chmod(tmp, 0o755)
        for d in ("munge", "state", "spool", "log", "run"):
            os.makedirs(os.path.join(tmp, d), mode=0o755)
        self.munge_socket = os.path.join(tmp, "munge", "munge.sock")
        self.pid_files = {"slurmd": os.path.join(tmp, "run", "slurmd.pid"),
                          "slurmctld": os.path.join(tmp, "run", "slurmctld.pid"),
                          "munged": os.path.join(tmp, "munge", "munged.pid")}

    def slurm_conf(self):
        t, h = self.tmp, self.host
        return f"""# A one-node cluster for tools/test_slurm.py
ClusterName=nextrontest
# The daemons talk over 127.0.0.1 whatever this host's name resolves to.
SlurmctldHost={h}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: how long a job's credential stays revoked after it ends, and so how long a requeued job waits before
# it may start again (120 s by default; a real cluster keeps that).
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={t}/state
SlurmdSpoolDir={t}/spool
SlurmctldPidFile={self.pid_files["slurmctld"]}
SlurmdPidFile={self.pid_files["slurmd"]}
SlurmctldLogFile={t}/log/slurmctld.log
SlurmdLogFile={t}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
# 8 CPUs on any machine: the node as configured, not as detected.
SlurmdParameters=config_overrides
# Look at the queue every second (default 60 s): a requeued job should not wait for the next pass.
SchedulerParameters=sched_interval=1
KillWait=30
# Finished jobs stay visible to scontrol for the checks (there is no accounting database).
MinJobAge=3600
NodeName={h} NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes={h} Default=YES MaxTime=INFINITE State=UP
"""

    def start(self):
        key = os.path.join(self.tmp, "munge", "munge.key")
        write(key, "", 0o600)
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        subprocess.run([binary("munged"), f"--key-file={key}", f"--socket={self.munge_socket}",
                        f"--pid-file={self.pid_files['munged']}", f"--log-file={self.tmp}/log/munged.log",
                        f"--seed-file={self.tmp}/munge/munged.seed"], check=True, capture_output=True, timeout=30)
        write(self.conf, self.slurm_conf())
        subprocess.run([binary("slurmctld"), "-f", self.conf], check=True, capture_output=True, timeout=30,
                       env=self.env)
        subprocess.run([binary("slurmd"), "-f", self.conf, "-N", self.host], check=True, capture_output=True,
                       timeout=30, env=self.env)

    def run(self, argv, **kw):
        return subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 60), env=self.env, **kw)

    def wait_idle(self, seconds=60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-o", "%T"])
            if r.returncode == 0 and r.stdout.strip() == "idle":
                return True
            time.sleep(0.5)
        return False

    def job(self, job_id):
        """scontrol show job's fields as a dict ({} when unknown)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def stop(self):
        """Ends every job, then the daemons (by their pid files)."""
        if os.path.exists(self.conf):
            self.run(["scancel", "--full", "--user", "root"])
            deadline = time.time() + 45
            while time.time() < deadline:
                r = self.run(["squeue", "-h", "-o", "%i"])
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int(open(self.pid_files[name]).read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    time.sleep(0.1)
                    os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs(self):
        out = ""
        for f in ("slurmctld.log", "slurmd.log"):
            p = os.path.join(self.tmp, "log", f)
            if os.path.exists(p):
                out += f"--- {f} (end)\n" + "".join(open(p, errors="replace").readlines()[-25:])
        return out


def wait_for(cond, seconds, step=0.5):
    """Polls cond() until it returns something true or the time is up; returns its last value."""
    deadline = time.time() + seconds
    while True:
        v = cond()
        if v or time.time() >= deadline:
            return v
        time.sleep(step)


def read(path):
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    why = missing_requirements()
    if why:
        print(f"slurm: skipped: {why}")
        return SKIP
    w = os.path.abspath(args.work)
    data = fresh_byte_dataset(w)  # empties the work directory first
    train = os.path.abspath(args.train)
    check = Checks()
    tmp = tempfile.mkdtemp(prefix="nextron-slurm-")
    cluster = Cluster(tmp)
    try:
        t0 = time.time()
        try:
            cluster.start()
            up, why = cluster.wait_idle(), ""
        except subprocess.CalledProcessError as e:
            up, why = False, f"{' '.join(e.cmd)} failed (status {e.returncode}): {e.stderr}\n"
        check("munged, slurmctld and slurmd start; the node is idle", up, why + cluster.logs())
        if not up:
            return check.report("slurm")

        # Open MPI built with PMIx (Debian's) starts under srun --mpi=pmix; without that plugin the batch script
        # starts the ranks with mpirun inside the allocation instead.
        r = cluster.run(["srun", "--mpi=list"])
        mpi_list = r.stdout + r.stderr
        launcher = "srun" if "pmix" in mpi_list else "mpirun"
        print(f"     (ranks start with {launcher}: srun --mpi=list says {' '.join(mpi_list.split())})")

        logs = os.path.join(w, "logs")
        cluster_file = write(os.path.join(w, "cluster.conf"), f"# this test's cluster\npartition = debug\n"
                             f"time = 10\ngpus-per-node = 0\nlaunch = {launcher}\n")

        def config(name, steps, extra=""):
            return write(os.path.join(w, name + ".conf"),
                         f"model-config = {TINY}\ndata = {data}\nseq-len = 32\nmicro-batch-size = 1\n"
                         f"global-batch-size = 4\ntrain-steps = {steps}\nthreads = 1\nno-progress = true\n"
                         f"lr = 1e-3\nsave = {os.path.join(w, name)}\n{extra}")

        def submit(conf, name, *extra):
            r = subprocess.run([sys.executable, SUBMIT, "--cluster-file", cluster_file, "--config", conf,
                                "--ranks-per-node", "4", "--job-name", name, "--log-dir", logs, "--train", train]
                               + list(extra), capture_output=True, text=True, timeout=60, env=cluster.env, cwd=w)
            job_id = r.stdout.strip()
            return (job_id if r.returncode == 0 and job_id.isdigit() else ""), r

        def state(job_id):
            return cluster.job(job_id).get("JobState", "")

        def finished(job_id):
            s = state(job_id)
            return s if s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else ""

        # a) A 4-rank CPU job of 4 steps, to completion.
        conf_a = config("job_a", 4)
        job_a, r = submit(conf_a, "tiny")
        check("submit.py submits the job and prints its id", bool(job_a), r.stdout + r.stderr)
        end = wait_for(lambda: finished(job_a), 120) if job_a else ""
        info = cluster.job(job_a) if job_a else {}
        folder = os.path.join(logs, f"tiny-{job_a}")
        rank0 = read(os.path.join(folder, "rank-0.out") if launcher == "srun" else
                     os.path.join(folder, "ranks", "1", "rank.0", "stdout"))
        batch_log = read(os.path.join(logs, f"tiny-{job_a}.out"))
        check("the job completes with exit code 0", end == "COMPLETED" and info.get("ExitCode") == "0:0",
              f"{info.get('JobState')} {info.get('ExitCode')}\n{batch_log}\n{rank0[-1500:]}\n{cluster.logs()}")
        check("rank 0's log in the job's folder shows 4 ranks and step 4/4", "world 4" in rank0 and
              "step 4/4" in rank0 and "saved " in rank0, rank0[-800:])
        metrics = os.path.join(w, "job_a", "metrics.jsonl")
        steps = [json.loads(x)["step"] for x in open(metrics) if '"train"' in x] if os.path.exists(metrics) else []
        check("metrics.jsonl holds steps 1-4", steps == [1, 2, 3, 4], str(steps))
        check("the checkpoint of step 4 exists", os.path.isdir(os.path.join(w, "job_a", "step_00000004")))
        envtxt = read(os.path.join(folder, "env.txt"))
        check("the folder holds the command, the environment and the config", "start 1" in envtxt and
              f"NEXTRON_CONFIG={conf_a}" in envtxt and os.path.exists(os.path.join(folder, "command.txt")) and
              os.path.exists(os.path.join(folder, "job_a.conf")), envtxt)

        # a2) The same with NEXTRON_LAUNCH=mpirun: Open MPI's mpirun inside the allocation (for an MPI that srun
        # cannot start).
        job_m, r = submit(config("job_m", 3), "tiny-mpirun", "--launch", "mpirun")
        end = wait_for(lambda: finished(job_m), 120) if job_m else ""
        rank0 = read(os.path.join(logs, f"tiny-mpirun-{job_m}", "ranks", "1", "rank.0", "stdout"))
        check("--launch mpirun: the job completes, 4 ranks, step 3/3", end == "COMPLETED" and "world 4" in rank0 and
              "step 3/3" in rank0, f"{end} {r.stderr}\n{read(os.path.join(logs, f'tiny-mpirun-{job_m}.out'))}\n"
              f"{rank0[-800:]}")

        # b) A long job, "preempted": SIGTERM to its batch shell (what --signal=B:TERM@120 does before the time
        # limit). The ranks must save and stop, the job requeue itself and the next start continue from the save.
        conf_b = config("job_b", 400, "save-interval = 100\n")
        job_b, r = submit(conf_b, "long")
        check("the long job is submitted", bool(job_b), r.stdout + r.stderr)
        folder = os.path.join(logs, f"long-{job_b}")
        log0 = os.path.join(folder, "rank-0.out") if launcher == "srun" else \
            os.path.join(folder, "ranks", "1", "rank.0", "stdout")
        running = wait_for(lambda: "step 5/400" in read(log0), 120) if job_b else False
        check("it trains (step 5 logged)", running, read(log0)[-800:] + read(os.path.join(logs, f"long-{job_b}.out")))
        if not running:
            return check.report("slurm")
        r = cluster.run(["scancel", "--signal=TERM", "--batch", job_b])
        check("scancel --signal=TERM --batch is accepted", r.returncode == 0, r.stderr)
        saved = wait_for(lambda: re.search(r"saved \S+/step_(\d+)", read(log0)), 60)
        step = int(saved.group(1)) if saved else -1
        check("the ranks saved a checkpoint and stopped early", saved is not None and
              os.path.isdir(os.path.join(w, "job_b", f"step_{step:08d}")) and
              "stopped early by SIGUSR1" in read(log0), read(log0)[-800:])
        restarted = wait_for(lambda: cluster.job(job_b).get("Restarts") == "1", 60)
        batch_log = os.path.join(logs, f"long-{job_b}.out")
        check("the job requeued itself (Restarts=1)", restarted and f"requeueing job {job_b}" in read(batch_log),
              str(cluster.job(job_b)) + read(batch_log))
        # The requeued job waits cred_expire (10 s here) before it starts again.
        resumed = wait_for(lambda: f"continuing at step {step}" in read(log0) and f"step {step + 1}/400" in read(log0),
                           120)
        check(f"the second start continued from the checkpoint (continuing at step {step}, then step {step + 1})",
              resumed, read(log0)[-800:] + read(batch_log) + str(cluster.job(job_b)))
        check("env.txt records the second start", "start 2 (SLURM_RESTART_COUNT=1)" in
              read(os.path.join(folder, "env.txt")), read(os.path.join(folder, "env.txt")))
        # A plain scancel ends the job for good: Slurm sends SIGTERM to the ranks (they save) and to the batch shell,
        # which does not forward it again (the job is no longer RUNNING) and does not requeue a cancelled job
        # (Slurm may also kill the shell before it gets that far).
        before = read(log0)
        cluster.run(["scancel", job_b])
        saved_again = wait_for(lambda: "stopped early by SIGTERM" in read(log0)[len(before):], 60)
        end = wait_for(lambda: finished(job_b), 60)
        time.sleep(3)  # time for a wrong requeue to show
        info = cluster.job(job_b)
        check("a plain scancel: the ranks save and stop", saved_again, read(log0)[len(before):][-800:])
        check("a plain scancel cancels it for good (no further requeue)",
              end == "CANCELLED" and info.get("JobState") == "CANCELLED" and info.get("Restarts") == "1" and
              "requeueing" not in read(batch_log).split("start 2:")[-1], str(info) + read(batch_log))
        print(f"     (took {time.time() - t0:.1f} s)")
    finally:
        cluster.stop()
        shutil.copytree(os.path.join(tmp, "log"), os.path.join(w, "daemon-logs"), dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return check.report("slurm")


if __name__ == "__main__":
    sys.exit(main())
