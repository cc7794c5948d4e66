"""Create a randomly initialised HF Qwen3-Next checkpoint from a config.json, with transformers.

    python tools/make_checkpoint.py --config configs/models/qwen3-next-tiny.json --out DIR [--seed 0] [--dtype f32]

Used by the quickstart (a small checkpoint to import without any download) and by benchmarks.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="HF config.json of a qwen3_next model")
    ap.add_argument("--out", required=True, help="output directory (HF checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    torch.manual_seed(args.seed)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**cfg))
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: random Qwen3-Next with {n:,} parameters")


if __name__ == "__main__":
    main()
