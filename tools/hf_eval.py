"""Score a token file with transformers' Qwen3-Next (fp32, CPU) and optionally compare with nextron-eval's output.

    python tools/hf_eval.py --model HF_DIR --tokens tokens.txt [--compare NEXTRON_EVAL_OUT_DIR] [--out DIR]

Prints transformers' token-weighted mean loss; with --compare, also the largest logit and per-sequence loss
differences against the .npy files nextron-eval wrote (exit 1 if they exceed --atol).
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nextron_tools import hf_reference as ref  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def read_token_file(path: str, vocab: int) -> list[list[int]]:
    """nextron-eval's rules, so that row i of both tools' outputs is line i + 1: every line holds at least 2 integer
    ids inside the vocabulary; anything else is an error naming the line (raised as SystemExit, exit code 1)."""
    if not os.path.exists(path):
        sys.exit(f"hf_eval: error: token file '{path}' does not exist")
    if os.path.isdir(path):
        sys.exit(f"hf_eval: error: --tokens '{path}' is a directory; expected a token file")
    seqs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            where = f"token file '{path}' line {lineno}"
            seq = []
            for word in line.split():
                # Python's int() also takes "1_000" and non-ASCII digits, which nextron-eval (std::stoll) does not.
                if not re.fullmatch(r"[+-]?[0-9]+", word):
                    sys.exit(f"hf_eval: error: {where}: '{word}' is not an integer token id")
                v = int(word)
                if not 0 <= v < vocab:
                    sys.exit(f"hf_eval: error: {where}: token id {v} is outside the model's vocabulary [0, {vocab})")
                seq.append(v)
            if not seq:
                sys.exit(f"hf_eval: error: {where} is blank: every line is one sequence; remove it")
            if len(seq) < 2:
                sys.exit(f"hf_eval: error: {where} has 1 token: at least 2 are needed for a next-token loss")
            seqs.append(seq)
    if not seqs:
        sys.exit(f"hf_eval: error: token file '{path}' holds no sequences")
    return seqs


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
    seqs = read_token_file(args.tokens, model.config.vocab_size)
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
