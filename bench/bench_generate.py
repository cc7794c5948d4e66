#!/usr/bin/env python3
"""Decode speed of nextron-generate against transformers' generate, at two context lengths, on the CPU.

    python bench/bench_generate.py --generate build/nextron-generate [--config configs/models/qwen3-next-small.json]
        [--contexts 512,4096] [--new-tokens 64] [--threads 2] [--work build/bench_generate] [--out results.json]

Two models with random weights from --config (tools/make_checkpoint.py): the config as it is (Gated DeltaNet and
gated attention layers, the hybrid) and the same with every layer Gated DeltaNet. For each model and context P, one
random prompt of P tokens, greedy, --new-tokens tokens with EOS ignored; the figure is the decode rate alone
(tokens after the first, which comes from the prefill, over their time):
  nextron:      decode tokens/s from nextron-generate's summary line (its one-token steps: the recurrent DeltaNet
                step and the attention KV cache);
  transformers: tools/nextron_tools/hf_generate.py --bench (generate with its cache, fp32, eager, torch fallbacks).
A DeltaNet decode step costs the same at any context (its state is Hv x dk x dv), so the DeltaNet-only model's rate
should not fall from P = 512 to 4096; the hybrid's attention layers read a KV cache that grows with P. Both tools run
with the same number of threads, one after the other, in this run.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_GENERATE = os.path.join(REPO, "tools", "nextron_tools", "hf_generate.py")
MAKE_CHECKPOINT = os.path.join(REPO, "tools", "make_checkpoint.py")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", required=True)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "models", "qwen3-next-small.json"))
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=os.path.join(REPO, "build", "bench_generate"))
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cfg = json.load(open(args.config))
    variants = {"hybrid": cfg, "deltanet-only": dict(cfg, layer_types=["linear_attention"] * cfg["num_hidden_layers"])}
    variants["deltanet-only"].pop("full_attention_interval", None)
    rows = []
    for name, c in variants.items():
        model = os.path.join(args.work, name)
        if not os.path.exists(os.path.join(model, "config.json")):
            cfg_path = os.path.join(args.work, f"{name}.json")
            json.dump(c, open(cfg_path, "w"))
            subprocess.run([sys.executable, MAKE_CHECKPOINT, "--config", cfg_path, "--out", model], check=True,
                           env=env, capture_output=True)
        for P in (int(x) for x in args.contexts.split(",")):
            ids = [random.Random(P).randrange(c["vocab_size"]) for _ in range(P)]
            prompts = os.path.join(args.work, f"prompt_{P}.jsonl")
            with open(prompts, "w") as f:
                f.write(json.dumps({"ids": ids}) + "\n")
            r = subprocess.run([args.generate, "--model", model, "--prompt-file", prompts, "--max-new-tokens",
                                str(args.new_tokens), "--ignore-eos", "--threads", str(args.threads)],
                               capture_output=True, text=True, env=env, check=True)
            m = re.search(r"decode (\d+) tokens at ([\d.]+) tokens/s", r.stderr)
            ours = float(m.group(2))
            h = subprocess.run([sys.executable, HF_GENERATE, "--model", model, "--bench", "--context", str(P),
                                "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, env=env)
            row = {"model": name, "context": P, "nextron_tokens_per_s": ours, "threads": args.threads}
            if h.returncode == 0:
                theirs = json.loads(h.stdout.strip().splitlines()[-1])
                row.update(transformers_tokens_per_s=theirs["tokens_per_s"], torch=theirs.get("torch"),
                           transformers=theirs.get("transformers"))
                peer = f"transformers {theirs['tokens_per_s']:8.1f} tokens/s, ratio {ours / theirs['tokens_per_s']:.2f}"
            else:
                # transformers' generate cannot run a model without attention layers (its hybrid cache asks an
                # attention layer for the mask sizes): recorded, not fatal.
                row["transformers_error"] = h.stderr.strip().splitlines()[-1][:300]
                peer = f"transformers failed: {row['transformers_error']}"
            rows.append(row)
            print(f"{name:14s} context {P:5d}: nextron {ours:8.1f} tokens/s, {peer}", flush=True)
    for name in variants:
        r = [x for x in rows if x["model"] == name]
        if len(r) >= 2:
            line = (f"{name}: decode rate at context {r[-1]['context']} / at {r[0]['context']}: nextron "
                    f"{r[-1]['nextron_tokens_per_s'] / r[0]['nextron_tokens_per_s']:.2f}")
            if "transformers_tokens_per_s" in r[0] and "transformers_tokens_per_s" in r[-1]:
                line += (f", transformers "
                         f"{r[-1]['transformers_tokens_per_s'] / r[0]['transformers_tokens_per_s']:.2f}")
            print(line)
    if args.out:
        json.dump({"config": os.path.relpath(args.config, REPO), "new_tokens": args.new_tokens, "rows": rows},
                  open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
