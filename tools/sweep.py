#!/usr/bin/env python3
"""Scaling study: train one model config under a grid of parallel layouts and rank counts, collect what each point
measured into one CSV, and plot strong and weak scaling, efficiency against the ideal and memory per rank.

Each point is one `nextron-train --log-step-stats` run (mpirun locally, or a Slurm job array on a cluster) for a few
steps; the first step is warm-up and left out. Per point the CSV holds tokens/s, MFU, the step time split (compute,
each process group's communication, pipeline bubble, optimizer), the bytes rank 0 sent per step per group and the
peak memory of the largest rank. Points the layout rules refuse are recorded as `invalid` with the reason (the
trainer's own message); a crashed point is recorded as `failed` with the tail of its error, and the sweep goes on.

    tools/sweep.py --train build/nextron-train --model-config configs/models/qwen3-next-tiny.json \\
        --data data.h5 --seq-len 64 --global-batch-size 16 --ranks 1,2,4,8 \\
        --grid tp=1,2 pp=1,2 cp=1,2 ep=1,2 --out sweep/          (strong scaling: the global batch stays)
    tools/sweep.py ... --mode weak                               (weak: the global batch grows with the ranks)
    tools/sweep.py ... --launcher slurm --nodes-of 8             (writes and submits a job array; then --collect)
    tools/sweep.py --collect sweep/                              (CSV and plots from the points' metrics)

Grid keys (each a comma list; the product is swept, DP = ranks / (TP x CP x PP) fills the rest): tp, pp, vpp, cp,
ep, etp, mb (micro-batch), recompute (none, selective = core_attn, full), sp (0/1; default 1 where TP > 1).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

GRID_KEYS = ("tp", "pp", "vpp", "cp", "ep", "etp", "mb", "recompute", "sp")
GROUPS = ("tp", "cp", "dp", "dp_cp", "pp", "ep", "edp", "world")
CSV_FIELDS = (["point", "mode", "ranks", "tp", "pp", "vpp", "cp", "ep", "etp", "dp", "mb", "recompute", "sp",
               "global_batch", "status", "reason", "tokens_per_s", "tokens_per_s_per_rank", "mfu", "step_s",
               "compute_s", "optimizer_s", "bubble_fraction"]
              + [f"comm_{g}_s" for g in GROUPS] + [f"bytes_{g}" for g in GROUPS]
              + ["peak_tensor_bytes_max", "max_rss_bytes_max"])


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {"tp": ["1"], "pp": ["1"], "vpp": ["1"], "cp": ["1"], "ep": ["1"], "etp": ["0"], "mb": ["1"],
            "recompute": ["none"], "sp": ["auto"]}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in GRID_KEYS or not values:
            raise SystemExit(f"sweep: bad --grid item '{item}': use KEY=V1,V2 with KEY one of {', '.join(GRID_KEYS)}")
        grid[key] = values.split(",")
    for key in GRID_KEYS:
        if key in ("recompute", "sp"):
            continue
        for v in grid[key]:
            if not v.isdigit():
                raise SystemExit(f"sweep: --grid {key}={v}: not a non-negative integer")
    for v in grid["recompute"]:
        if v not in ("none", "selective", "full"):
            raise SystemExit(f"sweep: --grid recompute={v}: use none, selective or full")
    return grid


def points(grid: dict[str, list[str]], ranks: list[int], mode: str, global_batch: int) -> list[dict]:
    """Every (layout, rank count) of the grid, with DP derived; the global batch per the mode."""
    out = []
    for n in ranks:
        for values in itertools.product(*(grid[k] for k in GRID_KEYS)):
            p = dict(zip(GRID_KEYS, values))
            for k in ("tp", "pp", "vpp", "cp", "ep", "etp", "mb"):
                p[k] = int(p[k])
            p["sp"] = (p["tp"] > 1) if p["sp"] == "auto" else p["sp"] == "1"
            p["ranks"] = n
            p["mode"] = mode
            p["global_batch"] = global_batch * (n if mode == "weak" else 1)
            out.append(p)
    # The same layout may come out of the grid twice (sp auto); keep one.
    seen, unique = set(), []
    for p in out:
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def name(p: dict) -> str:
    s = f"{p['mode']}_n{p['ranks']}_tp{p['tp']}{'sp' if p['sp'] else ''}_pp{p['pp']}"
    if p["vpp"] > 1:
        s += f"v{p['vpp']}"
    s += f"_cp{p['cp']}_ep{p['ep']}"
    if p["etp"]:
        s += f"_etp{p['etp']}"
    return s + f"_mb{p['mb']}_{p['recompute']}"


def precheck(p: dict) -> str:
    """The arithmetic the layout needs before any rank starts (the trainer checks the model-dependent rest)."""
    dense = p["tp"] * p["cp"] * p["pp"]
    if p["ranks"] % dense:
        return f"{p['ranks']} ranks are not divisible by TP x CP x PP = {dense}"
    dp = p["ranks"] // dense
    if p["global_batch"] % (p["mb"] * dp):
        return f"global batch {p['global_batch']} is not divisible by micro-batch x DP = {p['mb'] * dp}"
    if p["vpp"] > 1 and p["pp"] == 1:
        return "VPP > 1 needs PP > 1"
    return ""


def train_args(p: dict, a: argparse.Namespace, save: str) -> list[str]:
    args = ["--model-config", a.model_config, "--seq-len", str(a.seq_len), "--global-batch-size",
            str(p["global_batch"]), "--micro-batch-size", str(p["mb"]), "--train-steps", str(a.steps),
            "--lr", "1e-4", "--lr-warmup-steps", "1", "--save", save, "--save-interval", "0", "--no-progress",
            "--log-step-stats", "--valid-fraction", "0", "--device", a.device,
            "--tensor-model-parallel-size", str(p["tp"]), "--pipeline-model-parallel-size", str(p["pp"]),
            "--context-parallel-size", str(p["cp"]), "--expert-model-parallel-size", str(p["ep"])]
    for d in a.data:
        args += ["--data", d]
    if p["vpp"] > 1:
        args += ["--virtual-pipeline-model-parallel-size", str(p["vpp"])]
    if p["etp"]:
        args += ["--expert-tensor-parallel-size", str(p["etp"])]
    if p["sp"]:
        args += ["--sequence-parallel"]
    if p["recompute"] == "selective":
        args += ["--recompute-granularity", "selective", "--recompute-modules", "core_attn"]
    elif p["recompute"] == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.peak_tflops:
        args += ["--peak-tflops", str(a.peak_tflops)]
    return args + a.extra


def summarize(p: dict, point_dir: str) -> dict:
    """The CSV row of a finished point from its metrics.jsonl (steps after the first)."""
    row = {k: p.get(k, "") for k in CSV_FIELDS}
    row["point"] = name(p)
    row["dp"] = p["ranks"] // (p["tp"] * p["cp"] * p["pp"]) if p["ranks"] % (p["tp"] * p["cp"] * p["pp"]) == 0 else ""
    status = json.load(open(os.path.join(point_dir, "status.json"))) if os.path.exists(
        os.path.join(point_dir, "status.json")) else {"status": "pending", "reason": ""}
    row["status"], row["reason"] = status["status"], status.get("reason", "")
    metrics = os.path.join(point_dir, "save", "metrics.jsonl")
    if row["status"] != "ok" or not os.path.exists(metrics):
        return row
    steps = [json.loads(line) for line in open(metrics) if '"kind": "train"' in line or '"kind":"train"' in line]
    steps = [s for s in steps if s.get("breakdown")]
    timed = steps[1:] if len(steps) > 1 else steps
    if not timed:
        row["status"], row["reason"] = "failed", "no step with --log-step-stats in metrics.jsonl"
        return row

    def mean(f):
        return sum(f(s) for s in timed) / len(timed)

    row["tokens_per_s"] = mean(lambda s: s["tokens_per_s"])
    row["tokens_per_s_per_rank"] = row["tokens_per_s"] / p["ranks"]
    row["mfu"] = mean(lambda s: s["mfu"])
    row["step_s"] = mean(lambda s: s["breakdown"]["forward_backward_seconds"] + s["breakdown"]["optimizer_seconds"])
    row["compute_s"] = mean(lambda s: s["breakdown"]["compute_seconds"])
    row["optimizer_s"] = mean(lambda s: s["breakdown"]["optimizer_seconds"])
    row["bubble_fraction"] = mean(lambda s: s.get("pipeline_bubble", 0.0))
    for g in GROUPS:
        row[f"comm_{g}_s"] = mean(lambda s: s["breakdown"]["comm"].get(g, {}).get("seconds", 0.0))
        row[f"bytes_{g}"] = mean(lambda s: s["breakdown"]["comm"].get(g, {}).get("bytes", 0.0))
    row["peak_tensor_bytes_max"] = max(max(s["breakdown"]["peak_tensor_bytes"]) for s in timed)
    row["max_rss_bytes_max"] = max(max(s["breakdown"]["max_rss_bytes"]) for s in timed)
    return row


def write_status(point_dir: str, status: str, reason: str = "") -> None:
    with open(os.path.join(point_dir, "status.json"), "w") as f:
        json.dump({"status": status, "reason": reason}, f)


def run_local(pts: list[dict], a: argparse.Namespace) -> None:
    mpirun = [a.mpirun, "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        mpirun.append("--allow-run-as-root")
    for i, p in enumerate(pts):
        d = os.path.join(a.out, "points", name(p))
        os.makedirs(d, exist_ok=True)
        json.dump(p, open(os.path.join(d, "point.json"), "w"))
        label = f"[{i + 1}/{len(pts)}] {name(p)}"
        reason = precheck(p)
        if reason:
            write_status(d, "invalid", reason)
            print(f"{label}: invalid ({reason})", flush=True)
            continue
        cmd = mpirun + ["-np", str(p["ranks"]), "-x", "OMP_NUM_THREADS=1", a.train] + train_args(
            p, a, os.path.join(d, "save"))
        with open(os.path.join(d, "command.txt"), "w") as f:
            f.write(shlex.join(cmd) + "\n")
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            out, err, rc = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = e.stdout or "", (e.stderr or "") + f"\ntimed out after {a.timeout} s", -9
            out = out.decode() if isinstance(out, bytes) else out
            err = err.decode() if isinstance(err, bytes) else err
        open(os.path.join(d, "stdout.txt"), "w").write(out)
        open(os.path.join(d, "stderr.txt"), "w").write(err)
        if rc == 0:
            write_status(d, "ok")
            row = summarize(p, d)
            print(f"{label}: ok in {time.time() - t0:.1f}s, {row.get('tokens_per_s') or 0:.0f} tok/s", flush=True)
        elif "parallel layout" in err or "not supported" in err or "is not divisible" in err:
            lines = [l.strip(" -") for l in err.splitlines() if l.strip() and "error" not in l.lower()[:6]]
            reason = next((l for l in err.splitlines() if "  - " in l), lines[0] if lines else err.strip()[:200])
            write_status(d, "invalid", reason.strip(" -"))
            print(f"{label}: invalid ({reason.strip(' -')[:140]})", flush=True)
        else:
            # The ranks' own message, before mpirun's closing banner (a line of dashes).
            own = err.split("\n-----")[0].strip() or err.strip()
            write_status(d, "failed", f"exit {rc}: {own[-300:]}")
            print(f"{label}: FAILED (exit {rc}; {os.path.join(d, 'stderr.txt')})", flush=True)


def submit_slurm(pts: list[dict], a: argparse.Namespace) -> None:
    """One job array, one task per point: each task reads its command from the points file."""
    lines = []
    for p in pts:
        d = os.path.abspath(os.path.join(a.out, "points", name(p)))
        os.makedirs(d, exist_ok=True)
        json.dump(p, open(os.path.join(d, "point.json"), "w"))
        reason = precheck(p)
        if reason:
            write_status(d, "invalid", reason)
            continue
        lines.append(shlex.join([d, str(p["ranks"])] + [a.train] + train_args(p, a, os.path.join(d, "save"))))
    plist = os.path.abspath(os.path.join(a.out, "points.txt"))
    open(plist, "w").write("\n".join(lines) + "\n")
    gpus = a.gpus_per_node
    script = os.path.abspath(os.path.join(a.out, "sweep_array.sbatch"))
    open(script, "w").write(f"""#!/bin/bash
# Written by tools/sweep.py: task i runs line i of {plist} (point dir, ranks, command) with srun.
#SBATCH --job-name=nextron-sweep
#SBATCH --output={os.path.abspath(a.out)}/slurm-%A_%a.out
set -u
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(plist)})
eval "set -- $line"
dir=$1; ranks=$2; shift 2
nodes=$(( (ranks + {a.ranks_per_node} - 1) / {a.ranks_per_node} ))
srun --nodes=$nodes --ntasks=$ranks --ntasks-per-node={a.ranks_per_node} {f"--gpus-per-task=1" if gpus else ""} \\
  "$@" >"$dir/stdout.txt" 2>"$dir/stderr.txt"
rc=$?
if [ $rc -eq 0 ]; then s=ok; else s=failed; fi
printf '{{"status": "%s", "reason": "exit %d (see stderr.txt)"}}' $s $rc >"$dir/status.json"
""")
    if not lines:
        print("sweep: every point is invalid; nothing to submit")
        return
    cmd = ["sbatch", f"--array=0-{len(lines) - 1}", f"--nodes={max(1, max(p['ranks'] for p in pts) // a.ranks_per_node)}"]
    for k, v in (("--time", a.time), ("--partition", a.partition), ("--account", a.account)):
        if v:
            cmd.append(f"{k}={v}")
    cmd.append(script)
    print(shlex.join(cmd))
    if not a.dry_run:
        subprocess.run(cmd, check=True)
        print(f"sweep: submitted {len(lines)} points; when they finish: tools/sweep.py --collect {a.out}")


def collect(out: str) -> list[dict]:
    rows = []
    pdir = os.path.join(out, "points")
    for n in sorted(os.listdir(pdir)) if os.path.isdir(pdir) else []:
        d = os.path.join(pdir, n)
        if os.path.exists(os.path.join(d, "point.json")):
            rows.append(summarize(json.load(open(os.path.join(d, "point.json"))), d))
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return rows


def family(r: dict) -> str:
    """A layout's shape without DP (what stays fixed along a scaling curve)."""
    s = f"TP{r['tp']}{'+SP' if r['sp'] else ''} PP{r['pp']}" + (f"xVPP{r['vpp']}" if int(r["vpp"]) > 1 else "")
    s += f" CP{r['cp']} EP{r['ep']}" + (f" ETP{r['etp']}" if int(r["etp"] or 0) else "")
    return s + f" mb{r['mb']}" + ("" if r["recompute"] == "none" else f" {r['recompute']}")


def plot(rows: list[dict], out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["tokens_per_s"] != ""]
    written = []
    for mode in ("strong", "weak"):
        rs = [r for r in ok if r["mode"] == mode]
        if not rs:
            continue
        base = min((r for r in rs if int(r["ranks"]) == 1), key=lambda r: -r["tokens_per_s"], default=None)
        fams = sorted({family(r) for r in rs})
        fig, (ax, ax_eff) = plt.subplots(1, 2, figsize=(13, 5))
        for fam in fams:
            pts = sorted((int(r["ranks"]), r["tokens_per_s"]) for r in rs if family(r) == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=fam)
            if base:
                ax_eff.plot([p[0] for p in pts], [p[1] / (p[0] * base["tokens_per_s"]) for p in pts], "o-", label=fam)
        n_max = max(int(r["ranks"]) for r in rs)
        if base:
            ax.plot([1, n_max], [base["tokens_per_s"], n_max * base["tokens_per_s"]], "k--", label="ideal (linear)")
            ax_eff.axhline(1.0, color="k", ls="--", label="ideal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{mode} scaling" + (" (global batch x ranks)" if mode == "weak" else " (fixed global batch)"))
        ax.legend(fontsize=7)
        ax_eff.set_xscale("log", base=2)
        ax_eff.set_xlabel("ranks")
        ax_eff.set_ylabel("tokens/s / (ranks x best 1-rank tokens/s)")
        ax_eff.set_title("efficiency against the ideal")
        fig.tight_layout()
        path = os.path.join(out, f"{mode}_scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if ok:
        fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(14, 5.5))
        labels = [r["point"] for r in ok]
        ax_m.barh(labels, [r["peak_tensor_bytes_max"] / 2**20 for r in ok])
        ax_m.set_xlabel("peak tensor MiB on the largest rank")
        ax_m.set_title("memory per rank")
        ax_m.tick_params(axis="y", labelsize=6)
        left = [0.0] * len(ok)
        parts = [("compute", lambda r: r["compute_s"]), ("optimizer", lambda r: r["optimizer_s"])] + [
            (g, (lambda g: lambda r: r[f"comm_{g}_s"])(g)) for g in GROUPS]
        for label, f in parts:
            vals = [f(r) or 0.0 for r in ok]
            if any(v > 0 for v in vals):
                ax_t.barh(labels, vals, left=left, label=label if label in ("compute", "optimizer") else f"comm {label}")
                left = [a + b for a, b in zip(left, vals)]
        ax_t.set_xlabel("seconds per step (rank 0)")
        ax_t.set_title("step time split")
        ax_t.tick_params(axis="y", labelsize=6)
        ax_t.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "memory_and_time.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--train", help="the nextron-train binary")
    ap.add_argument("--model-config")
    ap.add_argument("--data", action="append", default=[])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--global-batch-size", type=int, default=16, help="strong: per point; weak: per rank")
    ap.add_argument("--steps", type=int, default=3, help="training steps per point (the first is warm-up)")
    ap.add_argument("--ranks", default="1,2,4,8", help="comma list of rank counts")
    ap.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2")
    ap.add_argument("--mode", choices=("strong", "weak", "both"), default="strong")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--peak-tflops", type=float, default=0, help="per rank, for MFU (0: nextron-train measures)")
    ap.add_argument("--out", default="sweep")
    ap.add_argument("--launcher", choices=("mpirun", "slurm"), default="mpirun")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per point before it counts as failed")
    ap.add_argument("--ranks-per-node", type=int, default=8, help="slurm")
    ap.add_argument("--gpus-per-node", type=int, default=0, help="slurm")
    ap.add_argument("--time", default="", help="slurm")
    ap.add_argument("--partition", default="", help="slurm")
    ap.add_argument("--account", default="", help="slurm")
    ap.add_argument("--dry-run", action="store_true", help="slurm: write the array script, do not submit")
    ap.add_argument("--collect", metavar="DIR", help="only build the CSV and plots of DIR's finished points")
    ap.add_argument("extra", nargs="*", help="after --: more nextron-train arguments for every point")
    a = ap.parse_args(argv)
    if a.collect:
        rows = collect(a.collect)
        for path in plot(rows, a.collect):
            print(f"wrote {path}")
        print(f"wrote {os.path.join(a.collect, 'sweep.csv')} ({len(rows)} points)")
        return 0
    missing = [f for f, v in (("--train", a.train), ("--model-config", a.model_config), ("--data", a.data)) if not v]
    if missing:
        ap.error("missing " + ", ".join(missing) + " (or --collect DIR)")
    for path in [a.train, a.model_config] + a.data:
        if not os.path.exists(path):
            ap.error(f"'{path}' does not exist")
    try:
        ranks = [int(x) for x in a.ranks.split(",")]
    except ValueError:
        ap.error(f"--ranks '{a.ranks}': use a comma list of integers")
    grid = parse_grid(a.grid)
    modes = ("strong", "weak") if a.mode == "both" else (a.mode,)
    pts = [p for m in modes for p in points(grid, ranks, m, a.global_batch_size)]
    os.makedirs(a.out, exist_ok=True)
    print(f"sweep: {len(pts)} points into {a.out}", flush=True)
    if a.launcher == "slurm":
        submit_slurm(pts, a)
        return 0
    run_local(pts, a)
    rows = collect(a.out)
    for path in plot(rows, a.out):
        print(f"wrote {path}")
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"wrote {os.path.join(a.out, 'sweep.csv')}: {ok} ok, {sum(r['status'] == 'invalid' for r in rows)} invalid, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
