#!/usr/bin/env python3
"""Tests of tools/preprocess.py: text / folder / JSON Lines / JSON array inputs, the byte tokenizer and an HF
tokenizer.json trained on the fly (no download), the HDF5 contents read back with h5py, the error messages for bad
inputs, atomic writing, and (with --unit-tests) nextron's C++ reader on the files it wrote.

    /root/.cache/nextron/venv/bin/python tools/test_preprocess.py [--unit-tests build/nextron_unit_tests] [--work DIR]

CTest runs it as `preprocess`. Exit code 0 when every check passes, 1 otherwise; the last line is
"preprocess: N passed, M failed". Only WORK/ (default: a fresh temporary folder) is written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import preprocess  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gated DeltaNet layers alternate with gated attention layers.",
    "Mixture of experts routes every token to a few experts.",
    "Naïve café déjà vu — unicode text survives tokenization.",
    "Numbers like 12345 and symbols like {}[]() appear in code.",
]


class Checks:
    def __init__(self):
        self.passed: list[str] = []
        self.failed: list[str] = []

    def run(self, name: str, fn, *args) -> None:
        try:
            detail = fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            msg = str(e) if isinstance(e, AssertionError) else "".join(traceback.format_exception(e)).strip()
            print(f"FAIL {name}: {msg}")
            self.failed.append(name)
            return
        print(f"ok   {name}" + (f": {detail}" if detail else ""))
        self.passed.append(name)


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def run_pp(argv: list[str]) -> tuple[int, str, str]:
    """Runs preprocess.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = preprocess.main(argv)
    return code, out.getvalue(), err.getvalue()


def run_ok(argv: list[str]) -> str:
    code, out, err = run_pp(argv)
    expect(code == 0, f"preprocess {' '.join(argv)} failed with {code}: {err.strip()}")
    return out.strip()


def expect_error(argv: list[str], *words: str) -> str:
    code, _, err = run_pp(argv)
    expect(code == 1, f"preprocess {' '.join(argv)} exited {code}, expected 1; stderr: {err.strip()}")
    for w in words:
        expect(w in err, f"'{w}' not in the error message: {err.strip()}")
    return err.strip().splitlines()[-1]


def read_h5(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        expect(f["tokens"].dtype == np.dtype("<u4"), f"tokens dtype {f['tokens'].dtype}, expected uint32")
        expect(f["doc_offsets"].dtype == np.dtype("<i8"), f"doc_offsets dtype {f['doc_offsets'].dtype}")
        expect(f["tokens"].ndim == 1 and f["doc_offsets"].ndim == 1, "datasets must be 1-D")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        attrs = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in attrs.items()}  # fixed-length
        return f["tokens"][:], f["doc_offsets"][:], attrs


def check_file(path: str, docs: list[list[int]], tokenizer: str, name: str, vocab: int, eos: int) -> dict:
    """The file holds exactly `docs` (each followed by eos) and the expected attributes."""
    tokens, offsets, attrs = read_h5(path)
    want = [t for d in docs for t in d + [eos]]
    expect(tokens.tolist() == want, f"tokens {tokens.tolist()[:40]}... differ from the expected {want[:40]}...")
    want_offsets = np.cumsum([0] + [len(d) + 1 for d in docs]).tolist()
    expect(offsets.tolist() == want_offsets, f"doc_offsets {offsets.tolist()} != {want_offsets}")
    want_attrs = {"format": "nextron-tokens", "format_version": 1, "tokenizer": tokenizer, "tokenizer_name": name,
                  "vocab_size": vocab, "eos_id": eos, "num_docs": len(docs), "num_tokens": len(want)}
    for k, v in want_attrs.items():
        expect(attrs.get(k) == v, f"attribute {k} = {attrs.get(k)!r}, expected {v!r}")
    header = f"nextron-tokens\n1\n{tokenizer}\n{name}\n{vocab}\n{eos}\n{len(docs)}\n{len(want)}\n".encode()
    crc = zlib.crc32(np.asarray(want_offsets, dtype="<i8").tobytes(), zlib.crc32(header))
    expect(attrs.get("metadata_crc32") == crc, f"metadata_crc32 = {attrs.get('metadata_crc32')!r}, expected {crc}")
    with open(path, "rb") as f:
        superblock = f.read(9)
    expect(superblock[:8] == b"\x89HDF\r\n\x1a\n" and superblock[8] == 3,
           f"superblock version {superblock[8]}, expected 3 (HDF5 1.10's format, with metadata checksums)")
    return attrs


def utf8(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def write(path: str, content) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(lines) -> str:
    return "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)


# ---------------------------------------------------------------------------------------------------------------------


def t_byte_text(work: str) -> str:
    src = write(f"{work}/in/story.txt", "Once upon a time,\nthere was a café.\n")
    out = f"{work}/story.h5"
    msg = run_ok([src, "--out", out, "--tokenizer", "byte"])
    check_file(out, [utf8("Once upon a time,\nthere was a café.\n")], "byte", "byte", 257, 256)
    return msg


def t_byte_folder(work: str) -> None:
    root = f"{work}/folder"
    shutil.rmtree(root, ignore_errors=True)
    write(f"{root}/b/c.txt", "c")
    write(f"{root}/a.txt", "a")
    write(f"{root}/b/d.md", "d")
    write(f"{root}/b/e.jsonl", jsonl([{"text": "e1"}, {"text": "e2"}]))
    write(f"{root}/b10/f.txt", "f")
    write(f"{root}/b2/g.txt", "g")
    write(f"{root}/.hidden.txt", "hidden")
    write(f"{root}/.git/h.txt", "hidden dir")
    write(f"{root}/empty.txt", "")
    out = f"{work}/folder.h5"
    msg = run_ok([root, "--out", out, "--tokenizer", "byte"])
    # Sorted by path components: a.txt, b/..., b10/..., b2/..., empty.txt (skipped); hidden entries skipped.
    check_file(out, [utf8(x) for x in ["a", "c", "d", "e1", "e2", "f", "g"]], "byte", "byte", 257, 256)
    expect("1 empty documents skipped" in msg, f"summary does not mention the skipped empty file: {msg}")
    run_ok([root, "--out", out, "--tokenizer", "byte", "--glob", "*.txt"])
    check_file(out, [utf8(x) for x in ["a", "c", "f", "g"]], "byte", "byte", 257, 256)


def t_byte_jsonl(work: str) -> None:
    src = write(f"{work}/in/docs.jsonl", jsonl([{"text": "héllo wörld", "id": 1}, "", {"text": ""},
                                                {"text": "line\nbreak", "meta": {"x": 1}}, "   "]))
    out = f"{work}/docs.h5"
    run_ok([src, "--out", out, "--tokenizer", "byte"])
    check_file(out, [utf8("héllo wörld"), utf8("line\nbreak")], "byte", "byte", 257, 256)
    src2 = write(f"{work}/in/other_key.jsonl", jsonl([{"content": "one"}, {"content": "two"}]))
    run_ok([src2, "--out", out, "--tokenizer", "byte", "--json-key", "content"])
    check_file(out, [utf8("one"), utf8("two")], "byte", "byte", 257, 256)
    # Several inputs: concatenated in the order given.
    a = write(f"{work}/in/x.txt", "x")
    run_ok([a, src, "--out", out, "--tokenizer", "byte"])
    check_file(out, [utf8("x"), utf8("héllo wörld"), utf8("line\nbreak")], "byte", "byte", 257, 256)


def t_json_array(work: str) -> None:
    src = write(f"{work}/in/array.json", json.dumps([{"text": "first"}, {"text": "second"}], indent=2))
    out = f"{work}/array.h5"
    run_ok([src, "--out", out, "--tokenizer", "byte"])
    check_file(out, [utf8("first"), utf8("second")], "byte", "byte", 257, 256)
    src2 = write(f"{work}/in/lines.json", jsonl([{"text": "jl"}]))  # .json holding JSON Lines
    run_ok([src2, "--out", out, "--tokenizer", "byte"])
    check_file(out, [utf8("jl")], "byte", "byte", 257, 256)


def t_forced_format(work: str) -> None:
    raw = jsonl([{"text": "a"}])
    src = write(f"{work}/in/forced.jsonl", raw)
    out = f"{work}/forced.h5"
    run_ok([src, "--out", out, "--tokenizer", "byte", "--format", "text"])
    check_file(out, [utf8(raw)], "byte", "byte", 257, 256)
    src2 = write(f"{work}/in/forced.data", jsonl([{"text": "b"}, {"text": "c"}]))
    run_ok([src2, "--out", out, "--tokenizer", "byte", "--format", "jsonl"])
    check_file(out, [utf8("b"), utf8("c")], "byte", "byte", 257, 256)


def make_hf_tokenizer(work: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    path = f"{work}/tok/tokenizer.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)
    return path


def t_hf_tokenizer(work: str) -> str:
    from tokenizers import Tokenizer

    path = make_hf_tokenizer(work)
    tok = Tokenizer.from_file(path)
    texts = SENTENCES + ["Text the tokenizer never saw: zebra 999 ✓"]
    src = write(f"{work}/in/hf.jsonl", jsonl([{"text": t} for t in texts]))
    out = f"{work}/hf.h5"
    run_ok([src, "--out", out, "--tokenizer", path])
    with open(path, "rb") as f:
        identity = "hf:" + hashlib.sha256(f.read()).hexdigest()
    eos = tok.token_to_id("<|endoftext|>")
    docs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    check_file(out, docs, identity, "tokenizer.json", tok.get_vocab_size(with_added_tokens=True), eos)
    # The folder holding tokenizer.json works too (its name becomes tokenizer_name); another EOS token by name.
    run_ok([src, "--out", out, "--tokenizer", os.path.dirname(path), "--eos-token", "<|pad|>"])
    check_file(out, docs, identity, "tok", tok.get_vocab_size(with_added_tokens=True), tok.token_to_id("<|pad|>"))
    return f"vocab {tok.get_vocab_size()}, {sum(map(len, docs))} tokens"


def t_deterministic(work: str) -> None:
    root = f"{work}/folder"
    a, b = f"{work}/det_a.h5", f"{work}/det_b.h5"
    run_ok([root, "--out", a, "--tokenizer", "byte"])
    run_ok([root, "--out", b, "--tokenizer", "byte"])
    ta, oa, aa = read_h5(a)
    tb, ob, ab = read_h5(b)
    expect(np.array_equal(ta, tb) and np.array_equal(oa, ob) and aa == ab, "two runs on the same input differ")


def t_errors(work: str) -> None:
    tok = make_hf_tokenizer(work)
    out = f"{work}/err.h5"
    missing = f"{work}/in/missing.txt"
    expect_error([missing, "--out", out, "--tokenizer", "byte"], missing, "does not exist")
    empty = write(f"{work}/in/empty.txt", "")
    expect_error([empty, "--out", out, "--tokenizer", "byte"], "no text", "empty")
    blank = write(f"{work}/in/blank.jsonl", "\n\n")
    expect_error([blank, "--out", out, "--tokenizer", "byte"], "no text")
    os.makedirs(f"{work}/in/nothing", exist_ok=True)
    write(f"{work}/in/nothing/a.md", "x")
    expect_error([f"{work}/in/nothing", "--out", out, "--tokenizer", "byte", "--glob", "*.txt"], "no file matching",
                 "*.txt")
    bad = write(f"{work}/in/bad.jsonl", jsonl([{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated']))
    expect_error([bad, "--out", out, "--tokenizer", "byte"], f"{bad}:3", "not valid JSON")
    nokey = write(f"{work}/in/nokey.jsonl", jsonl([{"text": "ok"}, {"body": "no text here"}]))
    expect_error([nokey, "--out", out, "--tokenizer", "byte"], f"{nokey}:2", "'text'", "body", "--json-key")
    notobj = write(f"{work}/in/notobj.jsonl", jsonl([["a", "list"]]))
    expect_error([notobj, "--out", out, "--tokenizer", "byte"], f"{notobj}:1", "JSON object")
    notstr = write(f"{work}/in/notstr.jsonl", jsonl([{"text": 5}]))
    expect_error([notstr, "--out", out, "--tokenizer", "byte"], f"{notstr}:1", "not a string")
    badarr = write(f"{work}/in/badarr.json", json.dumps([{"text": "a"}, {"txt": "b"}]))
    expect_error([badarr, "--out", out, "--tokenizer", "byte"], badarr, "element 1", "'text'")
    latin1 = write(f"{work}/in/latin1.txt", "café".encode("latin-1"))
    expect_error([latin1, "--out", out, "--tokenizer", "byte"], latin1, "not UTF-8")
    src = write(f"{work}/in/ok.txt", "fine")
    expect_error([src, "--out", out, "--tokenizer", f"{work}/no/tokenizer.json"], "tokenizer", "does not exist",
                 "--tokenizer byte")
    expect_error([src, "--out", out, "--tokenizer", tok, "--eos-token", "<|nope|>"], "<|nope|>", "--eos-token",
                 "<|endoftext|>")
    expect_error([src, "--out", f"{work}/no_such_dir/x.h5", "--tokenizer", "byte"], "no_such_dir", "does not exist")
    expect(not os.path.exists(out), "a failed run left an output file")


def t_atomic(work: str) -> None:
    out = f"{work}/atomic.h5"
    good = write(f"{work}/in/atomic_good.txt", "keep me")
    run_ok([good, "--out", out, "--tokenizer", "byte"])
    before = read_h5(out)
    # The bad line comes after a batch of good ones: the failure happens mid-run, after tokens were written.
    bad = write(f"{work}/in/atomic_bad.jsonl", jsonl([{"text": "x" * 100}] * 5000 + ["not json"]))
    expect_error([bad, "--out", out, "--tokenizer", "byte"], f"{bad}:5001")
    after = read_h5(out)
    expect(np.array_equal(before[0], after[0]) and before[2] == after[2], "a failed run changed the existing output")
    leftovers = [n for n in os.listdir(work) if ".tmp-" in n]
    expect(not leftovers, f"temporary files left behind: {leftovers}")


def t_cli(work: str) -> str:
    src = f"{work}/in/story.txt"
    out = f"{work}/cli.h5"
    py = sys.executable
    p = subprocess.run([py, f"{HERE}/preprocess.py", src, "--out", out, "--tokenizer", "byte", "--progress"],
                       capture_output=True, text=True, timeout=120)
    expect(p.returncode == 0, f"exit code {p.returncode}: {p.stderr}")
    expect("100.0%" in p.stderr, f"no progress line on stderr with --progress: {p.stderr!r}")
    expect(p.stdout.startswith("wrote "), f"no summary on stdout: {p.stdout!r}")
    p = subprocess.run([py, f"{HERE}/preprocess.py", src, "--out", out, "--tokenizer", "byte"],
                       capture_output=True, text=True, timeout=120)
    expect(p.returncode == 0 and "%" not in p.stderr, f"progress shown without a terminal: {p.stderr!r}")
    p = subprocess.run([py, f"{HERE}/preprocess.py", f"{work}/in/missing.txt", "--out", out, "--tokenizer", "byte"],
                       capture_output=True, text=True, timeout=120)
    expect(p.returncode == 1 and p.stderr.startswith("preprocess: error: "), f"bad input: {p.returncode} {p.stderr}")
    # An unwritable --out is one error line naming the path, not a traceback.
    for bad in ["/proc/nextron_x.h5", f"{work}/no_such_folder/x.h5"]:
        p = subprocess.run([py, f"{HERE}/preprocess.py", src, "--out", bad, "--tokenizer", "byte"],
                           capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        expect(p.returncode == 1 and len(lines) == 1 and lines[0].startswith("preprocess: error: ") and
               os.path.dirname(bad) in lines[0] and "Traceback" not in p.stderr,
               f"--out {bad}: exit {p.returncode}, stderr {p.stderr!r}")
    return p.stderr.strip()


def t_cpp_reader(work: str, unit_tests: str) -> str:
    expect(os.path.isfile(unit_tests) and os.access(unit_tests, os.X_OK), f"{unit_tests} is not an executable")
    details = []
    for name in ["hf.h5", "folder.h5", "docs.h5"]:
        path = f"{work}/{name}"
        tokens, offsets, attrs = read_h5(path)
        t = [int(x) for x in tokens]
        weighted = 0
        for i, x in enumerate(t):
            weighted = (weighted + (i + 1) * x) % ((1 << 31) - 1)
        env = dict(os.environ, NEXTRON_TEST_DATASET=path, NEXTRON_TEST_DATASET_TOKENS=str(len(t)),
                   NEXTRON_TEST_DATASET_DOCS=str(len(offsets) - 1), NEXTRON_TEST_DATASET_VOCAB=str(attrs["vocab_size"]),
                   NEXTRON_TEST_DATASET_EOS=str(attrs["eos_id"]), NEXTRON_TEST_DATASET_TOKENIZER=attrs["tokenizer"],
                   NEXTRON_TEST_DATASET_SUM=str(sum(t)), NEXTRON_TEST_DATASET_WEIGHTED=str(weighted))
        p = subprocess.run([unit_tests, "--gtest_filter=DataExternal.*"], capture_output=True, text=True, env=env,
                           timeout=120)
        out = p.stdout + p.stderr
        expect(p.returncode == 0 and "[  PASSED  ] 1 test" in out and "SKIPPED" not in out,
               f"nextron's reader on {path}: exit {p.returncode}\n{out[-3000:]}")
        details.append(name)
    return "read back by nextron: " + ", ".join(details)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unit-tests", help="nextron_unit_tests binary: also read the files with nextron's C++ reader")
    ap.add_argument("--work", help="scratch folder (default: a new temporary one, removed afterwards)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="nextron_preprocess_")
    work = os.path.abspath(work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    c = Checks()
    c.run("byte_text_file", t_byte_text, work)
    c.run("byte_folder", t_byte_folder, work)
    c.run("byte_jsonl", t_byte_jsonl, work)
    c.run("json_array", t_json_array, work)
    c.run("forced_format", t_forced_format, work)
    c.run("hf_tokenizer", t_hf_tokenizer, work)
    c.run("deterministic", t_deterministic, work)
    c.run("errors", t_errors, work)
    c.run("atomic_write", t_atomic, work)
    c.run("cli", t_cli, work)
    if args.unit_tests:
        c.run("cpp_reader", t_cpp_reader, work, args.unit_tests)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"preprocess: {len(c.passed)} passed, {len(c.failed)} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
