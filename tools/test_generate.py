#!/usr/bin/env python3
"""nextron-generate against transformers' generate, end to end through its command line.

    python tools/test_generate.py --generate build/nextron-generate --train build/nextron-train --work build/generate_test

1. Every HF fixture model (tests/fixtures/*: dense, hybrid DeltaNet + attention + MoE, unnormalised top-k), prompts of
   3, 64, 70 and 130 tokens (inside, at and across the delta rule's 64-token chunk) decoded together as one batch:
   the greedy tokens equal transformers' generate (fp32, CPU, each prompt on its own) exactly, and every step's
   logits agree within 1e-4 of their scale (fp32 both sides; observed ~1e-6).
2. A tiny model trained here on byte-tokenized text (nextron-train --save --export-hf): greedy text from the
   training checkpoint with --tokenizer byte equals transformers' generate on the exported HF weights, and equals
   nextron-generate reading the export; the JSON's text is the UTF-8 decoding of its ids.
3. Sampling: a seed gives the same tokens twice and another seed others; top-k 1 is greedy. A stop string cuts the
   text before it (finish_reason "stop"); an EOS id ends the sequence ("eos").
4. Training samples (nextron-train --sample-interval --sample-prompts): every prompt at every interval in
   SAVE/samples.jsonl, the last equal to nextron-generate on the final checkpoint.
5. Bad input (a prompt past max_position_embeddings, an unknown tokenizer, an id outside the vocabulary, text without
   a tokenizer, a malformed prompt file, sample options without their partners) fails with exit code 1 and a message
   naming the problem.
Only WORK is written. Prints "generate: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys

from checks import Checks
from train_test_data import fresh_byte_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
HF_GENERATE = os.path.join(REPO, "tools", "nextron_tools", "hf_generate.py")
TINY = os.path.join(REPO, "configs", "models", "qwen3-next-tiny.json")
LOGIT_RTOL = 1e-4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = os.path.abspath(args.work)
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    check = Checks()

    def nextron(*extra, timeout=300):
        r = subprocess.run([args.generate, "--threads", "2", *extra], capture_output=True, text=True, timeout=timeout)
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()] if r.returncode == 0 else []
        return r, lines

    def reference(model, prompts, n, eos=None):
        pj, out = os.path.join(w, "ref_prompts.json"), os.path.join(w, "ref_out.json")
        json.dump(prompts, open(pj, "w"))
        cmd = [sys.executable, HF_GENERATE, "--model", model, "--prompts-json", pj, "--max-new-tokens", str(n),
               "--out", out] + (["--eos-id", str(eos)] if eos is not None else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"hf_generate.py failed: {r.stderr[-2000:]}")
        return json.load(open(out))

    def worst_logit_error(got, want):
        worst = 0.0
        for g_row, w_row in zip(got, want):
            scale = max(abs(x) for x in w_row)
            worst = max(worst, max(abs(a - b) for a, b in zip(g_row, w_row)) / scale)
        return worst

    # 1. The fixture models, a batch of prompts of different lengths.
    for name in sorted(os.listdir(FIXTURES)):
        model = os.path.join(FIXTURES, name)
        if not os.path.exists(os.path.join(model, "golden.safetensors")):
            continue
        vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
        rng = random.Random(name)
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 64, 70, 130)]
        pf = os.path.join(w, f"{name}.jsonl")
        with open(pf, "w") as f:
            for p in prompts:
                f.write(json.dumps({"ids": p}) + "\n")
        want = reference(model, prompts, 10)
        r, got = nextron("--model", model, "--prompt-file", pf, "--max-new-tokens", "10", "--ignore-eos",
                         "--output-logits", "--batch-size", "4")
        if not check(f"{name}: nextron-generate runs", r.returncode == 0 and len(got) == 4, r.stderr[-800:]):
            continue
        for g, ref in zip(got, want):
            n = len(g["prompt_ids"])
            check(f"{name}, prompt of {n}: greedy tokens equal transformers' generate", g["ids"] == ref["ids"],
                  f"nextron {g['ids']} transformers {ref['ids']}")
            err = worst_logit_error(g["logits"], ref["logits"])
            check(f"{name}, prompt of {n}: every step's logits within {LOGIT_RTOL} ({err:.1e})", err < LOGIT_RTOL)
            check(f"{name}, prompt of {n}: finish_reason length", g["finish_reason"] == "length", g["finish_reason"])

    # 2. A model trained here, byte tokenizer, text prompts; the training checkpoint and its HF export.
    data = fresh_byte_dataset(os.path.join(w, "data"))
    save, export = os.path.join(w, "save"), os.path.join(w, "hf")
    texts = ["The model ", "nextron-train --data", "Qwen3-Next stacks hybrid layers (Gated DeltaNet or gated"]
    sample_prompts = os.path.join(w, "sample_prompts.txt")
    open(sample_prompts, "w").write("\n".join(texts) + "\n")
    train = [args.train, "--model-config", TINY, "--data", data, "--seq-len", "64", "--micro-batch-size", "4",
             "--global-batch-size", "8", "--train-steps", "60", "--lr", "3e-3", "--no-progress", "--threads", "2"]
    r = subprocess.run(train + ["--save", save, "--export-hf", export, "--sample-interval", "30", "--sample-prompts",
                                sample_prompts, "--sample-max-new-tokens", "24"],
                       capture_output=True, text=True, timeout=900)
    if check("tiny model trained on bytes", r.returncode == 0, r.stdout[-500:] + r.stderr[-800:]):
        samples = [json.loads(x) for x in open(os.path.join(save, "samples.jsonl"))]
        check("training samples: every prompt at steps 30 and 60 in SAVE/samples.jsonl",
              [(x["step"], x["prompt"]) for x in samples] == [(st, t) for st in (30, 60) for t in texts],
              str([(x["step"], x["prompt"]) for x in samples]))
        rs, final = nextron("--model", save, "--tokenizer", "byte", *sum((["--prompt", t] for t in texts), []),
                            "--max-new-tokens", "24")
        check("training samples at the last step equal nextron-generate on the final checkpoint",
              final and [x["ids"] for x in samples[len(texts):]] == [g["ids"] for g in final] and
              [x["text"] for x in samples[len(texts):]] == [g["text"] for g in final], rs.stderr[-400:])
        r, got = nextron("--model", save, "--tokenizer", "byte", *sum((["--prompt", t] for t in texts), []),
                         "--max-new-tokens", "24", "--ignore-eos")
        check("trained model: generates from the training checkpoint", r.returncode == 0 and len(got) == 3,
              r.stderr[-800:])
        if got:
            want = reference(export, [list(t.encode()) for t in texts], 24)
            for g, ref, t in zip(got, want, texts):
                check(f"trained model, prompt {t!r}: greedy tokens equal transformers' generate on the export",
                      g["ids"] == ref["ids"], f"nextron {g['ids']} transformers {ref['ids']}")
                check(f"trained model, prompt {t!r}: prompt_ids are its UTF-8 bytes",
                      g["prompt_ids"] == list(t.encode()), str(g["prompt_ids"][:10]))
                check(f"trained model, prompt {t!r}: text is the bytes of its ids",
                      g["text"] == bytes(i for i in g["ids"] if i < 256).decode("utf-8", "replace"), g["text"])
            r2, got2 = nextron("--model", export, "--tokenizer", "byte", *sum((["--prompt", t] for t in texts), []),
                               "--max-new-tokens", "24", "--ignore-eos")
            check("trained model: the HF export generates the same tokens as the training checkpoint",
                  r2.returncode == 0 and [g["ids"] for g in got2] == [g["ids"] for g in got], r2.stderr[-400:])
            print("sample:", json.dumps(got[0]["prompt"] + got[0]["text"]))

            # 3. Sampling, stop strings and EOS on the trained model.
            sample = ["--model", save, "--tokenizer", "byte", "--prompt", texts[0], "--max-new-tokens", "24",
                      "--ignore-eos", "--temperature", "1.0", "--top-k", "40", "--top-p", "0.95"]
            ra, a = nextron(*sample, "--seed", "1")
            rb, b = nextron(*sample, "--seed", "1")
            rc, c = nextron(*sample, "--seed", "2")
            check("sampling: the same seed gives the same tokens, another seed others",
                  a and b and c and a[0]["ids"] == b[0]["ids"] and a[0]["ids"] != c[0]["ids"],
                  f"{ra.stderr[-300:]} {a and a[0]['ids']} {c and c[0]['ids']}")
            rk, k1 = nextron("--model", save, "--tokenizer", "byte", "--prompt", texts[0], "--max-new-tokens", "24",
                             "--ignore-eos", "--temperature", "0.7", "--top-k", "1", "--seed", "5")
            check("sampling: top-k 1 is greedy", k1 and k1[0]["ids"] == got[0]["ids"], rk.stderr[-300:])
            greedy = got[0]["text"]
            stop = greedy[5:8] if len(greedy) >= 8 else None
            if check("stop string: the greedy text is long enough to pick one", stop is not None and stop.strip(),
                     repr(greedy)):
                rs, s = nextron("--model", save, "--tokenizer", "byte", "--prompt", texts[0], "--max-new-tokens",
                                "24", "--ignore-eos", "--stop", stop)
                cut = greedy[:greedy.find(stop)]
                check(f"stop string {stop!r}: the text ends before it, finish_reason stop",
                      s and s[0]["finish_reason"] == "stop" and s[0]["text"] == cut,
                      f"{rs.stderr[-300:]} {s and s[0]}")
            eos = got[0]["ids"][3]
            re_, e = nextron("--model", save, "--tokenizer", "byte", "--prompt", texts[0], "--max-new-tokens", "24",
                             "--eos-id", str(eos))
            first = got[0]["ids"].index(eos)
            check(f"--eos-id {eos}: the sequence ends at its first occurrence, finish_reason eos",
                  e and e[0]["finish_reason"] == "eos" and e[0]["ids"] == got[0]["ids"][:first + 1],
                  f"{re_.stderr[-300:]} {e and e[0]}")

    # 5. Bad input.
    short = os.path.join(w, "short_limit")
    shutil.copytree(os.path.join(FIXTURES, "hybrid_moe"), short)
    cfg = json.load(open(os.path.join(short, "config.json")))
    cfg["max_position_embeddings"] = 16
    json.dump(cfg, open(os.path.join(short, "config.json"), "w"))
    bad_config = os.path.join(w, "bad_generation_config")
    shutil.copytree(os.path.join(FIXTURES, "hybrid_moe"), bad_config)
    open(os.path.join(bad_config, "generation_config.json"), "w").write("{not json")
    bad_file = os.path.join(w, "bad.jsonl")
    open(bad_file, "w").write('{"ids": [1, 2, "x"]}\n')
    hm = os.path.join(FIXTURES, "hybrid_moe")
    cases = [
        ("a prompt past the model's limit", ["--model", short, "--prompt-ids", " ".join(["1"] * 12),
                                             "--max-new-tokens", "8"],
         "exceeds the model's limit of 16 positions"),
        ("an unknown tokenizer", ["--model", hm, "--tokenizer", os.path.join(w, "missing.json"), "--prompt", "x"],
         "missing.json"),
        ("an id outside the vocabulary", ["--model", hm, "--prompt-ids", "5 96"], "token id 96 is outside"),
        ("text without a tokenizer", ["--model", hm, "--prompt", "hello"], "text prompts need --tokenizer"),
        ("a malformed prompt file", ["--model", hm, "--prompt-file", bad_file], "not an integer token id"),
        ("no prompts", ["--model", hm], "no prompts"),
        ("a model folder without a checkpoint", ["--model", w, "--prompt-ids", "1"], "holds neither config.json"),
        ("--out a directory", ["--model", hm, "--prompt-ids", "1", "--out", w], "is a directory"),
        ("a generation_config.json that is not JSON", ["--model", bad_config, "--prompt-ids", "1"],
         "is not a JSON object"),
    ]
    for what, extra, expect in cases:
        r = subprocess.run([args.generate, *extra], capture_output=True, text=True, timeout=120)
        check(f"bad input, {what}: exit 1 naming it", r.returncode == 1 and expect in r.stderr,
              f"rc {r.returncode}: {r.stderr[-400:]}")
    out_file = os.path.join(w, "out.jsonl")
    r = subprocess.run([args.generate, "--model", hm, "--prompt-ids", "1 2 3", "--max-new-tokens", "4", "--out",
                        out_file], capture_output=True, text=True, timeout=120)
    lines = open(out_file).read().splitlines() if os.path.exists(out_file) else []
    check("--out: one JSON line written, renamed from OUT.partial", r.returncode == 0 and len(lines) == 1 and
          len(json.loads(lines[0])["ids"]) == 4 and not os.path.exists(out_file + ".partial"), r.stderr[-300:])
    long_prompts = os.path.join(w, "long_prompts.txt")
    open(long_prompts, "w").write("x" * 4090 + "\n")
    train_cases = [
        ("--sample-interval without prompts", ["--save", os.path.join(w, "s1"), "--sample-interval", "5"],
         "--sample-interval needs --sample-prompts FILE"),
        ("--sample-prompts that does not exist", ["--save", os.path.join(w, "s2"), "--sample-interval", "5",
                                                  "--sample-prompts", os.path.join(w, "nope.txt")],
         "--sample-prompts '" + os.path.join(w, "nope.txt") + "' does not exist"),
        ("a sample prompt past max_position_embeddings", ["--save", os.path.join(w, "s3"), "--sample-interval", "5",
                                                          "--sample-prompts", long_prompts],
         "it exceeds the model's 4096 positions"),
    ]
    for what, extra, expect in train_cases:
        r = subprocess.run(train + extra, capture_output=True, text=True, timeout=120)
        check(f"nextron-train bad input, {what}: exit 1 naming it", r.returncode == 1 and expect in r.stderr,
              f"rc {r.returncode}: {r.stderr[-400:]}")
    return check.report("generate")


if __name__ == "__main__":
    raise SystemExit(main())
