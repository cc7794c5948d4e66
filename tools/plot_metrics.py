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
        self.train = [train[s] for s in sorted(train)]
        self.valid = [valid[s] for s in sorted(valid)]

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
