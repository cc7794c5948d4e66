"""Score a token file with transformers' Qwen3-Next (fp32, CPU) and optionally compare with nextron-eval's output.

    python tools/hf_eval.py --model HF_DIR --tokens tokens.txt [--compare NEXTRON_EVAL_OUT_DIR] [--out DIR]

Prints transformers' token-weighted mean loss; with --compare, also the largest logit and per-sequence loss
differences against the .npy files nextron-eval wrote (exit 1 if they exceed --atol).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nextron_tools import hf_reference as ref  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--compare", help="directory with nextron-eval's loss.npy / logits.npy / lengths.npy")
    ap.add_argument("--out", help="write transformers' loss.npy / logits.npy / lengths.npy here")
    ap.add_argument("--atol", type=float, default=1e-3, help="largest logit difference accepted with --compare")
    args = ap.parse_args()
    ref.quiet_transformers()
    model = ref.load_hf_model(args.model)
    seqs = ref.read_token_file(args.tokens)
    with torch.no_grad():
        logits, loss, lengths = ref.eval_sequences(model, seqs)
    mean = float(np.sum(loss.astype(np.float64) * (lengths - 1)) / np.sum(lengths - 1))
    print(f"transformers {ref.versions().get('transformers', '?')}: sequences {len(seqs)}  "
          f"scored tokens {int(np.sum(lengths - 1))}  mean loss {mean:.6f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        np.save(os.path.join(args.out, "logits.npy"), logits)
        np.save(os.path.join(args.out, "loss.npy"), loss)
        np.save(os.path.join(args.out, "lengths.npy"), lengths)
    if args.compare:
        ours_loss = np.load(os.path.join(args.compare, "loss.npy"))
        worst_logit = float("nan")
        logits_path = os.path.join(args.compare, "logits.npy")
        if os.path.exists(logits_path):
            worst_logit = float(np.max(np.abs(np.load(logits_path) - logits)))
        worst_loss = float(np.max(np.abs(ours_loss - loss)))
        print(f"nextron vs transformers: max |logit diff| {worst_logit:.3g}  max |loss diff| {worst_loss:.3g}")
        if not (worst_logit <= args.atol) or not (worst_loss <= args.atol):
            print("MISMATCH beyond --atol", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
