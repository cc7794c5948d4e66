#!/usr/bin/env python3
"""nextron-eval and nextron-convert end to end through their command lines: bad token files, paths and checkpoint
indexes fail with exit code 1 and a message naming the problem; good input still works (controls).

    python tools/test_eval_cli.py --eval build/nextron-eval --convert build/nextron-convert --work build/eval_cli

Uses the committed HF checkpoint tests/fixtures/hybrid_moe (vocab 96, a few hundred KB) directly, so it needs no
transformers and runs in seconds. Only WORK is written (its contents are replaced). Prints
"eval_cli: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

from checks import Checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "hybrid_moe")
VOCAB = 96
TIMEOUT_S = 120


def safetensors_names(path):
    """Tensor names in a safetensors file (8-byte little-endian header length, then a JSON header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", required=True, help="path to the nextron-eval binary")
    ap.add_argument("--convert", required=True, help="path to the nextron-convert binary")
    ap.add_argument("--work", required=True, help="scratch directory (its contents are replaced)")
    args = ap.parse_args()
    evaluate, convert = os.path.abspath(args.eval), os.path.abspath(args.convert)
    w = os.path.abspath(args.work)
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    check = Checks()


    def run(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                               env=dict(os.environ, OMP_NUM_THREADS="2"))
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {TIMEOUT_S} s"
        return p.returncode, (p.stdout + p.stderr).strip()

    def expect_error(name, cmd, *needles):
        """Exit code 1, one error line that contains every needle."""
        rc, out = run(cmd)
        missing = [n for n in needles if n not in out]
        check(name, rc == 1 and not missing, f"exit code {rc}, missing {missing!r} in output:\n{out[-2000:]}")

    def tokens_file(name, text):
        path = os.path.join(w, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def eval_cmd(tokens, out=None, model=FIXTURE):
        return [evaluate, "--model", model, "--tokens", tokens, "--out", out or os.path.join(w, "eval_out"),
                "--threads", "2"]

    # --- nextron-eval: a good file; rows follow lines even with unsorted lengths (batching groups equal lengths) --
    lines = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13], [VOCAB - 1, 0, 5]]
    good = tokens_file("good.txt", "".join(" ".join(map(str, s)) + "\n" for s in lines))
    out = os.path.join(w, "good_out")
    rc, text = run(eval_cmd(good, out) + ["--batch-size", "2"])
    check("eval: good file scores", rc == 0 and "sequences 4" in text, f"exit code {rc}:\n{text[-2000:]}")
    if rc == 0:
        loss, lengths = np.load(os.path.join(out, "loss.npy")), np.load(os.path.join(out, "lengths.npy"))
        check("eval: lengths.npy row i is line i+1", lengths.tolist() == [len(s) for s in lines], lengths.tolist())
        check("eval: every loss is finite", loss.shape == (4,) and bool(np.all(np.isfinite(loss))), loss.tolist())
        # The same sequence alone must score the same as in the mixed file: the row really is that line.
        rc2, text2 = run(eval_cmd(tokens_file("one.txt", "7 8\n"), os.path.join(w, "one_out")))
        one = np.load(os.path.join(w, "one_out", "loss.npy")) if rc2 == 0 else None
        check("eval: row 1 is line 2's loss", one is not None and abs(float(one[0]) - float(loss[1])) < 1e-5,
              f"{text2[-500:]} {one} vs {loss.tolist()}")
    crlf = tokens_file("crlf.txt", "1 2 3\r\n4 5\r\n")
    rc, text = run(eval_cmd(crlf))
    check("eval: CRLF line ends are accepted", rc == 0 and "sequences 2" in text, text[-1000:])

    # --- nextron-eval: bad token files name the line --------------------------------------------------------------
    expect_error("eval: one-token line", eval_cmd(tokens_file("short.txt", "1 2 3\n4 5\n6\n7 8\n")),
                 "line 3 has 1 token", "at least 2 are needed")
    expect_error("eval: blank line", eval_cmd(tokens_file("blank.txt", "1 2 3\n\n4 5\n")), "line 2 is blank",
                 "loss.npy row i belongs to line i + 1")
    expect_error("eval: whitespace-only line", eval_cmd(tokens_file("spaces.txt", "1 2 3\n4 5\n  \t \n")),
                 "line 3 is blank")
    expect_error("eval: trailing blank line", eval_cmd(tokens_file("trail.txt", "1 2 3\n\n")), "line 2 is blank")
    expect_error("eval: id outside the vocabulary", eval_cmd(tokens_file("vocab.txt", "1 2\n3 99999 4\n")),
                 "line 2", "token id 99999", f"vocabulary [0, {VOCAB})")
    expect_error("eval: id = vocab size", eval_cmd(tokens_file("vocab2.txt", f"1 {VOCAB}\n")), "line 1",
                 f"token id {VOCAB} ")
    expect_error("eval: negative id", eval_cmd(tokens_file("neg.txt", "1 2\n1 2\n1 -1\n")), "line 3",
                 "token id -1 ")
    expect_error("eval: non-numeric token", eval_cmd(tokens_file("word.txt", "1 2\n3 abc 4\n")), "line 2",
                 "'abc' is not an integer token id")
    expect_error("eval: non-integer number", eval_cmd(tokens_file("float.txt", "1 2.5\n")), "line 1",
                 "'2.5' is not an integer token id")
    expect_error("eval: empty file", eval_cmd(tokens_file("empty.txt", "")), "holds no sequences")
    tok_dir = os.path.join(w, "tokens_dir")
    os.makedirs(tok_dir)
    expect_error("eval: --tokens is a directory", eval_cmd(tok_dir), "is a directory", "expected a token file")
    expect_error("eval: --tokens does not exist", eval_cmd(os.path.join(w, "nope.txt")), "nope.txt' does not exist")
    not_dir = tokens_file("out_is_a_file", "x")
    expect_error("eval: --out is a file", eval_cmd(good, not_dir), "exists and is not a directory")
    expect_error("eval: --model does not exist", eval_cmd(good, model=os.path.join(w, "no_model")), "does not exist")
    expect_error("eval: --model is a file", eval_cmd(good, model=os.path.join(FIXTURE, "config.json")),
                 "is a file, not an HF checkpoint directory")

    # --- nextron-convert: --out must not exist -----------------------------------------------------------------
    new = os.path.join(w, "converted")
    rc, text = run([convert, "--in", FIXTURE, "--out", new])
    check("convert: new --out is written", rc == 0 and os.path.isfile(os.path.join(new, "config.json")), text[-1000:])
    slash = os.path.join(w, "converted_slash")
    rc, text = run([convert, "--in", FIXTURE, "--out", slash + "/"])
    check("convert: --out with a trailing slash", rc == 0 and os.path.isfile(os.path.join(slash, "config.json"))
          and not os.path.exists(slash + ".partial"), text[-1000:])
    empty = os.path.join(w, "empty_out")
    os.makedirs(empty)
    expect_error("convert: existing empty --out", [convert, "--in", FIXTURE, "--out", empty], "already exists",
                 "give a path that does not exist yet")
    check("convert: refused --out left alone", os.listdir(empty) == [] and not os.path.exists(empty + ".partial"),
          str(os.listdir(empty)))
    expect_error("convert: existing non-empty --out", [convert, "--in", FIXTURE, "--out", new], "already exists")
    expect_error("convert: --out is a file", [convert, "--in", FIXTURE, "--out", not_dir], "already exists")
    expect_error("convert: --in does not exist", [convert, "--in", os.path.join(w, "nope"), "--out",
                                                  os.path.join(w, "c2")], "does not exist")

    # --- safetensors index entries must be plain file names inside the checkpoint ------------------------------
    names = safetensors_names(os.path.join(FIXTURE, "model.safetensors"))
    outside = os.path.join(w, "x")
    os.makedirs(outside)
    shutil.copy(os.path.join(FIXTURE, "model.safetensors"), outside)

    def indexed_checkpoint(name, entry):
        """FIXTURE's config with an index mapping every tensor to `entry` (the file it points at does exist)."""
        d = os.path.join(w, name)
        os.makedirs(d)
        shutil.copy(os.path.join(FIXTURE, "config.json"), d)
        shutil.copy(os.path.join(FIXTURE, "model.safetensors"), os.path.join(d, "shard.safetensors"))
        index = os.path.join(d, "model.safetensors.index.json")
        with open(index, "w") as f:
            json.dump({"metadata": {}, "weight_map": {n: entry for n in names}}, f)
        return d, index

    d, index = indexed_checkpoint("idx_ok", "shard.safetensors")
    out = os.path.join(w, "idx_ok_out")
    rc, text = run([convert, "--in", d, "--out", out])
    check("convert: index with plain shard names", rc == 0, text[-1000:])
    for label, entry in [("relative ../", "../x/model.safetensors"),
                         ("absolute", os.path.join(outside, "model.safetensors")),
                         ("subdirectory", "sub/shard.safetensors")]:
        d, index = indexed_checkpoint("idx_" + label.split()[0].strip("./"), entry)
        if label == "subdirectory":
            os.makedirs(os.path.join(d, "sub"))
            shutil.copy(os.path.join(d, "shard.safetensors"), os.path.join(d, "sub"))
        expect_error(f"convert: index entry {label}", [convert, "--in", d, "--out", d + "_out"],
                     f"'{entry}'", index, "not a plain file name")
        check(f"convert: index entry {label} writes nothing", not os.path.exists(d + "_out"), d + "_out exists")
    d, index = indexed_checkpoint("idx_eval", "../x/model.safetensors")
    expect_error("eval: index entry outside the checkpoint", eval_cmd(good, model=d), "'../x/model.safetensors'",
                 index)
    d, index = indexed_checkpoint("idx_missing", "model-00002-of-00002.safetensors")
    expect_error("convert: index entry names a missing shard", [convert, "--in", d, "--out", d + "_out"],
                 "'model-00002-of-00002.safetensors'", "has no such file")

    return check.report("eval_cli")


if __name__ == "__main__":
    sys.exit(main())
