#!/usr/bin/env python3
"""Plot a nextron training run from its JSON Lines metrics (written by nextron-train, src/core/metrics.h).

    /root/.cache/nextron/venv/bin/python tools/plot_metrics.py --metrics run/metrics.jsonl --out run/plots.png \
        [--compare other/metrics.jsonl ...] [--title TEXT]
    /root/.cache/nextron/venv/bin/python tools/plot_metrics.py --self-test

One PNG, two panels sharing the step axis: loss (training records, plus validation points from records with
"kind": "valid" and "valid_loss") and tokens/s. Each --compare file is overlaid with its own colour, labelled by its
path. Records are one JSON object per line; training records have "kind": "train" (or no "kind") and "step",
"loss", "tokens_per_s". A resumed run appends to the same file, so a step can appear twice (steps logged after the
last checkpoint are trained again): the last record of each step wins. Lines that are not JSON objects (a line
cut short by a crash) are skipped with a warning. A null value (a non-finite loss) is plotted as a gap.

--expert-load LAYER (a run with --moe-per-layer-logging) writes a second PNG (--expert-load-out, default
expert_load.png beside --metrics): a heat map of MoE layer LAYER's share of tokens per expert over the steps, and
every logged layer's max/mean imbalance over the steps.

--self-test writes synthetic metrics into a temporary folder (including a resume and a truncated line), plots
them with an overlay, and checks the PNG; it exits 0 when every check passes, 1 otherwise (CTest: plot_metrics).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import traceback

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Run:
    """The records of one metrics file, deduplicated by step (last wins) and sorted by step."""

    def __init__(self, path: str, label: str | None = None):
        self.path = path
        self.label = label or path
        self.skipped = 0
        train: dict[int, dict] = {}
        valid: dict[int, dict] = {}
        load: dict[int, dict] = {}
        if not os.path.exists(path):
            raise SystemExit(f"plot_metrics: {path} does not exist; pass the metrics.jsonl of a run "
                             f"(nextron-train writes it into --save-dir, or where --metrics says)")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    self.skipped += 1
                    print(f"plot_metrics: warning: {path}:{number} is not a metrics record, skipped",
                          file=sys.stderr)
                    continue
                kind = record.get("kind", "train")
                if kind == "valid" and "valid_loss" in record:
                    valid[record["step"]] = record
                elif kind == "train":
                    train[record["step"]] = record
                elif kind == "expert_load":
                    load[record["step"]] = record
        self.train = [train[s] for s in sorted(train)]
        self.valid = [valid[s] for s in sorted(valid)]
        self.expert_load = [load[s] for s in sorted(load)]

    def series(self, records: list[dict], key: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for r in records:
            v = r.get(key)
            steps.append(r["step"])
            values.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan)
        return steps, values


def plot(runs: list[Run], out: str, title: str | None = None) -> None:
    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        style = "-" if i == 0 else "--"
        steps, loss = run.series(run.train, "loss")
        if steps:
            ax_loss.plot(steps, loss, style, color=color, linewidth=1.2, label=f"{run.label} train")
        vsteps, vloss = run.series(run.valid, "valid_loss")
        if vsteps:
            ax_loss.plot(vsteps, vloss, "o", color=color, markersize=5, markeredgecolor="black",
                         label=f"{run.label} valid")
        ssteps, speed = run.series(run.train, "tokens_per_s")
        if ssteps:
            ax_speed.plot(ssteps, speed, style, color=color, linewidth=1.2, label=run.label)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title or "training loss")
    ax_loss.grid(True, alpha=0.3)
    ax_speed.set_ylabel("tokens / s")
    ax_speed.set_xlabel("step")
    ax_speed.set_title("throughput")
    ax_speed.grid(True, alpha=0.3)
    ax_speed.set_ylim(bottom=0)
    for ax in (ax_loss, ax_speed):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # Write beside the target and rename, so a reader never sees a half-written PNG.
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def plot_expert_load(run: Run, layer: int, out: str) -> None:
    """Heat map of `layer`'s token share per expert (x: step, y: expert) and each layer's max/mean over steps."""
    records = [r for r in run.expert_load if layer in r["layers"]]
    if not records:
        raise ValueError(f"no expert_load records for layer {layer} in {run.path} (train with --moe-per-layer-logging)")
    steps = [r["step"] for r in records]
    shares = []
    for r in records:
        tokens = r["tokens"][r["layers"].index(layer)]
        total = sum(tokens)
        shares.append([t / total if total > 0 else 0.0 for t in tokens])
    columns = list(map(list, zip(*shares)))  # (E, steps)
    fig, (ax_map, ax_imb) = plt.subplots(2, 1, figsize=(10, 8))
    image = ax_map.imshow(columns, aspect="auto", origin="lower", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(columns) - 0.5), cmap="viridis")
    fig.colorbar(image, ax=ax_map, label="share of the layer's tokens")
    ax_map.set_xlabel("step")
    ax_map.set_ylabel("expert")
    ax_map.set_title(f"expert load, layer {layer} (1/E = {1 / len(columns):.3g} is balanced)")
    for index in sorted({l for r in run.expert_load for l in r["layers"]}):
        xs = [r["step"] for r in run.expert_load if index in r["layers"]]
        ys = [r["max_over_mean"][r["layers"].index(index)] for r in run.expert_load if index in r["layers"]]
        ax_imb.plot(xs, ys, linewidth=1.0, label=f"layer {index}")
    ax_imb.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax_imb.set_xlabel("step")
    ax_imb.set_ylabel("max / mean tokens per expert")
    ax_imb.set_title("load imbalance per MoE layer")
    ax_imb.grid(True, alpha=0.3)
    ax_imb.legend(fontsize="small", ncol=4)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def self_test() -> int:
    passed, failed = 0, 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name} {detail}", file=sys.stderr)

    try:
        with tempfile.TemporaryDirectory(prefix="nextron_plot_") as work:
            a = os.path.join(work, "a", "metrics.jsonl")
            b = os.path.join(work, "b", "metrics.jsonl")
            os.makedirs(os.path.dirname(a))
            os.makedirs(os.path.dirname(b))

            def train(step: int, scale: float) -> dict:
                return {"kind": "train", "step": step, "total_steps": 40, "loss": scale * (2 + 8 / step),
                        "lm_loss": scale * (2 + 8 / step), "aux_loss": 1.0, "lr": 3e-4, "grad_norm": 1.0,
                        "tokens_per_s": 1000.0 + 10 * step, "mfu": 0.1, "seconds": float(step),
                        "tokens": 4096 * step}

            with open(a, "w", encoding="utf-8") as f:
                for s in range(1, 31):
                    f.write(json.dumps(train(s, 1.0)) + "\n")
                    if s % 10 == 0:
                        f.write(json.dumps({"kind": "valid", "step": s, "valid_loss": 2.1 + 8 / s}) + "\n")
                f.write('{"kind": "train", "step": 31, "lo\n')  # cut short by a crash
                for s in range(26, 41):  # resumed from the step-25 checkpoint: steps 26..30 again
                    f.write(json.dumps(train(s, 1.0)) + "\n")
                f.write(json.dumps(dict(train(41, 1.0), loss=None)) + "\n")  # a non-finite loss
            with open(b, "w", encoding="utf-8") as f:
                for s in range(1, 41):
                    f.write(json.dumps(train(s, 1.1)) + "\n")
                    tokens = [[float(10 + (e * s) % 7) for e in range(8)], [32.0] * 8]
                    f.write(json.dumps({"kind": "expert_load", "step": s, "layers": [0, 3], "tokens": tokens,
                                        "max_over_mean": [max(t) * 8 / sum(t) for t in tokens]}) + "\n")

            run = Run(a, "a")
            check("train records deduplicated", [r["step"] for r in run.train] == list(range(1, 42)),
                  str([r["step"] for r in run.train]))
            check("valid records", [r["step"] for r in run.valid] == [10, 20, 30])
            check("truncated line skipped", run.skipped == 1, str(run.skipped))
            check("null loss is a gap", math.isnan(run.series(run.train, "loss")[1][-1]))

            out = os.path.join(work, "plots", "plots.png")
            rc = main(["--metrics", a, "--compare", b, "--out", out])
            check("main returns 0", rc == 0, str(rc))
            check("png exists", os.path.isfile(out))
            size = os.path.getsize(out) if os.path.isfile(out) else 0
            check("png non-empty", size > 1000, f"{size} bytes")
            with open(out, "rb") as f:
                check("png signature", f.read(8) == PNG_MAGIC)
            check("no temporary left", not os.path.exists(out + ".tmp.png"))
            check("expert_load records read", len(Run(b).expert_load) == 40)
            load_png = os.path.join(work, "plots", "load.png")
            rc = main(["--metrics", b, "--out", out, "--expert-load", "3", "--expert-load-out", load_png])
            check("expert load heat map written", rc == 0 and os.path.isfile(load_png) and
                  os.path.getsize(load_png) > 1000)
            rc = main(["--metrics", a, "--out", out, "--expert-load", "3"])
            check("expert load without records fails", rc == 1, str(rc))
    except Exception:  # noqa: BLE001 - report any failure as a failed check
        traceback.print_exc()
        failed += 1
    print(f"plot_metrics: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", help="metrics.jsonl of the run to plot")
    parser.add_argument("--out", help="PNG to write (default: plots.png beside --metrics)")
    parser.add_argument("--compare", action="append", default=[], metavar="JSONL",
                        help="another run's metrics.jsonl to overlay (repeatable)")
    parser.add_argument("--title", help="title of the loss panel")
    parser.add_argument("--expert-load", type=int, metavar="LAYER",
                        help="also plot MoE layer LAYER's tokens per expert over the steps (--moe-per-layer-logging)")
    parser.add_argument("--expert-load-out", help="its PNG (default: expert_load.png beside --metrics)")
    parser.add_argument("--self-test", action="store_true", help="plot synthetic metrics and check the PNG")
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test()
    if not args.metrics:
        parser.error("--metrics is required (or --self-test)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "plots.png")
    runs = [Run(args.metrics)] + [Run(p) for p in args.compare]
    if not any(r.train or r.valid for r in runs):
        print(f"plot_metrics: no metrics records in {args.metrics}", file=sys.stderr)
        return 1
    plot(runs, out, args.title)
    print(f"plot_metrics: wrote {out}")
    if args.expert_load is not None:
        load_out = args.expert_load_out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)),
                                                        "expert_load.png")
        try:
            plot_expert_load(runs[0], args.expert_load, load_out)
        except ValueError as e:
            print(f"plot_metrics: {e}", file=sys.stderr)
            return 1
        print(f"plot_metrics: wrote {load_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
