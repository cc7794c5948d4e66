#!/usr/bin/env python3
"""nextron-train's handling of faults and bad output paths, as real processes: the --save lock (a second run on one
directory refused, a killed holder's lock taken over), --resume none into a used directory refused and
--overwrite-save, a checkpoint whose name and manifest disagree, unusable output paths refused before step 1,
leftovers of dead processes removed at start-up (a live process's kept), divergence messages, and the exit status
of a run stopped by SIGTERM.

    python tools/test_train_faults.py --train build/nextron-train --work build/train_faults

Prints "train_faults: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from checks import Checks
from train_test_data import TINY, fresh_byte_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = os.path.abspath(args.work)
    data = fresh_byte_dataset(w)
    # --peak-tflops skips the start-up GEMM measurement: each short run takes a second or two.
    base = ["--model-config", TINY, "--data", data, "--seq-len", "32", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--no-progress", "--threads", "1", "--peak-tflops", "1"]
    check = Checks()

    def with_lr(extra):
        return base + extra + ([] if "--lr" in extra else ["--lr", "1e-3"])

    def run(extra, timeout=300):
        return subprocess.run([args.train] + with_lr(extra), capture_output=True, text=True, timeout=timeout)

    def start(extra):
        return subprocess.Popen([args.train] + with_lr(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


    def wait_for(cond, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return True
            time.sleep(0.05)
        return False

    def lock_holder(save):
        try:
            return open(os.path.join(save, ".lock")).read()
        except OSError:
            return ""

    def train_steps(metrics):
        if not os.path.exists(metrics):
            return []
        return [r["step"] for r in map(json.loads, open(metrics)) if r.get("kind") == "train"]

    def wait_for_line(proc, needle, timeout=120):
        """Reads proc's stdout until a line contains needle; returns everything read (a timer kills a stuck run)."""
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        seen = ""
        try:
            for line in proc.stdout:
                seen += line
                if needle in line:
                    break
        finally:
            timer.cancel()
        return seen

    # 1. The --save lock. A holds it while training; B on the same directory is refused naming it and A's pid, and
    # A finishes unaffected with every step logged once.
    s1 = os.path.join(w, "locked")
    a = start(["--train-steps", "40", "--save", s1, "--save-interval", "10"])
    held = wait_for(lambda: f"pid {a.pid} " in lock_holder(s1) or a.poll() is not None)
    holder = lock_holder(s1)
    b = run(["--train-steps", "2", "--save", s1])
    out_a, err_a = a.communicate(timeout=600)
    check("lock file names its holder", held and holder.startswith(f"pid {a.pid} on host "), repr(holder))
    check("second run on one --save refused", b.returncode == 1 and "is in use by another nextron-train run" in b.stderr
          and s1 in b.stderr and f"pid {a.pid}" in b.stderr, f"held {held}, rc {b.returncode}: {b.stderr[-600:]}")
    check("second run trained nothing", "step 1/2" not in b.stdout, b.stdout[-300:])
    check("first run unaffected", a.returncode == 0 and train_steps(os.path.join(s1, "metrics.jsonl")) ==
          list(range(1, 41)) and "step_00000040" in os.listdir(s1), f"rc {a.returncode}: {err_a[-600:]}")
    check("a clean exit releases the lock", os.path.exists(os.path.join(s1, ".lock")) and lock_holder(s1) == "",
          repr(lock_holder(s1)))

    # A killed holder's lock is taken over (the kernel drops a dead process's flock).
    s2 = os.path.join(w, "stale")
    c = start(["--train-steps", "400", "--save", s2])
    held = wait_for(lambda: f"pid {c.pid} " in lock_holder(s2) or c.poll() is not None)
    c.kill()
    c.communicate()
    d = run(["--train-steps", "2", "--save", s2])
    check("stale lock of a killed run taken over", held and d.returncode == 0 and "took over the lock" in d.stdout and
          f"pid {c.pid}" in d.stdout and "step 2/2" in d.stdout, f"held {held}: {d.stdout[-400:]} {d.stderr[-400:]}")

    # 2. --resume none into a directory holding checkpoints: refused naming the fixes; --overwrite-save starts over.
    before = train_steps(os.path.join(s2, "metrics.jsonl"))
    r = run(["--train-steps", "2", "--save", s2, "--resume", "none"])
    check("--resume none into a used --save refused", r.returncode == 1 and "--resume none" in r.stderr and
          "step_00000002" in r.stderr and "--overwrite-save" in r.stderr and "new --save" in r.stderr and
          train_steps(os.path.join(s2, "metrics.jsonl")) == before, r.stderr[-600:])
    r = run(["--train-steps", "3", "--save", s2, "--resume", "none", "--overwrite-save"])
    check("--overwrite-save starts over", r.returncode == 0 and "removed checkpoint" in r.stdout and
          "step 1/3" in r.stdout and "continuing" not in r.stdout and
          train_steps(os.path.join(s2, "metrics.jsonl")) == [1, 2, 3] and
          sorted(x for x in os.listdir(s2) if x.startswith("step_")) == ["step_00000003"],
          r.stdout[-600:] + r.stderr[-400:])
    # A checkpoint directory whose name disagrees with its manifest's step is an error naming both.
    shutil.copytree(os.path.join(s2, "step_00000003"), os.path.join(s2, "step_00000009"))
    r = run(["--train-steps", "12", "--save", s2])
    check("name/manifest step mismatch refused", r.returncode == 1 and "named for step 9" in r.stderr and
          "says step 3" in r.stderr, r.stderr[-600:])
    shutil.rmtree(os.path.join(s2, "step_00000009"))

    # 3. Unusable output paths are refused at start-up, before any step (no step line, no metrics, no --save).
    full = os.path.join(w, "full_export")
    os.makedirs(full)
    open(os.path.join(full, "keep.txt"), "w").write("x")
    a_file = os.path.join(w, "a_file")
    open(a_file, "w").write("x")
    s3 = os.path.join(w, "unused")
    for name, extra, needles in [
            ("--export-hf non-empty", ["--export-hf", full], [full, "not empty", "new directory"]),
            ("--export-hf a file", ["--export-hf", a_file], [a_file, "existing file"]),
            ("--export-hf under a file", ["--export-hf", os.path.join(a_file, "hf")], [a_file, "not a directory"]),
            ("--export-hf unwritable parent", ["--export-hf", "/proc/nextron_test_hf"],
             ["/proc/nextron_test_hf", "not writable"]),
            ("--export-hf is the --save directory", ["--export-hf", s3], [s3, "--save directory"]),
            ("--save a file", ["--save", a_file], [a_file, "not a directory"]),
            ("--metrics a directory", ["--metrics", full], [full, "is a directory"])]:
        save = [] if "--save" in extra else ["--save", s3]
        r = run(["--train-steps", "2"] + save + extra)
        check(f"{name} refused before step 1", r.returncode == 1 and all(n in r.stderr for n in needles) and
              "step 1/" not in r.stdout and not os.path.exists(s3), f"rc {r.returncode}: {r.stderr[-500:]}")

    # 4. Leftovers: a dead process's .tmp/.del directories and an export's .partial are removed and logged with their
    # sizes; a live process's .tmp is kept.
    s4 = os.path.join(w, "leftovers")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "300"])
    stale = [os.path.join(s4, f"step_00000005.tmp-{dead.pid}"), os.path.join(s4, f"step_00000003.del-{dead.pid}")]
    kept = os.path.join(s4, f"step_00000007.tmp-{live.pid}")
    export = os.path.join(w, "hf_leftovers")
    for path in stale + [kept, export + ".partial"]:
        os.makedirs(path)
        open(os.path.join(path, "shard_00000.bin"), "wb").write(b"\0" * 20000)
    r = run(["--train-steps", "1", "--save", s4, "--export-hf", export])
    live.kill()
    live.wait()
    check("run with leftovers succeeds", r.returncode == 0, r.stderr[-600:])
    for path in stale + [export + ".partial"]:
        logged = [line for line in r.stdout.splitlines() if f"removed '{path}'" in line]
        check(f"removed and logged {os.path.basename(path)}", not os.path.exists(path) and len(logged) == 1 and
              "19.5 KiB" in logged[0], r.stdout[-800:])
    check("a live process's leftover kept", os.path.isdir(kept) and f"kept '{kept}'" in r.stdout, r.stdout[-800:])
    check("export written after cleaning its .partial", os.path.exists(os.path.join(export, "config.json")))

    # 5. Divergence (--lr 10: step 2's gradient norm is ~4e38, then the loss or the norm is not finite): the failing
    # step is the one after the last logged step, large numbers are short, and clipping is suggested only when off.
    for clip, advise in (("1.0", False), ("0", True)):
        s = os.path.join(w, f"diverge_clip{clip}")
        r = run(["--train-steps", "30", "--lr", "10", "--lr-warmup-steps", "0", "--clip-grad", clip, "--save", s])
        logged = [int(m) for m in re.findall(r"^step (\d+)/30", r.stdout, re.M)]
        m = re.search(r"(loss|gradient norm) is (\S+) at step (\d+)", r.stderr)
        check(f"divergence reported (clip {clip})", r.returncode == 1 and m is not None and "diverged" in r.stderr,
              r.stderr[-500:])
        if m:
            check(f"divergence step number (clip {clip})", int(m.group(3)) == (logged[-1] if logged else 0) + 1,
                  f"logged {logged}, message: {m.group(0)}")
        # Where the run blows up (a huge finite norm logged, or inf at once) depends on float rounding; whatever it
        # logs, no number is a long digit string and every logged norm >= 1e5 is in scientific notation (the
        # formatting itself: Metrics.LargeValuesPrintInScientificNotation).
        norms = re.findall(r"^step \d+/30 .*\| gnorm (\S+) \|", r.stdout, re.M)
        check(f"large numbers in scientific notation (clip {clip})",
              re.search(r"\d{12,}", r.stdout + r.stderr) is None and
              all(re.fullmatch(r"\d\.\d{3}e\+\d\d", g) for g in norms if float(g) >= 1e5),
              (r.stdout + r.stderr)[-600:])
        check(f"--clip-grad advice only when off (clip {clip})",
              ("enable --clip-grad" in r.stderr) == advise and "lower --lr" in r.stderr, r.stderr[-400:])

    # 6. SIGTERM: the run saves, skips the export with a message and exits 3; rerunning finishes and exports.
    s5, e5 = os.path.join(w, "stopped"), os.path.join(w, "hf_stopped")
    p = start(["--train-steps", "400", "--save", s5, "--export-hf", e5])
    seen = wait_for_line(p, "step 2/400")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    out = seen + out
    saved = sorted(x for x in os.listdir(s5) if x.startswith("step_")) if os.path.isdir(s5) else []
    check("SIGTERM exits with status 3", p.returncode == 3, f"rc {p.returncode}: {err[-400:]}")
    check("SIGTERM logs the early stop and the skipped export", "stopped early by SIGTERM" in out and
          f"--export-hf {e5} skipped" in out and not os.path.exists(e5) and len(saved) == 1, out[-500:])
    if saved:
        step = int(saved[0][5:])
        r = run(["--train-steps", str(step + 1), "--save", s5, "--export-hf", e5])
        check("the rerun finishes and exports", r.returncode == 0 and f"continuing at step {step}" in r.stdout and
              os.path.exists(os.path.join(e5, "config.json")), r.stdout[-400:] + r.stderr[-400:])

        # 7. Options that a run cannot honour are named in the log.
        r = run(["--train-steps", str(step + 1), "--save", s5, "--sequence-parallel"])
        check("--sequence-parallel at TP 1 noted", r.returncode == 0 and
              "--sequence-parallel has no effect at tensor-parallel size 1" in r.stdout, r.stdout[-400:])
        r = subprocess.run([args.train, "--init-from", e5] + base[2:] + ["--train-steps", str(step + 1), "--save", s5],
                           capture_output=True, text=True, timeout=300)
        check("--init-from ignored when resuming noted", r.returncode == 0 and
              f"--init-from {e5} is ignored: resuming from" in r.stdout, r.stdout[-400:] + r.stderr[-400:])

    # 8. --seq-len beyond the model's positions is noted; a config file naming another config file is refused.
    cfg = json.load(open(TINY))
    short = os.path.join(w, "short_positions.json")
    json.dump({**cfg, "max_position_embeddings": 16}, open(short, "w"))
    r = subprocess.run([args.train] + [short if a == TINY else a for a in with_lr(["--train-steps", "1"])],
                       capture_output=True, text=True, timeout=300)
    check("--seq-len above max_position_embeddings noted", r.returncode == 0 and
          "--seq-len 32 exceeds the model's max_position_embeddings (16)" in r.stdout, r.stdout[-400:] + r.stderr[-400:])
    inner = os.path.join(w, "inner.cfg")
    outer = os.path.join(w, "outer.cfg")
    open(inner, "w").write("train-steps = 1\n")
    open(outer, "w").write(f"config-file = {inner}\n")
    r = run(["--train-steps", "1", "--config-file", outer])
    check("a config file naming another config file is refused", r.returncode == 1 and
          "config files do not nest" in r.stderr, r.stderr[-400:])

    h = subprocess.run([args.train, "--help"], capture_output=True, text=True)
    check("--help documents --overwrite-save and the exit status", h.returncode == 0 and "--overwrite-save" in h.stdout
          and "Exit status" in h.stdout and "3 stopped early" in h.stdout, h.stdout[-400:])

    return check.report("train_faults")


if __name__ == "__main__":
    sys.exit(main())
