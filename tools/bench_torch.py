#!/usr/bin/env python3
"""Baseline throughput: forward + backward tokens/s of HF transformers + torch on CPU for a Qwen3-Next config.

Run:

    /root/.cache/nextron/venv/bin/python tools/bench_torch.py --config configs/models/qwen3-next-tiny.json \\
        --batch 4 --seq 256 --steps 10 --warmup 2 --threads 8

Prints one JSON line:
    {"tokens_per_s": ..., "ms_per_step": ..., "torch": "<version>", "transformers": "<version>",
     "config": ..., "batch": B, "seq": S, "steps": N, "warmup": W, "threads": T,
     "attn_implementation": "eager", "experts_implementation": ..., "params": ..., "loss": ...}

A step is: zero grads, forward with labels (causal-LM loss, plus router_aux_loss_coef * load-balancing loss when
the model has experts), backward. No optimizer step (it is the same elementwise work in any framework and small
next to forward + backward). The model is randomly initialised (transformers' own init; values do not change the
cost, except that MoE routing decides how many tokens each expert gets), fp32, eager attention, no KV cache.
tokens_per_s = B * S * N / (wall time of the N timed steps); ms_per_step = that wall time / N.

--experts-impl picks transformers' experts code path: "eager" (per-expert Python loop, the reference) or its
CPU default "grouped_mm" (batched); the default is transformers' own choice, reported in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nextron_tools import hf_reference as ref  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)

import torch  # noqa: E402
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="path to an HF config.json (or a directory holding one)")
    ap.add_argument("--batch", type=int, required=True, help="sequences per step (B)")
    ap.add_argument("--seq", type=int, required=True, help="tokens per sequence (S)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (N)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (W)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (T)")
    ap.add_argument("--experts-impl", default=None, help="transformers experts_implementation (default: its choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if min(args.batch, args.seq, args.steps, args.threads) < 1 or args.warmup < 0:
        ap.error("batch, seq, steps, threads must be >= 1 and warmup >= 0")

    ref.quiet_transformers()
    ref.assert_torch_kernels()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    path = args.config
    config_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    fields = Qwen3NextConfig.get_config_dict(config_file)[0]
    config = Qwen3NextConfig.from_dict(fields, attn_implementation="eager")
    if args.experts_impl is not None:
        config._experts_implementation = args.experts_impl
    model = Qwen3NextForCausalLM(config).to(torch.float32)
    model.train()  # dropout is 0 in Qwen3-Next; train() is the training configuration being measured
    moe = config.num_experts > 0

    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False, output_router_logits=moe)
        out.loss.backward()
        return out.loss.item()

    loss = float("nan")
    for _ in range(args.warmup):
        loss = step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    elapsed = time.perf_counter() - t0

    result = {
        "tokens_per_s": args.batch * args.seq * args.steps / elapsed,
        "ms_per_step": 1000.0 * elapsed / args.steps,
        **ref.versions(),
        "config": os.path.abspath(config_file),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": model.config._experts_implementation,
        "params": sum(p.numel() for p in model.parameters()),
        "loss": loss,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
