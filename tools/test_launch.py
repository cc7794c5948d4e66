#!/usr/bin/env python3
"""launch/mpirun.sh end to end: a 4-rank tiny training job on two "nodes" of 2 ranks each, its per-job log folder,
a SIGTERM that saves; and bad input (more ranks than the hostfile's slots, a missing config, an unknown flag) refused
before any rank starts. Also launch/submit.py's sbatch command and its refusals, with a stand-in sbatch.

The two nodes are this machine twice. Open MPI counts `localhost` and `127.0.0.1` (and this host's name) as the same
node (a hostfile naming two of them is refused: "multiple definitions of the slot count"), but 127.0.0.2, also
loopback yet none of this machine's interface addresses, is a second node to it: mpirun starts that node's daemon
through its ssh agent (plm_rsh_agent), here a stand-in for ssh that runs the command on this machine. Shared memory
is off (btl self,tcp): both "nodes" would name their segments after the same host name, and real nodes talk TCP.

    python tools/test_launch.py --train build/nextron-train --work build/launch_test

Prints "launch: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

from checks import Checks
from train_test_data import REPO, TINY, fresh_byte_dataset

LAUNCH = os.path.join(REPO, "launch", "mpirun.sh")
SUBMIT = os.path.join(REPO, "launch", "submit.py")

FAKE_SSH = """#!/bin/sh
# ssh stand-in for mpirun's plm_rsh_agent: drops ssh options and the host name and runs the command here.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
echo "$1" >> "$0.log"
shift
exec /bin/sh -c "$*"
"""

# A nextron-train stand-in for the bad-input cases: it leaves a mark if anything ever starts it.
STUB_TRAIN = """#!/bin/sh
echo started >> "{mark}"
"""


def write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = os.path.abspath(args.work)
    data = fresh_byte_dataset(w)
    check = Checks()

    fake_ssh = write(os.path.join(w, "fake-ssh"), FAKE_SSH, 0o755)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OMPI_MCA_plm_rsh_agent=fake_ssh, OMPI_MCA_btl="self,tcp", NEXTRON_TRAIN=os.path.abspath(args.train))
    hostfile = write(os.path.join(w, "hosts"), "# two nodes, both this machine (see the top of test_launch.py)\n"
                     "localhost slots=2\n127.0.0.2 slots=2\n")
    save = os.path.join(w, "save")

    def config(name, steps, extra=""):
        return write(os.path.join(w, name + ".conf"),
                     f"# tiny model, 4 ranks x micro-batch 1\nmodel-config = {TINY}\ndata = {data}\nseq-len = 32\n"
                     f"micro-batch-size = 1\nglobal-batch-size = 4\ntrain-steps = {steps}\nthreads = 1\n"
                     f"no-progress = true\nlr = 1e-3\nsave = {save}\n{extra}")

    def launch(argv, **kw):
        return subprocess.run(["bash", LAUNCH] + argv, capture_output=True, text=True, timeout=240, env=env, cwd=w,
                              **kw)

    conf = config("tiny", 4)
    logs = os.path.join(w, "logs")

    # 1. --dry-run prints the mpirun command and creates nothing.
    r = launch(["--hostfile", hostfile, "--ranks-per-node", "2", "--config", conf, "--log-dir", logs, "--dry-run"])
    out = r.stdout
    check("--dry-run prints the mpirun command: 4 ranks, 2 per node on both hosts, the config file",
          r.returncode == 0 and "nextron-mpirun -np 4 --host localhost:2,127.0.0.2:2 --map-by ppr:2:node "
          "--bind-to none" in out and f"--config-file {conf}" in out and "-x NCCL_DEBUG" in out and
          "-x OMP_NUM_THREADS" in out, out + r.stderr)
    check("--dry-run creates no log folder", not os.path.exists(logs))

    # 2. The job: 2 nodes x 2 ranks, 4 steps.
    t0 = time.time()
    r = launch(["--hostfile", hostfile, "--ranks-per-node", "2", "--config", conf, "--log-dir", logs,
                "--job-name", "tiny2x2"])
    check("a 2-node x 2-rank job trains (status 0)", r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:])
    print(f"     (job took {time.time() - t0:.1f} s)")
    hosts_started = open(fake_ssh + ".log").read().split() if os.path.exists(fake_ssh + ".log") else []
    check("mpirun took 127.0.0.2 for a second node (started its daemon through the ssh agent)",
          hosts_started == ["127.0.0.2"], str(hosts_started))
    jobs = glob.glob(os.path.join(logs, "tiny2x2-*"))
    job = jobs[0] if len(jobs) == 1 else ""
    check("one log folder logs/tiny2x2-<timestamp>/", len(jobs) == 1, str(jobs))
    files = lambda *p: os.path.join(job, *p)  # noqa: E731
    cmd = open(files("command.txt")).read() if os.path.exists(files("command.txt")) else ""
    check("command.txt holds the mpirun command", "--map-by ppr:2:node" in cmd and "-np 4" in cmd, cmd)
    envtxt = open(files("env.txt")).read() if os.path.exists(files("env.txt")) else ""
    check("env.txt names the nodes, ranks and forwarded variables", "nodes:            2 (localhost 127.0.0.2)" in
          envtxt and "ranks per node:   2 (4 ranks)" in envtxt and "NCCL_DEBUG=WARN" in envtxt, envtxt)
    check("the config file is copied into the folder", os.path.exists(files("tiny.conf")))
    outs = {rank: files("ranks", "1", f"rank.{rank}", "stdout") for rank in range(4)}
    check("every rank has its output file", all(os.path.exists(p) for p in outs.values()),
          str(sorted(glob.glob(files("ranks", "*", "*")))))
    rank0 = open(outs[0]).read() if os.path.exists(outs[0]) else ""
    check("rank 0's output is the training log (4 of 4 steps, saved)",
          "step 4/4" in rank0 and f"saved {save}/step_00000004" in rank0 and "world 4" in rank0, rank0[-800:])
    others = "".join(open(p).read() for rank, p in outs.items() if rank and os.path.exists(p))
    check("only rank 0 logs steps", "step 1/4" not in others, others[-400:])
    metrics = os.path.join(save, "metrics.jsonl")
    steps = [json.loads(x)["step"] for x in open(metrics) if '"train"' in x] if os.path.exists(metrics) else []
    check("metrics.jsonl holds steps 1-4 and the checkpoint exists",
          steps == [1, 2, 3, 4] and os.path.isdir(os.path.join(save, "step_00000004")), str(steps))

    # 3. SIGTERM to launch/mpirun.sh (it became nextron-mpirun): every rank saves and the job exits 3; a rerun of the
    # same command continues from that checkpoint.
    long_conf = config("long", 2000, "save-interval = 1000\n")
    p = subprocess.Popen(["bash", LAUNCH, "--hostfile", hostfile, "--ranks-per-node", "2", "--config", long_conf,
                          "--log-dir", logs, "--job-name", "long"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, cwd=w)
    seen = ""
    deadline = time.time() + 120
    while time.time() < deadline and "step 6/2000" not in seen:  # past step 4: the previous run's checkpoint
        line = p.stdout.readline()
        if not line:
            break
        seen += line
    p.send_signal(signal.SIGTERM)
    try:
        rest, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        rest, _ = p.communicate()
    seen += rest
    saved = [line.split("/step_")[-1] for line in seen.splitlines() if line.startswith("saved ")]
    check("SIGTERM: the job saves and exits with status 3", p.returncode == 3 and len(saved) == 1 and
          "continuing at step 4" in seen, f"status {p.returncode}; {seen[-1200:]}")

    # 4. Bad input: refused with the fix named, before anything starts (the stub nextron-train would leave a mark, no
    # log folder appears).
    mark = os.path.join(w, "stub-started")
    stub = write(os.path.join(w, "stub-train"), STUB_TRAIN.format(mark=mark), 0o755)
    bad_logs = os.path.join(w, "bad-logs")
    base = ["--train", stub, "--log-dir", bad_logs]
    cases = [
        ("more ranks than the hostfile's slots", ["--hostfile", hostfile, "--ranks-per-node", "3", "--config", conf],
         ["4 slot(s) in all", "--ranks-per-node 3 = 6", "slots=3"]),
        ("more nodes than the hostfile's hosts", ["--hostfile", hostfile, "--nodes", "3", "--config", conf],
         ["fewer than --nodes 3", "add hosts or lower --nodes"]),
        ("a missing config file", ["--hostfile", hostfile, "--config", os.path.join(w, "nope.conf")],
         ["--config", "nope.conf", "no such readable file"]),
        ("no --config", ["--hostfile", hostfile], ["--config FILE is required"]),
        ("an unknown flag", ["--config", conf, "--ranks-per-nodes", "2"],
         ["unknown argument '--ranks-per-nodes'", "after '--'", "--help"]),
        ("a missing hostfile", ["--hostfile", os.path.join(w, "nohosts"), "--config", conf], ["nohosts"]),
        ("a bad --ranks-per-node", ["--config", conf, "--ranks-per-node", "0"], ["positive integer"]),
    ]
    for name, argv, words in cases:
        r = launch(base + argv)
        ok = r.returncode == 2 and all(wd in r.stderr for wd in words) and not os.path.exists(mark) and \
            not os.path.exists(bad_logs)
        check(f"refused before any rank starts: {name}", ok, f"status {r.returncode}: {r.stderr.strip()}")
    r = launch(["--help"])
    check("--help documents the options", r.returncode == 0 and all(
        o in r.stdout for o in ("--hostfile", "--ranks-per-node", "--nodes", "--config", "--log-dir", "--job-name",
                                "--device", "--dry-run")), r.stdout[:400])

    # 5. launch/submit.py without a cluster: the sbatch command it builds (a stand-in sbatch records its arguments
    # and answers a job id), and bad input refused before sbatch runs. tools/test_slurm.py submits for real.
    bin_dir = os.path.join(w, "bin")
    os.makedirs(bin_dir)
    sbatch_args = os.path.join(w, "sbatch-args")
    write(os.path.join(bin_dir, "sbatch"), f'#!/bin/sh\nprintf "%s\\n" "$@" > "{sbatch_args}"\necho "4242;cl"\n', 0o755)
    senv = dict(env, PATH=bin_dir + os.pathsep + env["PATH"])
    cluster = write(os.path.join(w, "cluster.conf"), "# defaults\npartition = gpu\naccount = proj\n"
                    "gpus-per-node = 4\ntime = 01:00:00\nsbatch-arg = --exclusive\n")

    def submit(argv):
        return subprocess.run([sys.executable, SUBMIT] + argv, capture_output=True, text=True, timeout=60, env=senv,
                              cwd=w)

    r = submit(["--cluster-file", cluster, "--config", conf, "--nodes", "2", "--time", "00:30:00", "--job-name", "j",
                "--log-dir", logs, "--", "--train-steps", "7"])
    got = open(sbatch_args).read().split("\n") if os.path.exists(sbatch_args) else []
    want = ["--parsable", "--job-name=j", "--nodes=2", "--ntasks-per-node=4", f"--output={logs}/%x-%j.out",
            "--gpus-per-node=4", "--time=00:30:00", "--partition=gpu", "--account=proj", "--exclusive",
            os.path.join(REPO, "launch", "slurm.sbatch"), "--train-steps", "7"]
    export = [a for a in got if a.startswith("--export=")]
    check("submit.py: sbatch gets the request (flags over the cluster file), prints the job id",
          r.returncode == 0 and r.stdout.strip() == "4242" and all(a in got for a in want) and len(export) == 1 and
          all(f"{k}={v}" in export[0] for k, v in (("NEXTRON_CONFIG", conf), ("NEXTRON_DEVICE", "cuda"),
                                                   ("NEXTRON_TRAIN", env["NEXTRON_TRAIN"]))) and
          export[0].startswith("--export=ALL,"), f"{r.stdout} {r.stderr} {got}")
    os.remove(sbatch_args)
    r = submit(["--config", conf, "--ranks-per-node", "2", "--dry-run"])
    check("submit.py --dry-run prints the sbatch command of a CPU job and runs nothing", r.returncode == 0 and
          r.stdout.startswith("sbatch ") and "--ntasks-per-node=2" in r.stdout and "--gpus-per-node" not in r.stdout
          and "NEXTRON_DEVICE=cpu" in r.stdout and not os.path.exists(sbatch_args), r.stdout + r.stderr)
    bad_cluster = write(os.path.join(w, "bad-cluster.conf"), "partition = gpu\ngpus = 4\n")
    for name, argv, words in [
        ("an unknown flag", ["--config", conf, "--gpus", "4"], ["unrecognized arguments: --gpus", "--gpus-per-node"]),
        ("an unknown cluster-file key", ["--config", conf, "--cluster-file", bad_cluster],
         ["line 2: unknown key 'gpus'", "gpus-per-node", "partition"]),
        ("a missing config file", ["--config", os.path.join(w, "nope.conf")], ["nope.conf", "no such file"]),
        ("more ranks than GPUs", ["--config", conf, "--gpus-per-node", "2", "--ranks-per-node", "4"],
         ["every rank needs a GPU", "--ranks-per-node 2"]),
    ]:
        r = submit(argv)
        check(f"submit.py refuses {name} before calling sbatch", r.returncode == 2 and
              all(wd in r.stderr for wd in words) and not os.path.exists(sbatch_args), f"{r.returncode}: {r.stderr}")
    return check.report("launch")


if __name__ == "__main__":
    sys.exit(main())
