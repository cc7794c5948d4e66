#!/usr/bin/env python3
"""The prediction tables of docs/planner.md: nextron-plan's top 3 layouts of a model on 8 to 1024 H100s.

    python tools/plan_predictions.py [--plan build/nextron-plan] [--model configs/models/qwen3-next-80b-a3b.json]

Runs `nextron-plan --cluster configs/clusters/h100-dgx.json --seq-len 4096 --global-batch-size 1024 --recompute
none,full --top 3` per GPU count and prints one markdown table (memory of the largest rank, step time, tokens/s, MFU;
"does not fit" where the layout exceeds 80 GiB).
"""
import argparse
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=os.path.join(REPO, "build", "nextron-plan"))
    ap.add_argument("--model", default=os.path.join(REPO, "configs", "models", "qwen3-next-80b-a3b.json"))
    ap.add_argument("--gpus", default="8,64,128,512,1024")
    args = ap.parse_args()
    print("| GPUs | layout | GiB | step s | tokens/s | MFU |")
    print("|---|---|---|---|---|---|")
    for n in args.gpus.split(","):
        out = subprocess.run([args.plan, "--model-config", args.model, "--cluster",
                              os.path.join(REPO, "configs", "clusters", "h100-dgx.json"), "--gpus", n, "--seq-len",
                              "4096", "--global-batch-size", "1024", "--recompute", "none,full", "--top", "3"],
                             capture_output=True, text=True).stdout  # exit 1 when none fits
        for line in out.splitlines():
            m = re.match(r"^\d+\s+(.+?)\s+mb1 (\w+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+(yes|NO)\s+.*?"
                         r"([\d.]+)\s+(\d+)\s+([\d.]+%)$", line)
            if not m:
                continue
            layout, recompute, gib, fit, step, tps, mfu = m.groups()
            if recompute != "none":
                layout += f", {recompute} recompute"
            print(f"| {n} | {layout} | {gib}{'' if fit == 'yes' else ' (does not fit)'} | {step} | {tps} | {mfu} |")


if __name__ == "__main__":
    main()
