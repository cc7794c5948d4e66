#!/usr/bin/env python3
"""Absurd sizes in a model config.json end to end: nextron-train (--model-config and --init-from), nextron-eval and
nextron-convert exit with code 1 within seconds and a message naming the field, instead of growing memory without
bound. Then a model too large for this machine (the 80B-A3B: 80e9 parameters x 16 bytes of fp32 training buffers)
and a micro-batch whose activations cannot fit are refused by the memory check, naming the bytes needed and
available.

    python tools/test_config_limits.py --train build/nextron-train --work build/config_limits

nextron-eval and nextron-convert are taken from the directory of --train (skipped when absent). Every child runs
under a 4 GiB address-space limit so that a regression fails here instead of exhausting the machine.
Prints "config_limits: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from checks import Checks
from train_test_data import REPO, TINY, fresh_byte_dataset

OFFICIAL = os.path.join(REPO, "configs", "models", "qwen3-next-80b-a3b.json")
ADDRESS_SPACE = 4 << 30
SECONDS = 10  # a refusal is immediate; process start-up is well under a second

# (field, value, text the message must contain)
ABSURD = [
    ("num_experts", 2**31, "'num_experts' is 2147483648, above nextron's limit"),
    ("num_hidden_layers", 10**9, "'num_hidden_layers' is 1000000000, above nextron's limit"),
    ("hidden_size", 2**40, "'hidden_size' is 1099511627776"),
    ("vocab_size", 2**40, "'vocab_size' is 1099511627776"),
    ("intermediate_size", 2**40, "'intermediate_size'"),
    ("moe_intermediate_size", 2**40, "'moe_intermediate_size'"),
    ("shared_expert_intermediate_size", 2**40, "'shared_expert_intermediate_size'"),
    ("num_experts", -1, "'num_experts' must not be negative"),
]


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = args.work
    data = fresh_byte_dataset(w)
    bindir = os.path.dirname(os.path.abspath(args.train))
    tools = {"eval": os.path.join(bindir, "nextron-eval"), "convert": os.path.join(bindir, "nextron-convert")}
    tokens = os.path.join(w, "tokens.txt")
    with open(tokens, "w") as f:
        f.write("1 2 3 4 5 6 7 8\n")
    run_opts = ["--data", data, "--seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
                "--train-steps", "1", "--no-progress", "--threads", "2"]
    check = Checks()


    def expect_refusal(name, cmd, needles):
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, preexec_fn=limit_memory)
        except subprocess.TimeoutExpired:
            check(name, False, "still running after 60 s")
            return
        dt = time.monotonic() - t0
        missing = [n for n in needles if n not in r.stderr]
        check(name, r.returncode == 1 and not missing and dt < SECONDS,
              f"rc {r.returncode}, {dt:.1f} s, missing {missing}, stderr: {r.stderr.strip()[-600:]}")

    def write_config(base, field, value, name):
        cfg = json.load(open(base))
        cfg[field] = value
        d = os.path.join(w, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        path = os.path.join(d, "config.json")
        json.dump(cfg, open(path, "w"), indent=1)
        return d, path

    for i, (field, value, needle) in enumerate(ABSURD):
        d, path = write_config(TINY, field, value, f"absurd_{i}")
        expect_refusal(f"train --model-config {field}={value}", [args.train, "--model-config", path] + run_opts,
                       [needle])
        expect_refusal(f"train --init-from {field}={value}", [args.train, "--init-from", d] + run_opts, [needle])
        if os.path.exists(tools["eval"]):
            expect_refusal(f"eval {field}={value}", [tools["eval"], "--model", d, "--tokens", tokens, "--out",
                                                      os.path.join(w, f"eval_{i}")], [needle])
        if os.path.exists(tools["convert"]):
            expect_refusal(f"convert {field}={value}", [tools["convert"], "--in", d, "--out",
                                                         os.path.join(w, f"convert_{i}")], [needle])
    for name in ("eval", "convert"):
        if not os.path.exists(tools[name]):
            print(f"skip nextron-{name} cases: {tools[name]} not built")

    # Every field within its limit, together 3 x 2^59 parameters: refused at parse time naming the part's fields.
    cfg = json.load(open(OFFICIAL))
    cfg.update(hidden_size=2**17, num_experts=4096, moe_intermediate_size=2**20, num_hidden_layers=1024)
    path = os.path.join(w, "product.json")
    json.dump(cfg, open(path, "w"))
    expect_refusal("train: product of fields at their limits", [args.train, "--model-config", path] + run_opts,
                   ["routed experts", "num_experts x moe_intermediate_size x hidden_size x num_hidden_layers"])

    # Valid configs, too large for this process (the 4 GiB address-space cap makes that certain on any machine):
    # the memory check names the part, the bytes needed and the limit.
    expect_refusal("train: 80B-A3B does not fit", [args.train, "--model-config", OFFICIAL] + run_opts,
                   ["does not fit in memory", "routed experts", "bytes", "RLIMIT_AS"])
    big_batch = list(run_opts)
    # 65536 x 32768 tokens of the tiny model: at least 1.4e13 bytes of activations (sequences shorter than the
    # dataset, which holds ~49k tokens, and no validation split, so that the data checks pass).
    big_batch[big_batch.index("--seq-len") + 1] = "32768"
    big_batch[big_batch.index("--micro-batch-size") + 1] = "65536"
    big_batch[big_batch.index("--global-batch-size") + 1] = "65536"
    expect_refusal("train: activations of a huge micro-batch do not fit", [args.train, "--model-config", TINY] +
                   big_batch + ["--valid-fraction", "0"], ["does not fit in memory", "activations", "--micro-batch-size"])

    sys.exit(check.report("config_limits"))


if __name__ == "__main__":
    main()
