#!/usr/bin/env python3
"""nextron-train end to end through its command line: a short run that saves, resumes and exports, and bad input
(flags, values, files, vocab) failing with exit code 1 and a message naming the problem.

    python tools/test_train_cli.py --train build/nextron-train --work build/train_cli

Prints "train_cli: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import subprocess
import sys

from checks import Checks
from train_test_data import REPO, TINY, fresh_byte_dataset
SMALL_VOCAB = os.path.join(REPO, "tests", "fixtures", "hybrid_moe", "config.json")  # vocab 96 < 257


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = args.work
    data = fresh_byte_dataset(w)
    model_data = ["--model-config", TINY, "--data", data]
    base = model_data + ["--seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
                         "--lr-warmup-steps", "2", "--no-progress", "--threads", "2"]
    check = Checks()

    def run(extra):
        return subprocess.run([args.train] + extra, capture_output=True, text=True, timeout=300)


    def expect_error(name, extra, needle):
        r = run(extra)
        check(name, r.returncode == 1 and needle in r.stderr, f"rc {r.returncode}, stderr: {r.stderr.strip()[:400]}")

    # A run of 4 steps saving at 2, then the same command with --train-steps 6 resumes at 4.
    save = os.path.join(w, "run")
    r = run(base + ["--train-steps", "4", "--save", save, "--save-interval", "2", "--eval-interval", "2",
                    "--valid-fraction", "0.1", "--export-hf", os.path.join(w, "hf")])
    check("train runs", r.returncode == 0, r.stderr[-800:])
    check("logs every step", r.stdout.count("step ") >= 4 and "mfu" in r.stdout, r.stdout[-400:])
    recs = [json.loads(l) for l in open(os.path.join(save, "metrics.jsonl"))]
    check("metrics.jsonl has train and valid records",
          sum(x.get("kind") == "train" for x in recs) == 4 and sum(x.get("kind") == "valid" for x in recs) == 2,
          str(recs[:2]))
    check("checkpoints saved", sorted(d for d in os.listdir(save) if d.startswith("step_")) ==
          ["step_00000002", "step_00000004"], str(os.listdir(save)))
    check("HF export written", os.path.exists(os.path.join(w, "hf", "config.json")))
    # A training checkpoint converts to HF with nextron-convert, identical to the --export-hf of the same weights.
    conv = os.path.join(os.path.dirname(args.train), "nextron-convert")
    r = subprocess.run([conv, "--in", os.path.join(save, "step_00000004"), "--out", os.path.join(w, "hf_from_ckpt")],
                       capture_output=True, text=True)
    same = r.returncode == 0 and open(os.path.join(w, "hf", "model.safetensors"), "rb").read() == \
        open(os.path.join(w, "hf_from_ckpt", "model.safetensors"), "rb").read()
    check("training checkpoint converts to HF", same, r.stderr[-400:])
    r = run(base + ["--train-steps", "6", "--save", save, "--valid-fraction", "0.1"])
    check("resume continues at step 5", r.returncode == 0 and "continuing at step 4" in r.stdout and
          "step 5/6" in r.stdout and "step 1/6" not in r.stdout, r.stdout[-600:] + r.stderr[-400:])

    r = run(base + ["--train-steps", "6", "--save", save, "--valid-fraction", "0.1"])
    check("rerunning a finished run trains nothing", r.returncode == 0 and "nothing to train" in r.stdout and
          "step_00000006" in os.listdir(save), r.stdout[-300:] + r.stderr[-300:])

    # Config file with a command-line override.
    cfg = os.path.join(w, "train.cfg")
    with open(cfg, "w") as f:
        f.write(f"model-config = {TINY}\ndata = {data}\nseq-len = 32\nmicro-batch-size = 2\n"
                "global-batch-size = 2\ntrain-steps = 5\nno-progress = 1\n")
    r = run(["--config-file", cfg, "--train-steps", "1"])
    check("config file + override", r.returncode == 0 and "step 1/1" in r.stdout, r.stdout[-300:] + r.stderr[-300:])

    h = run(["--help"])
    check("--help documents the options", h.returncode == 0 and all(
        o in h.stdout for o in ("--model-config", "--data", "--global-batch-size", "--lr-decay-style", "--resume",
                                "--save-interval", "--export-hf", "--eval-interval", "--peak-tflops",
                                "--context-parallel-order")), h.stdout[:200])
    check("--help says what nextron-train runs on, without a stray caption line",
          h.stdout.startswith("nextron-train: pretrain a Qwen3-Next model, on one process or as an MPI job") and
          "on one process\n" not in h.stdout and not any(l.strip() == ":" for l in h.stdout.splitlines()),
          h.stdout[:300])

    expect_error("abbreviated flag", model_data + ["--train-steps", "1", "--lr-warmup", "3"], "unrecognised option")
    expect_error("unknown flag", model_data + ["--train-steps", "1", "--learning-rate", "3"], "unrecognised option")
    expect_error("bad value", base + ["--train-steps", "many"], "train-steps")
    expect_error("unknown context-parallel order", model_data + ["--train-steps", "1", "--context-parallel-order", "ring"],
                 "--context-parallel-order 'ring': use zigzag (the default) or contiguous")
    expect_error("zero seq-len", model_data + ["--train-steps", "1", "--seq-len", "0"], "--seq-len must be positive")
    expect_error("negative lr", base + ["--train-steps", "1", "--lr", "-1"], "lr")
    expect_error("batch not a multiple", model_data + ["--train-steps", "1", "--micro-batch-size", "2",
                                                       "--global-batch-size", "3"],
                 "multiple of --micro-batch-size")
    expect_error("unknown decay style", base + ["--train-steps", "1", "--lr-decay-style", "exp"], "exp")
    expect_error("missing data", ["--model-config", TINY, "--data", os.path.join(w, "nope.h5"), "--train-steps", "1"],
                 "nope.h5")
    bad = os.path.join(w, "corrupt.h5")
    with open(bad, "wb") as f:
        f.write(b"this is not an HDF5 file" * 10)
    expect_error("corrupt data", ["--model-config", TINY, "--data", bad, "--train-steps", "1"], "corrupt.h5")
    expect_error("vocab mismatch", ["--model-config", SMALL_VOCAB, "--data", data, "--train-steps", "1",
                                    "--seq-len", "32"], "vocab")
    expect_error("no model", ["--data", data, "--train-steps", "1"], "--model-config")
    expect_error("missing model config", ["--model-config", os.path.join(w, "none.json"), "--data", data,
                                          "--train-steps", "1"], "none.json")
    return check.report("train_cli")


if __name__ == "__main__":
    sys.exit(main())
