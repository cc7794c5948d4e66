#!/usr/bin/env python3
"""Sharded checkpoints under kill -9, as real processes: a 4-rank TP 2 x DP 2 nextron-train job saving every step
(each stage of every rank's save slowed down by NEXTRON_FAULT_SAVE_STAGE_DELAY_S, so kills land inside saves: while
shards, metadata, state or manifest are written, or before the rename) is killed with SIGKILL (every process of
mpirun's group at once) at random moments, again and again, each time restarting with --resume auto; every other run
saves in the background (--async-save). Checked:

1. after every kill, every step_<N> directory is a complete checkpoint: nextron-convert reads all of it (verifying
   every file's checksum) without error; unfinished saves exist only as step_<N>.tmp-<pid>;
2. every restart resumes from the newest complete checkpoint (or starts afresh when none exists yet);
3. the job, finally left to finish, logs for every step the loss of an uninterrupted run bit for bit (resuming at
   the same layout is exact, so however often it was killed, the training is the same).

    python tools/test_checkpoint_kill.py --train build/nextron-train --convert build/nextron-convert \\
        --mpiexec mpiexec --work build/checkpoint_kill

Prints "checkpoint_kill: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import time

from checks import Checks
from train_test_data import TINY, fresh_byte_dataset

KILLS = 8
STEPS = 12
STAGE_DELAY_S = 0.15


def session_pids(sid):
    """The processes of session `sid` (mpirun started as a session leader, its ranks, their helpers)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def kill_session(sid, timeout=30):
    """SIGKILL to every process of the session at once (Open MPI moves the ranks to process groups of their own, so
    killing mpirun's group would leave them running), until none is left: a machine losing power, for this job."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = session_pids(sid)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--convert", required=True)
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--work", required=True)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    w = os.path.abspath(args.work)
    data = fresh_byte_dataset(w)
    rng = random.Random(args.seed)
    train = [args.train, "--model-config", TINY, "--data", data, "--seq-len", "32", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--lr", "1e-3",
             "--lr-warmup-steps", "2", "--lr-decay-steps", str(STEPS), "--train-steps", str(STEPS),
             "--no-progress", "--threads", "1", "--peak-tflops", "1", "--valid-fraction", "0", "--keep-last", "3"]
    mpi = [args.mpiexec, "--allow-run-as-root", "--oversubscribe", "-np", "4"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    check = Checks()

    def losses(path):
        out = {}
        if os.path.exists(path):
            for line in open(path):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short
                    continue
                if r.get("kind") == "train":
                    out.setdefault(r["step"], []).append(r["loss"])
        return out

    # The uninterrupted run (no delays: they do not change the numbers).
    ref = os.path.join(w, "ref")
    r = subprocess.run(mpi + train + ["--save", ref, "--save-interval", "100"], capture_output=True, text=True,
                       env=env, timeout=600)
    check("the uninterrupted run", r.returncode == 0, r.stderr[-800:])
    want = {s: v[0] for s, v in losses(os.path.join(ref, "metrics.jsonl")).items()}

    save = os.path.join(w, "killed")
    slow = dict(env, NEXTRON_FAULT_SAVE_STAGE_DELAY_S=str(STAGE_DELAY_S))
    complete_after_kill, resumed_newest, restarts, inside_save = True, True, 0, 0
    problems = []
    newest_before = None
    for k in range(KILLS):
        # Every other run saves in the background (--async-save): the same atomicity is expected.
        extra = ["--async-save"] if k % 2 else []
        p = subprocess.Popen(mpi + train + extra + ["--save", save, "--save-interval", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=slow, start_new_session=True)
        time.sleep(rng.uniform(1.5, 4.0))
        if not kill_session(p.pid):
            problems.append(f"kill {k}: processes of the job survived SIGKILL")
        out = p.communicate()[0]
        restarts += 1
        # 2. It resumed from the newest complete checkpoint the previous kill left (or started afresh).
        if newest_before is not None and f"continuing at step {int(newest_before[5:])}" not in out:
            resumed_newest = False
            problems.append(f"kill {k}: expected a resume from {newest_before}: {out[-300:]}")
        # 1. Every step_<N> left is complete.
        dirs = sorted(d for d in os.listdir(save) if d.startswith("step_")) if os.path.isdir(save) else []
        finals = [d for d in dirs if d.count(".") == 0]
        inside_save += any(".tmp-" in d for d in dirs)
        for d in finals:
            hf = os.path.join(w, "hf_probe")
            shutil.rmtree(hf, ignore_errors=True)
            c = subprocess.run([args.convert, "--in", os.path.join(save, d), "--out", hf], capture_output=True,
                               text=True, env=env, timeout=300)
            if c.returncode != 0:
                complete_after_kill = False
                problems.append(f"kill {k}: {d} does not read back: {c.stderr[-300:]}")
        newest_before = finals[-1] if finals else None
    check(f"after {KILLS} kills at random moments every step_<N> left reads back completely", complete_after_kill,
          "\n".join(problems))
    check("every restart resumed from the newest complete checkpoint", resumed_newest, "\n".join(problems))
    # Saves take most of each step here (5 stages x the delay), so kills at random moments land inside them.
    check(f"kills landed inside saves ({inside_save} of {KILLS} left an unfinished step_<N>.tmp-*)", inside_save >= 1)

    # 3. Left to finish: every step's loss equals the uninterrupted run's, bit for bit.
    r = subprocess.run(mpi + train + ["--save", save, "--save-interval", "1"], capture_output=True, text=True,
                       env=env, timeout=600)
    got = losses(os.path.join(save, "metrics.jsonl"))
    same = r.returncode == 0 and sorted(want) == list(range(1, STEPS + 1)) and all(
        s in got and all(v == want[s] for v in got[s]) for s in want)
    check(f"the killed and resumed job logs the uninterrupted run's {STEPS} losses bit for bit", same,
          f"{r.stderr[-600:]}\n{got}\nvs {want}")
    print(f"checkpoint_kill: {restarts} kills", flush=True)
    raise SystemExit(check.report("checkpoint_kill"))


if __name__ == "__main__":
    main()
