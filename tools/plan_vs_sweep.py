#!/usr/bin/env python3
"""The planner's step time (and memory) against a committed sweep (tools/sweep.py's CSV), point by point.

For every point that ran: nextron-plan --layout ... on the sweep's rank count, sequence length, global batch,
micro-batch and recomputation, on a cluster file (default configs/clusters/cpu-dev.json, the machine the committed
sweep ran on), gives the predicted step time and the largest rank's memory; the CSV has the measured ones
(step_s: the mean over the timed steps; peak_tensor_bytes_max). Prints a Markdown table with the ratios and their
geometric mean per rank count.

  tools/plan_vs_sweep.py --build build --csv docs/scaling/sweep.csv --seq-len 128 > docs/scaling/plan_vs_sweep.md
"""
import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layout_of(row):
    items = [f"TP{row['tp']}", f"PP{row['pp']}", f"VPP{row['vpp']}", f"CP{row['cp']}", f"EP{row['ep']}"]
    if row["sp"] == "True":
        items.append("SP")
    return ",".join(items)


def describe(row):
    parts = []
    for key, name in (("tp", "TP"), ("pp", "PP"), ("vpp", "VPP"), ("cp", "CP"), ("ep", "EP"), ("dp", "DP")):
        if int(row[key]) > 1:
            parts.append(f"{name}{row[key]}")
    if row["sp"] == "True":
        parts.append("SP")
    if row["recompute"] not in ("none", ""):
        parts.append(row["recompute"])
    return " ".join(parts) or "one rank"


def plan(args, row, out):
    subprocess.run([os.path.join(args.build, "nextron-plan"), "--model-config", args.model_config, "--cluster",
                    args.cluster, "--gpus", row["ranks"], "--seq-len", str(args.seq_len), "--global-batch-size",
                    row["global_batch"], "--micro-batch", row["mb"], "--layout", layout_of(row), "--recompute",
                    row["recompute"] or "none", "--csv", out], check=True, capture_output=True, text=True)
    return next(csv.DictReader(open(out)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--csv", default=os.path.join(REPO, "docs/scaling/sweep.csv"))
    ap.add_argument("--model-config", default=os.path.join(REPO, "configs/models/qwen3-next-tiny.json"))
    ap.add_argument("--cluster", default=os.path.join(REPO, "configs/clusters/cpu-dev.json"))
    ap.add_argument("--seq-len", type=int, default=128, help="the sweep's --seq-len (not in its CSV)")
    args = ap.parse_args()
    rows = [r for r in csv.DictReader(open(args.csv)) if r["status"] == "ok"]
    print("| ranks | mode | layout | predicted step s | measured step s | predicted / measured | "
          "predicted MiB | measured MiB | predicted / measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_ranks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            p = plan(args, r, os.path.join(tmp, "plan.csv"))
            t_ratio = float(p["step_s"]) / float(r["step_s"])
            m_ratio = float(p["total_bytes"]) / float(r["peak_tensor_bytes_max"])
            by_ranks.setdefault(int(r["ranks"]), []).append((t_ratio, m_ratio))
            print(f"| {r['ranks']} | {r['mode']} | {describe(r)} | {float(p['step_s']):.3f} | {float(r['step_s']):.3f} "
                  f"| {t_ratio:.2f} | {float(p['total_bytes']) / 2**20:.1f} | "
                  f"{float(r['peak_tensor_bytes_max']) / 2**20:.1f} | {m_ratio:.3f} |", flush=True)
    print()
    print("| ranks | points | step time: geometric mean of predicted / measured (min - max) | "
          "memory: geometric mean (min - max) |")
    print("|---|---|---|---|")
    for n in sorted(by_ranks):
        t = [x[0] for x in by_ranks[n]]
        m = [x[1] for x in by_ranks[n]]
        gt = math.exp(sum(map(math.log, t)) / len(t))
        gm = math.exp(sum(map(math.log, m)) / len(m))
        print(f"| {n} | {len(t)} | {gt:.2f} ({min(t):.2f} - {max(t):.2f}) | {gm:.3f} ({min(m):.3f} - {max(m):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
