#!/usr/bin/env python3
"""Reference greedy generation with HF transformers' Qwen3NextForCausalLM, for checking nextron-generate.

    python tools/nextron_tools/hf_generate.py --model HF_DIR --prompts-json PROMPTS.json --max-new-tokens N \\
        --out OUT.json [--eos-id ID] [--dtype float32]
    python tools/nextron_tools/hf_generate.py --model HF_DIR --bench --context P --new-tokens T [--seed S]

Generation: PROMPTS.json is a JSON list of token-id lists. Each prompt runs on its own (batch 1, no padding) through
model.generate(do_sample=False, max_new_tokens=N, eos_token_id=--eos-id or None, pad_token_id=0,
output_logits=True, output_scores=True, return_dict_in_generate=True) with the KV / recurrent cache (use_cache=True,
transformers' default: the prompt is one prefill forward, then one forward per new token). OUT.json is
[{"prompt": ids, "ids": new ids, "logits": [[V floats] per new token]}]: the raw logits of the last position at each
step (the token chosen at step k is argmax of logits[k]). Without --eos-id exactly N tokens are generated; with it,
generation stops after that id (it is included in "ids"). The model's own generation_config is not consulted for
eos: the caller decides, as nextron-generate does.

--bench: one random prompt (torch.Generator seeded by --seed) of --context tokens, greedy generation of --new-tokens
with the cache, timed by a streamer: decode tokens/s = (T - 1) / (time of the last token - time of the first), the
first new token coming from the prefill forward, so this is the per-token decode rate alone. Prints one JSON line
{"context": P, "new_tokens": T, "tokens_per_s": ..., "prefill_s": ..., ...}. --warmup runs (default 1) of a short
generation come first.

Everything runs on the CPU in the chosen dtype (float32 by default), eval mode, torch.manual_seed(0), offline,
with transformers' reference code paths (hf_reference.load_hf_model: eager attention and experts; the DeltaNet and
causal-conv torch fallbacks, refusing to run when the optional `fla` / `causal_conv1d` packages would replace them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Run as a script, Python puts this folder first on sys.path, where a module named like a standard-library one would
# shadow it: import the package from tools/ instead.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from nextron_tools import hf_reference as ref  # noqa: E402
import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StepTimer(BaseStreamer):
    """Timestamps generate()'s streamer calls: the first put() is the prompt, each later one a new token."""

    def __init__(self):
        self.times: list[float] = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def load(path: str, dtype: str):
    ref.quiet_transformers()
    ref.set_determinism(torch.get_num_threads())  # torch's default thread count (OMP_NUM_THREADS when set)
    torch.manual_seed(0)
    return ref.load_hf_model(path, dtype=DTYPES[dtype])


def generate(model, prompt: list[int], max_new_tokens: int, eos_id: int | None, streamer=None):
    vocab = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise SystemExit(f"hf_generate.py: prompt token {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    input_ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos_id, pad_token_id=0,
                              use_cache=True, output_logits=True, output_scores=True, return_dict_in_generate=True,
                              streamer=streamer, temperature=None, top_p=None, top_k=None)


def run_prompts(args) -> int:
    with open(args.prompts_json, encoding="utf-8") as f:
        prompts = json.load(f)
    if not isinstance(prompts, list) or not all(
            isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompts):
        raise SystemExit(f"hf_generate.py: {args.prompts_json} must hold a JSON list of non-empty token-id lists")
    model = load(args.model, args.dtype)
    results = []
    for prompt in prompts:
        out = generate(model, prompt, args.max_new_tokens, args.eos_id)
        new = out.sequences[0, len(prompt):].tolist()
        logits = torch.stack([step[0] for step in out.logits]).float()
        # Greedy with no logits processors: the scores are the logits, and each token their argmax.
        assert torch.equal(torch.stack([s[0] for s in out.scores]).float(), logits)
        assert new == logits.argmax(-1).tolist(), "generate's tokens are not the argmax of its logits"
        results.append({"prompt": prompt, "ids": new, "logits": logits.tolist()})
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f)
    os.replace(tmp, args.out)
    versions = ref.versions()
    print(json.dumps({"prompts": len(prompts), "new_tokens": [len(r["ids"]) for r in results], "out": args.out,
                      **versions}))
    return 0


def bench(args) -> int:
    model = load(args.model, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=gen).tolist()
    for _ in range(args.warmup):
        generate(model, prompt[: min(len(prompt), 16)], 4, None)
    timer = StepTimer()
    start = time.perf_counter()
    out = generate(model, prompt, args.new_tokens, None, streamer=timer)
    new = out.sequences.shape[1] - len(prompt)
    assert new == args.new_tokens == len(timer.times), (new, len(timer.times))
    decode_s = timer.times[-1] - timer.times[0]
    print(json.dumps({"context": args.context, "new_tokens": args.new_tokens,
                      "tokens_per_s": (args.new_tokens - 1) / decode_s if args.new_tokens > 1 else None,
                      "prefill_s": timer.times[0] - start, "decode_s": decode_s, "threads": torch.get_num_threads(),
                      "dtype": args.dtype, "device": "cpu", **ref.versions()}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="HF Qwen3-Next folder (config.json + safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--prompts-json", help="JSON list of token-id lists")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate per prompt")
    p.add_argument("--eos-id", type=int, default=None, help="stop after this id (default: never, exactly N tokens)")
    p.add_argument("--out", help="where to write the JSON results")
    p.add_argument("--bench", action="store_true", help="time decode tokens/s instead (see below)")
    p.add_argument("--context", type=int, default=128, help="--bench: prompt length P")
    p.add_argument("--new-tokens", type=int, default=32, help="--bench: tokens to generate T")
    p.add_argument("--seed", type=int, default=0, help="--bench: seed of the random prompt")
    p.add_argument("--warmup", type=int, default=1, help="--bench: short untimed generations first")
    args = p.parse_args(argv)
    if args.bench:
        if args.context < 1 or args.new_tokens < 2:
            p.error("--bench needs --context >= 1 and --new-tokens >= 2")
        return bench(args)
    if not (args.prompts_json and args.max_new_tokens is not None and args.out):
        p.error("pass --prompts-json, --max-new-tokens and --out (or --bench)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return run_prompts(args)


if __name__ == "__main__":
    sys.exit(main())
