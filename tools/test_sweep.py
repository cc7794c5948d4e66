#!/usr/bin/env python3
"""tools/sweep.py end to end on the tiny model: a small grid at 1 and 2 ranks runs every valid point, records the
invalid ones with the reason (the sweep's arithmetic and the trainer's own message), records a crashed point without
stopping, and writes the CSV and the plots; the CSV's bytes per group equal the closed forms they must.

    python tools/test_sweep.py --train build/nextron-train --work build/sweep_test

Prints "sweep: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import csv
import os
import stat
import subprocess
import sys

from checks import Checks
from train_test_data import REPO, TINY, fresh_byte_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    data = fresh_byte_dataset(args.work)
    check = Checks()
    # A stand-in for nextron-train that crashes on the CP 2 points (a point that dies must not end the sweep).
    flaky = os.path.join(args.work, "flaky-train")
    with open(flaky, "w") as f:
        f.write(f"#!/bin/bash\ncase \" $* \" in *\" --context-parallel-size 2 \"*) echo boom >&2; exit 7;; esac\n"
                f"exec {args.train} \"$@\"\n")
    os.chmod(flaky, os.stat(flaky).st_mode | stat.S_IEXEC)
    out = os.path.join(args.work, "sweep")
    cmd = [sys.executable, os.path.join(REPO, "tools", "sweep.py"), "--train", flaky, "--model-config", TINY,
           "--data", data, "--seq-len", "32", "--global-batch-size", "4", "--steps", "2", "--ranks", "1,2",
           "--grid", "tp=1,2", "cp=1,2", "ep=1,3", "--peak-tflops", "0.05", "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    check("the sweep finishes despite a crashed point", r.returncode == 0, r.stdout[-800:] + r.stderr[-800:])
    check("a progress line per point", r.stdout.count("] strong_n") == 16, r.stdout[-1200:])
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv")))) if os.path.exists(
        os.path.join(out, "sweep.csv")) else []
    by = {row["point"]: row for row in rows}
    check("one CSV row per point", len(rows) == 16, f"{len(rows)} rows")

    def get(point):
        return by.get(point, {"status": "missing", "reason": ""})

    one = get("strong_n1_tp1_pp1_cp1_ep1_mb1_none")
    check("the 1-rank point ran", one["status"] == "ok" and float(one["tokens_per_s"] or 0) > 0, str(one))
    check("... with no communication", all(float(one[f"bytes_{g}"] or 0) == 0 for g in ("tp", "dp_cp", "world")),
          str(one))
    check("... and its peak memory", float(one["peak_tensor_bytes_max"] or 0) > 0, str(one))
    tp2 = get("strong_n2_tp2sp_pp1_cp1_ep1_mb1_none")
    check("TP 2 + SP ran and sent TP bytes", tp2["status"] == "ok" and float(tp2["bytes_tp"] or 0) > 0, str(tp2))
    # The only world call of a step is the gradient norm's all-reduce of one double: ring 2 (p-1)/p x 8 = 8 bytes.
    check("TP 2's world bytes are the gradient norm's (8)", tp2["status"] == "ok" and float(tp2["bytes_world"]) == 8.0,
          str(tp2))
    dp2 = get("strong_n2_tp1_pp1_cp1_ep1_mb1_none")
    check("DP 2 ran, its data-parallel group busy and no TP group", dp2["status"] == "ok" and
          float(dp2["bytes_dp_cp"] or 0) > 0 and float(dp2["bytes_tp"] or 0) == 0, str(dp2))
    check("the time split adds up within the step",
          dp2["status"] == "ok" and float(dp2["compute_s"]) + float(dp2["optimizer_s"]) <= float(dp2["step_s"]) * 1.0001,
          str(dp2))
    bad_ranks = get("strong_n1_tp2sp_pp1_cp1_ep1_mb1_none")
    check("a layout needing more ranks is invalid with the reason", bad_ranks["status"] == "invalid" and
          "not divisible by TP x CP x PP" in bad_ranks["reason"], str(bad_ranks))
    bad_ep = get("strong_n1_tp1_pp1_cp1_ep3_mb1_none")
    check("the trainer's refusal is the reason (EP 3)", bad_ep["status"] == "invalid" and "3" in bad_ep["reason"] and
          bad_ep["reason"] != "", str(bad_ep))
    crashed = get("strong_n2_tp1_pp1_cp2_ep1_mb1_none")
    check("a crashed point is recorded as failed", crashed["status"] == "failed" and "boom" in crashed["reason"],
          str(crashed))
    for png in ("strong_scaling.png", "memory_and_time.png"):
        p = os.path.join(out, png)
        check(f"{png} written", os.path.exists(p) and os.path.getsize(p) > 10000, p)
    # --collect rebuilds the same CSV from the points' files.
    first = open(os.path.join(out, "sweep.csv")).read() if rows else ""
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "sweep.py"), "--collect", out],
                       capture_output=True, text=True, timeout=300)
    check("--collect rebuilds the CSV", r.returncode == 0 and open(os.path.join(out, "sweep.csv")).read() == first,
          r.stderr[-400:])
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "sweep.py"), "--train", args.train,
                        "--model-config", TINY, "--data", data, "--grid", "tpp=2", "--out", out],
                       capture_output=True, text=True, timeout=60)
    check("an unknown grid key is refused naming the keys", r.returncode != 0 and "tp, pp, vpp" in r.stderr,
          r.stderr[-300:])
    return check.report("sweep")


if __name__ == "__main__":
    sys.exit(main())
