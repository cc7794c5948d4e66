#!/usr/bin/env python3
"""The GPU check's judgements (tools/gpu_check.sh): the training-curve comparison and the summary.

    gpu_check_report.py compare-loss --reference CPU.jsonl --run RUN.jsonl --rtol R [--report FILE]
        Compares the per-step losses of a run with the CPU (fp32) reference of the same options (metrics JSON Lines
        of nextron-train) over the steps both have. Passes when the mean of |run - ref| / ref over those steps is at
        most R and the mean loss of the last quarter of the steps differs from the reference's by at most R times
        the reference's descent (first loss - that tail mean; or the tail mean itself where larger), so both a noisy
        and a drifting curve fail. Exit 1 when it does not.
    gpu_check_report.py summary --results RESULTS.jsonl --logs DIR --manifest MANIFEST.json --out SUMMARY.json
        Merges the parts' results, the test counts (gtest JSON), the versions, the loss comparison and the benchmark
        figures into one JSON file and prints the verdict. Exit 1 when a part that ran failed or timed out.

Why the training tolerance is 3e-2 on the GPU: bf16 activations carry 2^-9 relative rounding per op and the whole-
model test already allows 1e-2 on one forward; over 100 AdamW steps the bf16 and fp32 runs take slightly different
updates, so their losses drift apart by a few 1e-3 to 1e-2 relative at this size (the 12-step GPU test in
tests/cuda/test_cuda_model.cpp allows 2e-2 per step). 3e-2 on the mean still fails any real bug: a wrong kernel
changes the loss by O(1), and a run that does not learn stays near ln(vocab) while the reference falls below half of
that. On the CPU the same binary reproduces the reference to float rounding (only OpenMP's reduction order may
differ), hence 1e-4.

Why the tail is measured against the descent, not the tail's own level: the fixture is small enough to be
memorised, so the loss falls from 8.42 to about 0.2 in 100 steps, and there the bf16 run's relative difference is
noise (first H200 run, commit 0bb5a16: mean relative difference 2.4e-2, tail means 0.229 against 0.241, i.e. 4.8e-2
of the tail's level but 1.4e-3 of the 8.2-nat descent; single steps up to 1.4e-1). A run that stalls or plateaus
higher still fails: one that ends at 0.5 instead of 0.24 is 3.2e-2 of the descent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_losses(path: str) -> dict[int, float]:
    """step -> training loss from nextron-train's metrics JSON Lines (the last record of a step wins)."""
    losses = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("kind", "train") == "train" and "loss" in r and "step" in r:
                losses[int(r["step"])] = float(r["loss"])
    return losses


def compare_loss(reference: str, run: str, rtol: float) -> dict:
    ref, got = read_losses(reference), read_losses(run)
    steps = sorted(set(ref) & set(got))
    if not steps:
        return {"ok": False, "why": f"no common steps between {reference} ({len(ref)}) and {run} ({len(got)})"}
    rel = [abs(got[s] - ref[s]) / abs(ref[s]) for s in steps]
    tail = steps[len(steps) - max(1, len(steps) // 4):]
    ref_tail = sum(ref[s] for s in tail) / len(tail)
    got_tail = sum(got[s] for s in tail) / len(tail)
    # The tail is judged against the reference's descent (first loss - tail loss), or its own level where that is
    # larger: a run that learns the memorisable fixture drops to ~0.2 nats, where relative differences are noise.
    descent = max(ref[steps[0]] - ref_tail, abs(ref_tail))
    res = {
        "steps": len(steps),
        "first_loss": {"reference": ref[steps[0]], "run": got[steps[0]]},
        "last_loss": {"reference": ref[steps[-1]], "run": got[steps[-1]]},
        "mean_rel_diff": sum(rel) / len(rel),
        "max_rel_diff": max(rel),
        "max_rel_diff_step": steps[rel.index(max(rel))],
        "tail_mean": {"reference": ref_tail, "run": got_tail, "rel_diff": abs(got_tail - ref_tail) / abs(ref_tail),
                      "diff_of_descent": abs(got_tail - ref_tail) / descent},
        "rtol": rtol,
    }
    res["ok"] = res["mean_rel_diff"] <= rtol and res["tail_mean"]["diff_of_descent"] <= rtol
    return res


def gtest_counts(path: str) -> dict | None:
    """Totals, failures (names and first message) and skips (names and reason) of a gtest JSON report."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rep = json.load(f)
    out = {"tests": 0, "failed": [], "skipped": {}}
    for suite in rep.get("testsuites", []):
        for t in suite.get("testsuite", []):
            name = f"{suite['name']}.{t['name']}"
            out["tests"] += 1
            if t.get("failures"):
                out["failed"].append({"test": name, "message": t["failures"][0].get("failure", "")[:400]})
            elif t.get("result") == "SKIPPED":
                msg = ""
                for s in t.get("skipped", []) or []:
                    msg = s.get("message", "")
                out["skipped"][name] = msg[:300]
    out["passed"] = out["tests"] - len(out["failed"]) - len(out["skipped"])
    return out


def skip_reasons_from_log(path: str) -> dict[str, str]:
    """test -> the message it skipped with, from gtest's console output (older gtest JSON reports omit it)."""
    reasons, current, lines = {}, None, []
    if not os.path.exists(path):
        return reasons
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("[ RUN      ] "):
                current, lines = line[13:].strip(), []
            elif line.startswith("[  SKIPPED ] ") and current:
                text = " ".join(lines)
                reasons[current] = text.split("Skipped", 1)[-1].strip()[:300]
                current = None
            elif current:
                lines.append(line.strip())
    return reasons


def bench_figures(path: str) -> dict | None:
    """The headline numbers of tools/bench_gpu_peers.py's JSON (the whole file is kept beside the summary)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        b = json.load(f)
    ours, peers = b.get("ours", {}), b.get("peers", {})
    fig = {"gpu": b.get("gpu"), "torch": b.get("torch"), "transformers": b.get("transformers")}

    def get(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    fig["gemm_tflops"] = get(ours, "gemm", "tflops_median")
    fig["torch_matmul_tflops"] = get(peers, "matmul", "tflops_median")
    for k, peer in (("gdr", "gdr"), ("attention", "attention")):
        fig[k] = {
            "ours_fwd_bwd_ms": get(ours, k, "fwd_bwd", "median_ms"),
            "peer_fwd_bwd_ms": get(peers, peer, "fwd_bwd", "median_ms"),
            "peer_error": get(peers, peer, "error"),
        }
    fig["step"] = {
        "ours_tokens_per_s": get(ours, "step", "tokens_per_s"),
        "ours_mfu": get(ours, "step", "mfu"),
        "hf_tokens_per_s": get(peers, "step", "tokens_per_s"),
        "hf_error": get(peers, "step", "error"),
    }
    return fig


def summary(args) -> int:
    results = []
    with open(args.results) as f:
        results = [json.loads(line) for line in f if line.strip()]
    out = {"dry_run": args.dry_run == "1", "parts": results}
    if os.path.exists(args.manifest):
        with open(args.manifest) as f:
            m = json.load(f)
        out["bundle"] = {"commit": m.get("commit"), "built": m.get("built")}
    versions = os.path.join(args.logs, "versions.json")
    if os.path.exists(versions):
        with open(versions) as f:
            out["versions"] = json.load(f)
    for name in ("kernels", "golden"):
        c = gtest_counts(os.path.join(args.logs, f"{name}.json"))
        if c is not None:
            from_log = skip_reasons_from_log(os.path.join(args.logs, f"{name}.log"))
            for t in c["skipped"]:
                c["skipped"][t] = c["skipped"][t] or from_log.get(t, "")
            out[f"{name}_tests"] = c
            # On the GPU machine a test that skips for want of a GPU means the binary did not see it: not a pass.
            blind = [t for t, why in c["skipped"].items() if "no CUDA device visible" in why]
            for r in results:
                if r["part"] == name and r["status"] == "pass" and blind and args.dry_run != "1":
                    r["status"] = "fail"
                    r["reason"] = f"{len(blind)} tests saw no GPU (e.g. {blind[0]}): check the driver / CUDA_VISIBLE_DEVICES"
    loss = os.path.join(args.logs, "train_loss.json")
    if os.path.exists(loss):
        with open(loss) as f:
            out["train_loss"] = json.load(f)
    bench = bench_figures(os.path.join(args.logs, "bench.json"))
    if bench is not None:
        out["bench"] = bench
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)

    bad = [r for r in results if r["status"] in ("fail", "timeout")]
    ran = [r for r in results if r["status"] != "skipped"]
    lines = []
    for r in results:
        extra = f"{r['seconds']} s of {r['budget_s']}" if "seconds" in r else ""
        extra = f"{extra}  {r['reason']}" if r.get("reason") else extra
        lines.append(f"  {r['part']:<10} {r['status']:<8} {extra}")
    for name in ("kernels", "golden"):
        c = out.get(f"{name}_tests")
        if c:
            lines.append(f"  {name} tests: {c['passed']} passed, {len(c['failed'])} failed, {len(c['skipped'])} skipped")
            for fl in c["failed"][:10]:
                lines.append(f"    FAILED {fl['test']}")
    if "train_loss" in out and "mean_rel_diff" in out["train_loss"]:
        t = out["train_loss"]
        lines.append(f"  train: {t['steps']} steps, loss {t['first_loss']['run']:.4f} -> {t['last_loss']['run']:.4f} "
                     f"(reference {t['last_loss']['reference']:.4f}), mean rel diff {t['mean_rel_diff']:.2e}")
    word = "DRY RUN" if out["dry_run"] else "GPU CHECK"
    verdict = "FAIL" if bad else "PASS"
    commit = out.get("bundle", {}).get("commit", "?")
    print(f"{word}: {verdict} at commit {commit} ({len(ran)} parts ran, {len(bad)} failed, "
          f"{len(results) - len(ran)} skipped)")
    print("\n".join(lines))
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare-loss")
    c.add_argument("--reference", required=True)
    c.add_argument("--run", required=True)
    c.add_argument("--rtol", type=float, required=True)
    c.add_argument("--report", help="write the comparison here (default: train_loss.json beside --run)")
    s = sub.add_parser("summary")
    s.add_argument("--results", required=True)
    s.add_argument("--logs", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--dry-run", default="0")
    args = ap.parse_args()
    if args.cmd == "compare-loss":
        res = compare_loss(args.reference, args.run, args.rtol)
        report = args.report or os.path.join(os.path.dirname(os.path.abspath(args.run)), "train_loss.json")
        with open(report, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res, indent=1))
        if not res["ok"]:
            print(f"gpu_check_report: the loss curve of {args.run} is not within {args.rtol} of {args.reference}",
                  file=sys.stderr)
        return 0 if res["ok"] else 1
    return summary(args)


if __name__ == "__main__":
    sys.exit(main())
