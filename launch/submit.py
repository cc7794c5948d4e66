#!/usr/bin/env python3
"""Submits nextron-train to Slurm (launch/slurm.sbatch) after checking the request.

    launch/submit.py --config run.conf --nodes 2 --gpus-per-node 4 --time 24:00:00 --partition gpu
    launch/submit.py --cluster-file cluster.conf --config run.conf --nodes 8 -- --train-steps 20000

Arguments after `--` go to nextron-train (they win over the config file). Prints the job id on stdout (a summary
on stderr). Nothing is submitted when anything is wrong: an unknown flag or cluster-file key, a missing config
file or nextron-train, a request that cannot work (more ranks than GPUs on a node).

The cluster file holds this cluster's defaults as "key = value" lines (# comments); flags win over it. Keys: the
long flags below without their dashes: partition, account, gpus-per-node, ranks-per-node, cpus-per-task, time,
nodes, log-dir, train, launch, srun-mpi, and sbatch-arg (one per line, repeatable). For example:

    partition = gpu
    account = my-project
    gpus-per-node = 8
    time = 24:00:00
    sbatch-arg = --exclusive

The job runs with one rank per GPU (--gpus-per-node 0: a CPU job, --ranks-per-node ranks on each node), its logs in
LOG_DIR/JOBNAME-JOBID/ (every rank's output, the command, the environment) next to Slurm's own LOG_DIR/JOBNAME-
JOBID.out. Preemption: SIGTERM 120 s before the time limit (or `scancel --signal=TERM --batch JOBID`) makes the
ranks save and the job requeue itself; it then resumes from the newest checkpoint of --save (launch/slurm.sbatch).
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Cluster-file keys and how to read them. sbatch-arg may repeat; every other key may appear once.
INT_KEYS = {"nodes", "gpus-per-node", "ranks-per-node", "cpus-per-task"}
KEYS = sorted(INT_KEYS | {"time", "partition", "account", "log-dir", "train", "launch", "srun-mpi", "sbatch-arg"})


class UsageError(Exception):
    pass


def read_cluster_file(path):
    """The cluster file's "key = value" lines as a dict (sbatch-arg: a list); errors name the line and the keys."""
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise UsageError(f"--cluster-file '{path}': {e.strerror}")
    values = {"sbatch-arg": []}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise UsageError(f"--cluster-file '{path}' line {n}: '{raw.strip()}' is not 'key = value'")
        key, value = (s.strip() for s in line.split("=", 1))
        key = key.replace("_", "-")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in KEYS:
            raise UsageError(f"--cluster-file '{path}' line {n}: unknown key '{key}'; the keys are: {', '.join(KEYS)}")
        if key == "sbatch-arg":
            values[key].append(value)
        elif key in values:
            raise UsageError(f"--cluster-file '{path}' line {n}: '{key}' is set twice")
        else:
            values[key] = value
    return values


def parser():
    ap = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # No defaults here: None means "not given", so that the cluster file can fill it in.
    ap.add_argument("--config", required=True, help="nextron-train --config-file ('name = value' lines)")
    ap.add_argument("--nodes", type=int, help="nodes (default 1)")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs per node, one rank each; 0: a CPU job (default 0)")
    ap.add_argument("--ranks-per-node", type=int, help="MPI ranks per node (default: --gpus-per-node, or 1)")
    ap.add_argument("--cpus-per-task", type=int, help="cores per rank (OMP_NUM_THREADS; default: Slurm's)")
    ap.add_argument("--time", help="time limit, as sbatch --time (e.g. 24:00:00)")
    ap.add_argument("--partition", help="Slurm partition")
    ap.add_argument("--account", help="Slurm account")
    ap.add_argument("--job-name", help="job name (default: the config file's name without its extension)")
    ap.add_argument("--cluster-file", help="this cluster's defaults, 'key = value' lines (above)")
    ap.add_argument("--log-dir", help="where the job's log folder goes (default: logs)")
    ap.add_argument("--train", help="nextron-train binary (default: $NEXTRON_TRAIN, else build/nextron-train of "
                    "this checkout); on a file system every node sees")
    ap.add_argument("--launch", choices=["srun", "mpirun"], help="how the ranks start inside the job: srun "
                    "(default) or Open MPI's mpirun (for an MPI without Slurm's PMIx support)")
    ap.add_argument("--srun-mpi", help="srun --mpi plugin (default pmix)")
    ap.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                    help="one more sbatch argument (repeatable), e.g. --sbatch-arg=--exclusive")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    return ap


def positive(name, value, zero_ok=False):
    if value is None:
        return None
    try:
        v = int(value)
    except ValueError:
        raise UsageError(f"{name} '{value}': give an integer")
    if v < 0 or (v == 0 and not zero_ok):
        raise UsageError(f"{name} {v}: give a {'non-negative' if zero_ok else 'positive'} integer")
    return v


def build_command(args, extra):
    """The sbatch command line, after every check."""
    cluster = read_cluster_file(args.cluster_file) if args.cluster_file else {"sbatch-arg": []}

    def pick(key):
        flag = getattr(args, key.replace("-", "_"))
        return flag if flag is not None else cluster.get(key)

    config = args.config
    if not os.path.isfile(config):
        raise UsageError(f"--config '{config}': no such file; give the path of a nextron-train config file "
                         "('name = value' lines)")
    config = os.path.abspath(config)
    nodes = positive("--nodes", pick("nodes")) or 1
    gpus = positive("--gpus-per-node", pick("gpus-per-node"), zero_ok=True) or 0
    ranks = positive("--ranks-per-node", pick("ranks-per-node")) or (gpus if gpus > 0 else 1)
    cpus = positive("--cpus-per-task", pick("cpus-per-task"))
    if gpus > 0 and ranks > gpus:
        raise UsageError(f"--ranks-per-node {ranks} is more than --gpus-per-node {gpus}: every rank needs a GPU of "
                         f"its own; use --ranks-per-node {gpus} (the default) or more GPUs per node")
    launch = pick("launch") or "srun"
    if launch not in ("srun", "mpirun"):
        raise UsageError(f"launch '{launch}' (cluster file): use srun or mpirun")
    train = os.path.abspath(pick("train") or os.environ.get("NEXTRON_TRAIN") or
                            os.path.join(REPO, "build", "nextron-train"))
    if not os.access(train, os.X_OK) or os.path.isdir(train):
        raise UsageError(f"nextron-train not found at '{train}': build it (cmake --build build) or give --train PATH")
    log_dir = os.path.abspath(pick("log-dir") or "logs")
    job_name = args.job_name or os.path.splitext(os.path.basename(config))[0]
    if not job_name or any(c in job_name for c in "/ ,%"):
        raise UsageError(f"--job-name '{job_name}': no '/', ' ', ',' or '%' (it names a log folder)")

    env = {"NEXTRON_CONFIG": config, "NEXTRON_TRAIN": train, "NEXTRON_LOG_DIR": log_dir,
           "NEXTRON_DEVICE": "cuda" if gpus > 0 else "cpu", "NEXTRON_LAUNCH": launch, "NEXTRON_LAUNCH_DIR": HERE}
    if pick("srun-mpi"):
        env["NEXTRON_SRUN_MPI"] = pick("srun-mpi")
    for k, v in env.items():
        if "," in v:  # sbatch --export separates variables with commas
            raise UsageError(f"{k} '{v}' holds a ',', which sbatch --export cannot pass: use a path without one")

    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={ranks}",
           f"--output={log_dir}/%x-%j.out"]
    if gpus > 0:
        cmd.append(f"--gpus-per-node={gpus}")
    if cpus:
        cmd.append(f"--cpus-per-task={cpus}")
    for key in ("time", "partition", "account"):
        if pick(key):
            cmd.append(f"--{key}={pick(key)}")
    cmd.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()))
    cmd += cluster["sbatch-arg"] + args.sbatch_arg
    cmd.append(os.path.join(HERE, "slurm.sbatch"))
    return cmd + extra, log_dir, job_name


def main(argv):
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)  # an unknown flag: argparse names it, prints the usage and exits with 2
    try:
        cmd, log_dir, job_name = build_command(args, extra)
    except UsageError as e:
        print(f"launch/submit.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        print("launch/submit.py: error: sbatch not found: run this on a Slurm login node (or --dry-run)",
              file=sys.stderr)
        return 2
    os.makedirs(log_dir, exist_ok=True)  # Slurm does not create the folder of --output
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"launch/submit.py: sbatch failed (status {r.returncode}): {r.stderr.strip()}", file=sys.stderr)
        print(f"  command: {shlex.join(cmd)}", file=sys.stderr)
        return r.returncode
    job_id = r.stdout.strip().split(";")[0]
    print(job_id)
    print(f"launch/submit.py: submitted job {job_id}; logs in {log_dir}/{job_name}-{job_id}/ and "
          f"{log_dir}/{job_name}-{job_id}.out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
