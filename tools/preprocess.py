#!/usr/bin/env python3
"""Tokenize raw text into nextron's HDF5 token dataset (format: docs/formats.md, "Tokenized dataset (HDF5)").

    python tools/preprocess.py INPUT [INPUT ...] --out data.h5 --tokenizer PATH/tokenizer.json
    python tools/preprocess.py corpus.txt --out data.h5 --tokenizer byte

INPUT is a plain text file (one document), a JSON Lines file (one document per line, its text in the `text` field,
or --json-key), a .json file holding a JSON array of such objects or JSON Lines, or a folder: every file under it
whose name matches --glob (default '*'), recursively, in sorted path order, hidden files and folders skipped. The
format of each file comes from its extension (.jsonl / .json: JSON, anything else: text) unless --format forces one.

Tokenizers: --tokenizer PATH (an HF `tokenizer.json`, or a folder holding one; the EOS token --eos-token must be in
its vocabulary) or --tokenizer byte (built in, no download: token = UTF-8 byte value 0..255, EOS 256, vocab 257).

Output: dataset `tokens` (uint32, documents back to back, each followed by EOS), `doc_offsets` (int64,
num_docs + 1 start offsets) and root attributes format, format_version, tokenizer, tokenizer_name, vocab_size,
eos_id, num_docs, num_tokens, metadata_crc32 (HDF5 1.10 file format). Empty documents are skipped. The file is written under a temporary name next to
--out and renamed into place when complete, so a failed or interrupted run never leaves a partial dataset.
A progress line goes to stderr when it is a terminal, or always with --progress.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
import time
import zlib

import numpy as np

FORMAT = "nextron-tokens"
FORMAT_VERSION = 1
BYTE_VOCAB = 257
BYTE_EOS = 256
BATCH_BYTES = 4 << 20  # text handed to the tokenizer at once
BATCH_DOCS = 4096
COPY_BLOCK = 1 << 24  # tokens copied into the HDF5 file at once


class PreprocessError(Exception):
    """A problem with the user's input or options; main() prints it and exits 1."""


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: needs no download, handles any text."""

    identity = "byte"
    name = "byte"
    vocab_size = BYTE_VOCAB
    eos_id = BYTE_EOS

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]


class HFTokenizer:
    """A `tokenizers` tokenizer.json; identity = sha256 of the file's bytes."""

    def __init__(self, path: str, eos_token: str):
        from tokenizers import Tokenizer  # imported here so the byte tokenizer works without the package

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise PreprocessError(f"tokenizer '{path}' does not exist: pass an HF tokenizer.json (or the folder "
                                  "holding it), or --tokenizer byte for the built-in byte-level tokenizer")
        with open(file, "rb") as f:
            raw = f.read()
        try:
            self.tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise PreprocessError(f"cannot load tokenizer '{file}': {e}; pass an HF tokenizer.json") from None
        self.identity = "hf:" + hashlib.sha256(raw).hexdigest()
        self.name = os.path.basename(os.path.normpath(path))
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        eos = self.tok.token_to_id(eos_token)
        if eos is None:
            special = sorted(t.content for t in self.tok.get_added_tokens_decoder().values())
            hint = f" (its added tokens: {', '.join(special[:20])})" if special else ""
            raise PreprocessError(f"EOS token '{eos_token}' is not in the vocabulary of '{file}'{hint}: pass "
                                  "--eos-token with the tokenizer's end-of-text token")
        self.eos_id = int(eos)
        if self.vocab_size > 1 << 32:
            raise PreprocessError(f"vocabulary of '{file}' has {self.vocab_size} entries, more than uint32 holds")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]


def make_tokenizer(spec: str, eos_token: str):
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec, eos_token)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: (file, format) pairs, then documents


def list_inputs(inputs: list[str], pattern: str, forced: str) -> list[tuple[str, str]]:
    """Every input file with its format ("text" or "jsonl"), folders expanded recursively in sorted order."""
    files: list[str] = []
    for inp in inputs:
        if not os.path.exists(inp):
            raise PreprocessError(f"input '{inp}' does not exist: pass text files, JSON Lines files or folders")
        if os.path.isdir(inp):
            found = []
            for root, dirs, names in os.walk(inp):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in names:
                    if not n.startswith(".") and fnmatch.fnmatch(n, pattern):
                        found.append(os.path.join(root, n))
            found.sort(key=lambda p: os.path.relpath(p, inp).split(os.sep))
            if not found:
                raise PreprocessError(f"folder '{inp}' holds no file matching --glob '{pattern}' (hidden files are "
                                      "skipped): check the folder and the pattern")
            files += found
        else:
            files.append(inp)
    out = []
    for f in files:
        if forced != "auto":
            out.append((f, forced))
        else:
            out.append((f, "jsonl" if f.lower().endswith((".jsonl", ".json")) else "text"))
    return out


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreprocessError(f"{where}: not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8 "
                              "(e.g. iconv) or leave it out") from None


def doc_text(obj, key: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise PreprocessError(f"{where}: expected a JSON object with a '{key}' field, found a "
                              f"{type(obj).__name__}")
    if key not in obj:
        keys = ", ".join(list(obj)[:10]) or "none"
        raise PreprocessError(f"{where}: no '{key}' field (its keys: {keys}); pass --json-key to read another field")
    text = obj[key]
    if not isinstance(text, str):
        raise PreprocessError(f"{where}: field '{key}' is a {type(text).__name__}, not a string")
    return text


def read_documents(path: str, fmt: str, key: str):
    """Yields (text, bytes of the file consumed since the previous yield); text None for a blank JSON line."""
    if fmt == "text":
        with open(path, "rb") as f:
            raw = f.read()
        yield decode(raw, path), len(raw)
        return
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.lower().endswith(".json") and head.startswith(b"["):  # a .json file holding a JSON array of objects
        with open(path, "rb") as f:
            raw = f.read()
        try:
            items = json.loads(decode(raw, path))
        except json.JSONDecodeError as e:
            raise PreprocessError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(items, list):
            raise PreprocessError(f"{path}: expected a JSON array of objects or JSON Lines")
        for i, obj in enumerate(items):
            yield doc_text(obj, key, f"{path}: element {i}"), len(raw) if i == 0 else 0
        if not items:
            yield None, len(raw)
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                yield None, len(line)
                continue
            try:
                obj = json.loads(decode(line, where))
            except json.JSONDecodeError as e:
                raise PreprocessError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); every line of a JSON "
                                      "Lines file must be one JSON object (or force --format text)") from None
            yield doc_text(obj, key, where), len(line)


# ---------------------------------------------------------------------------------------------------------------------
# Output


class Progress:
    """A one-line progress display on stderr, redrawn at most every 0.2 s."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total = max(total_bytes, 1)
        self.enabled = enabled
        self.last = 0.0
        self.shown = False

    def update(self, done: int, docs: int, tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        pct = 100.0 * min(done, self.total) / self.total
        sys.stderr.write(f"\rpreprocess: {pct:5.1f}% ({human(done)} of {human(self.total)}), {docs} documents, "
                         f"{tokens} tokens ")
        sys.stderr.flush()
        self.shown = True

    def finish(self, docs: int, tokens: int) -> None:
        self.update(self.total, docs, tokens, force=True)
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def metadata_crc32(tok, num_docs: int, num_tokens: int, offsets: np.ndarray) -> int:
    """The metadata checksum TokenDataset::open verifies (docs/formats.md): CRC-32 of the attributes, one per line,
    then doc_offsets as little-endian int64."""
    header = (f"{FORMAT}\n{FORMAT_VERSION}\n{tok.identity}\n{tok.name}\n{tok.vocab_size}\n{tok.eos_id}\n"
              f"{num_docs}\n{num_tokens}\n")
    return zlib.crc32(offsets.astype("<i8", copy=False).tobytes(), zlib.crc32(header.encode("utf-8")))


class TokenSink:
    """Appends documents to a raw uint32 scratch file (so memory stays flat), then writes the HDF5 file."""

    def __init__(self, tmp_base: str, eos_id: int):
        self.raw_path = tmp_base + ".tokens"
        self.raw = open(self.raw_path, "wb")
        self.eos = np.asarray([eos_id], dtype="<u4")
        self.offsets = [0]
        self.num_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        ids.astype("<u4", copy=False).tofile(self.raw)
        self.eos.tofile(self.raw)
        self.num_tokens += len(ids) + 1
        self.offsets.append(self.num_tokens)

    def write_hdf5(self, path: str, tok) -> None:
        import h5py

        self.raw.close()
        # HDF5 1.10's file format: its metadata carries checksums, so a damaged file is refused rather than parsed
        # (h5py's default, the 1.8-compatible format, has none). Pinned to v110 both ways so that a newer HDF5 in
        # h5py still writes files nextron's HDF5 1.10 reads.
        with h5py.File(path, "w", libver=("v110", "v110")) as f:
            ds = f.create_dataset("tokens", shape=(self.num_tokens,), dtype="<u4")  # contiguous: direct reads
            for begin in range(0, self.num_tokens, COPY_BLOCK):
                n = min(COPY_BLOCK, self.num_tokens - begin)
                ds[begin:begin + n] = np.fromfile(self.raw_path, dtype="<u4", count=n, offset=4 * begin)
            offsets = np.asarray(self.offsets, dtype="<i8")
            f.create_dataset("doc_offsets", data=offsets)
            # Fixed-length strings: variable-length ones live in HDF5's global heap, which has no checksum.
            for name, value in (("format", FORMAT), ("tokenizer", tok.identity), ("tokenizer_name", tok.name)):
                raw = value.encode("utf-8")
                f.attrs.create(name, np.array(raw, dtype=f"S{max(1, len(raw))}"),
                               dtype=h5py.string_dtype("utf-8", max(1, len(raw))))
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.attrs["vocab_size"] = np.int64(tok.vocab_size)
            f.attrs["eos_id"] = np.int64(tok.eos_id)
            f.attrs["num_docs"] = np.int64(len(self.offsets) - 1)
            f.attrs["num_tokens"] = np.int64(self.num_tokens)
            f.attrs["metadata_crc32"] = np.int64(metadata_crc32(tok, len(self.offsets) - 1, self.num_tokens, offsets))

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.close()


def preprocess(args) -> str:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"output folder '{out_dir}' does not exist: create it first")
    if os.path.isdir(args.out):
        raise PreprocessError(f"--out '{args.out}' is a folder: pass the .h5 file to write")
    files = list_inputs(args.inputs, args.glob, args.format)
    tok = make_tokenizer(args.tokenizer, args.eos_token)
    total = sum(os.path.getsize(f) for f, _ in files)
    progress = Progress(total, args.progress or sys.stderr.isatty())
    tmp_base = os.path.join(out_dir, f".{os.path.basename(args.out)}.tmp-{os.getpid()}")
    tmp_h5 = tmp_base + ".h5"
    try:
        sink = TokenSink(tmp_base, tok.eos_id)
    except OSError as e:
        raise PreprocessError(f"cannot write --out '{args.out}': {e.strerror or e} (creating '{e.filename}'); "
                              "choose a writable location") from None
    done = skipped = 0
    try:
        batch: list[str] = []
        batch_bytes = 0

        def flush():
            nonlocal batch, batch_bytes
            for ids in tok.encode_batch(batch):
                if len(ids) and int(ids.max()) >= tok.vocab_size:
                    raise PreprocessError(f"tokenizer produced id {int(ids.max())} >= its vocab_size "
                                          f"{tok.vocab_size}: the tokenizer file is inconsistent")
                sink.add(ids)
            batch, batch_bytes = [], 0

        for path, fmt in files:
            for text, nbytes in read_documents(path, fmt, args.json_key):
                done += nbytes
                if text is None:
                    continue
                if not text:
                    skipped += 1
                    continue
                batch.append(text)
                batch_bytes += len(text)
                if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                    flush()
                    progress.update(done, len(sink.offsets) - 1, sink.num_tokens)
        if batch:
            flush()
        progress.finish(len(sink.offsets) - 1, sink.num_tokens)
        if sink.num_tokens == 0:
            names = ", ".join(args.inputs)
            raise PreprocessError(f"no text in {names}: every document was empty ({skipped} skipped); check the "
                                  "inputs (and --json-key for JSON)")
        try:
            sink.write_hdf5(tmp_h5, tok)
            os.replace(tmp_h5, args.out)
        except OSError as e:  # h5py reports its failures as OSError too
            raise PreprocessError(f"cannot write --out '{args.out}': {e.strerror or e}; check the space and "
                                  "permissions there") from None
    finally:
        sink.close()
        for p in (sink.raw_path, tmp_h5):
            if os.path.exists(p):
                os.remove(p)
    return (f"wrote {args.out}: {len(sink.offsets) - 1} documents, {sink.num_tokens} tokens (tokenizer {tok.name}, "
            f"vocab_size {tok.vocab_size}, eos_id {tok.eos_id})" + (f", {skipped} empty documents skipped"
                                                                    if skipped else ""))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="text / JSON Lines files or folders")
    ap.add_argument("--out", required=True, help="the .h5 dataset to write")
    ap.add_argument("--tokenizer", required=True, help="PATH/tokenizer.json (or its folder), or 'byte'")
    ap.add_argument("--eos-token", default="<|endoftext|>", help="EOS token of an HF tokenizer (default %(default)s)")
    ap.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto",
                    help="input format; auto: by extension (.jsonl, .json: JSON, else text)")
    ap.add_argument("--glob", default="*", help="file name pattern inside folders (default %(default)s)")
    ap.add_argument("--json-key", default="text", help="field holding the text in JSON (default %(default)s)")
    ap.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(preprocess(args))
    except PreprocessError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
