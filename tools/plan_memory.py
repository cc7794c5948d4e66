#!/usr/bin/env python3
"""The planner's memory per rank against a measured run, layout by layout (docs/planner.md, "Validation").

For every row: nextron-train --log-step-stats on the tiny model (a few steps, CPU, OMP_NUM_THREADS=1, under mpiexec
for more than one rank) gives peak_tensor_bytes per rank of the last step (the steady state: every buffer allocated,
the peak reset at the step's start); nextron-plan --layout ... --csv gives the planner's total for the largest rank.
Prints a Markdown table of both and their ratio; exits 1 when a ratio is outside --tolerance.

  tools/plan_memory.py --build build [--out /tmp/plan_memory] [--tolerance 0.10]
"""
import argparse
import csv
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from train_test_data import fresh_byte_dataset  # noqa: E402

SEQ, MB, GBS, STEPS = 256, 2, 8, 3

# name, ranks, planner --layout, recompute preset, nextron-train flags
ROWS = [
    ("one process", 1, "TP1", "none", []),
    ("full recompute", 1, "TP1", "full", ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                          "--recompute-num-layers", "1"]),
    ("selective", 1, "TP1", "selective", ["--recompute-granularity", "selective", "--recompute-modules", "core_attn",
                                          "layernorm", "moe_act", "shared_experts"]),
    ("TP2+SP", 2, "TP2,SP", "none", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("DP2", 2, "TP1", "none", []),
    ("PP2", 2, "PP2", "none", ["--pipeline-model-parallel-size", "2"]),
    ("CP2", 2, "CP2", "none", ["--context-parallel-size", "2"]),
    ("EP2 (forced balance)", 2, "EP2", "none", ["--expert-model-parallel-size", "2",
                                                "--moe-router-force-load-balancing"]),
    ("PP2 VPP2", 2, "PP2,VPP2", "none", ["--pipeline-model-parallel-size", "2",
                                         "--virtual-pipeline-model-parallel-size", "2"]),
    ("PP2 VPP2 full recompute", 2, "PP2,VPP2", "full", ["--pipeline-model-parallel-size", "2",
                                                        "--virtual-pipeline-model-parallel-size", "2",
                                                        "--recompute-granularity", "full", "--recompute-method",
                                                        "uniform", "--recompute-num-layers", "1"]),
    ("TP2xDP2+SP", 4, "TP2,SP", "none", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("PP2xTP2+SP", 4, "PP2,TP2,SP", "none", ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size",
                                             "2", "--sequence-parallel"]),
]


def measured_peak(build, data, out, ranks, flags):
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [os.path.join(build, "nextron-train"), "--model-config",
           os.path.join(REPO, "configs/models/qwen3-next-tiny.json"), "--data", data, "--seq-len", str(SEQ),
           "--micro-batch-size", str(MB), "--global-batch-size", str(GBS), "--train-steps", str(STEPS),
           "--lr", "1e-3", "--log-step-stats", "--metrics", metrics, "--log-interval", "1"] + flags
    if ranks > 1:
        cmd = ["mpiexec", "--oversubscribe", "-np", str(ranks)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{run.stdout}\n{run.stderr}")
    steps = [json.loads(line) for line in open(metrics)]
    steps = [s for s in steps if "breakdown" in s and "peak_tensor_bytes" in s["breakdown"]]
    return max(steps[-1]["breakdown"]["peak_tensor_bytes"])


def planned_total(build, out, ranks, layout, recompute):
    path = os.path.join(out, "plan.csv")
    subprocess.run([os.path.join(build, "nextron-plan"), "--model-config",
                    os.path.join(REPO, "configs/models/qwen3-next-tiny.json"), "--cluster",
                    os.path.join(REPO, "configs/clusters/cpu-dev.json"), "--gpus", str(ranks), "--seq-len", str(SEQ),
                    "--global-batch-size", str(GBS), "--micro-batch", str(MB), "--layout", layout, "--recompute",
                    recompute, "--csv", path], check=True, capture_output=True, text=True)
    row = next(csv.DictReader(open(path)))
    return float(row["total_bytes"]), row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--out", default="/tmp/plan_memory")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--only", help="run the rows whose name contains this")
    args = ap.parse_args()
    data = fresh_byte_dataset(os.path.join(args.out, "data"))
    print("| layout | ranks | measured MiB | planner MiB | ratio | planner - measured, bytes |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for name, ranks, layout, recompute, flags in ROWS:
        if args.only and args.only not in name:
            continue
        out = os.path.join(args.out, name.replace(" ", "_").replace("(", "").replace(")", ""))
        got = measured_peak(args.build, data, out, ranks, flags)
        want, _ = planned_total(args.build, out, ranks, layout, recompute)
        ratio = want / got
        bad += abs(ratio - 1) > args.tolerance
        print(f"| {name} | {ranks} | {got / 2**20:.3f} | {want / 2**20:.3f} | {ratio:.3f} | {want - got:+.0f} |",
              flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
