#!/usr/bin/env python3
"""Encode (or decode) text with an HF tokenizer.json through the `tokenizers` library, for nextron's C++ side.

    python tools/nextron_tools/hf_tokenize.py encode TOKENIZER_JSON < texts.json > ids.json
    python tools/nextron_tools/hf_tokenize.py decode TOKENIZER_JSON < ids.json > texts.json

encode: stdin is a JSON list of strings; stdout is a JSON list of id lists, Tokenizer.encode(text,
add_special_tokens=False).ids for each (no BOS/EOS or template tokens: the caller decides about those).
decode: stdin is a JSON list of id lists; stdout is a JSON list of Tokenizer.decode(ids, skip_special_tokens=False).

Why Python: byte-level BPE encoding needs the pre-tokenizer's Unicode-category regexes, NFC normalization and the
merges exactly as the library does them; src/generate/tokenizer.cpp (nextron-generate) runs this script once per
encode call and decodes in C++ itself. TOKENIZER_JSON may also be the folder holding tokenizer.json.

stdin and stdout are UTF-8 JSON whatever the locale (stdout is ASCII-escaped JSON). Errors (a missing
`tokenizers` package, a bad file, bad input) are one line on stderr and exit status 2.
"""

import os
import sys

# Run as a script, Python puts this folder first on sys.path, where this file would shadow the standard library's
# `tokenize` module (which linecache, inspect and others import). Drop it before anything else is imported.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import json  # noqa: E402


def fail(message: str) -> "NoReturn":  # noqa: F821
    sys.stderr.write(f"hf_tokenize.py: {message}\n")
    sys.exit(2)


def load(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        fail(f"cannot import the `tokenizers` package ({e}) into {sys.executable}: install it (pip install "
             "tokenizers; tools/setup.sh sets up ~/.cache/nextron/venv with it) or point NEXTRON_PYTHON at a Python "
             "that has it")
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        fail(f"tokenizer '{path}' does not exist: pass an HF tokenizer.json or the folder holding it")
    try:
        with open(file, encoding="utf-8") as f:
            return Tokenizer.from_str(f.read())
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        fail(f"cannot load tokenizer '{file}': {e}; pass an HF tokenizer.json")


def read_input(check, what: str):
    try:
        data = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"stdin is not UTF-8 JSON ({e}): pass {what}")
    if not isinstance(data, list) or not all(check(x) for x in data):
        fail(f"stdin is not {what}")
    return data


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("encode", "decode"):
        fail("usage: hf_tokenize.py encode|decode TOKENIZER_JSON < input.json > output.json")
    command, path = argv
    tok = load(path)
    if command == "encode":
        texts = read_input(lambda x: isinstance(x, str), "a JSON list of strings")
        out = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    else:
        seqs = read_input(lambda x: isinstance(x, list) and all(type(i) is int and i >= 0 for i in x),
                          "a JSON list of lists of non-negative ints")
        out = [tok.decode(ids, skip_special_tokens=False) for ids in seqs]
    sys.stdout.buffer.write(json.dumps(out, ensure_ascii=True).encode("ascii"))
    sys.stdout.buffer.write(b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
