#!/usr/bin/env python3
"""Round trip through the installed HF transformers: nextron's checkpoint reader + writer, and nextron-eval.

Run (CTest runs it as `hf_round_trip`):

    /root/.cache/nextron/venv/bin/python tools/test_hf_round_trip.py \\
        --convert build/nextron-convert --eval build/nextron-eval --work build/hf_round_trip

Exit code 0 when every check passes, 1 otherwise; the last line is "hf_round_trip: N passed, M failed".

What it does (CPU, fp32, offline):
 1. Builds a fresh tiny random Qwen3-Next (the hybrid_moe fixture's architecture from make_fixtures.py: linear and
    full attention in both orders, Hv = 2 Hk, partial RoPE, 8 experts top-2, a dense mlp_only layer; another seed)
    and saves it with save_pretrained into WORK/hf. Token file WORK/tokens.txt: two sequences of 67 tokens (longer
    than one 64-token DeltaNet chunk) and one of 41.
 2. `nextron-convert --in WORK/hf --out WORK/f32 --dtype f32 --max-shard-bytes 20000`: the output must be a sharded
    HF checkpoint (model.safetensors.index.json + several shards, none over 20000 data bytes unless it holds a
    single tensor) with exactly the original tensor names, all F32 and bit-identical; transformers must load it with
    no missing/unexpected keys, the same config semantics, and logits bit-identical to the original model's.
 3. `nextron-convert ... --out WORK/bf16 --dtype bf16`: every stored BF16 tensor must equal the original rounded to
    bf16 (round to nearest even, torch's rounding) bit for bit, and all matrices must be BF16; loaded with
    dtype=float32, its logits must match the original model with the same tensors rounded, computed in fp32,
    within 1e-5 (they are the same computation on the same numbers, so in practice equal).
 4. `nextron-eval --model WORK/f32 --tokens WORK/tokens.txt --out WORK/eval` must write logits.npy
    (num_seqs, max_len, V) f32 with zero rows past each sequence's end, loss.npy (num_seqs,) f32 and lengths.npy
    (num_seqs,) int64, matching transformers within atol 2e-4, rtol 1e-4 (see EVAL_ATOL).

Only WORK/{hf,f32,bf16,eval,tokens.txt} are (re)created; nothing else in WORK is touched.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nextron_tools import hf_reference as ref  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import make_fixtures  # noqa: E402

SEED = 424242
SEQ_LEN = 67
SHORT_LEN = 41
MAX_SHARD_BYTES = 20000
BF16_ATOL = 1e-5
# nextron-eval vs transformers, both fp32 on CPU: the arithmetic is the same but the summation orders are not (our
# blocked GEMMs vs torch's BLAS, our chunked delta-rule scan vs torch's solve_triangular-based one, batch-of-2 vs
# batch-of-1 runs, expf/logf implementations). Each op contributes ~1e-7 relative error; through 4 layers and the
# 64-token chunk scan this accumulates to ~1e-5 on O(1..5) logits (torch's own chunked vs recurrent delta rule
# already differ by ~7e-6 here). 2e-4 absolute + 1e-4 relative leaves >10x margin for that, while any convention
# error (1 + w vs w, a swapped q/k/v/z split, a wrong RoPE half, a misrouted expert) moves logits by > 1e-2.
EVAL_ATOL = 2e-4
EVAL_RTOL = 1e-4
SUBPROCESS_TIMEOUT_S = 300

# Config fields that must survive nextron's config.json writer with the same meaning.
CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step",
    "router_aux_loss_coef", "rms_norm_eps", "attention_bias", "tie_word_embeddings", "hidden_act",
]


class Checks:
    """Named pass/fail results; a check is a function raising AssertionError (or anything) on failure."""

    def __init__(self):
        self.passed: list[str] = []
        self.failed: list[str] = []

    def run(self, name: str, fn, *args) -> bool:
        try:
            detail = fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            msg = str(e) if isinstance(e, AssertionError) else "".join(traceback.format_exception_only(e)).strip()
            print(f"FAIL {name}: {msg}")
            self.failed.append(name)
            return False
        print(f"ok   {name}" + (f": {detail}" if detail else ""))
        self.passed.append(name)
        return True

    def skip(self, name: str, why: str) -> None:
        """A check that cannot run because something it needs failed: counted as failed."""
        print(f"FAIL {name}: not run ({why})")
        self.failed.append(name)


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def run_tool(cmd: list[str]) -> str:
    exe = cmd[0]
    expect(os.path.isfile(exe) and os.access(exe, os.X_OK), f"{exe} is not an executable file")
    print("  $ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out after {SUBPROCESS_TIMEOUT_S} s") from None
    out = (p.stdout + p.stderr).strip()
    expect(p.returncode == 0, f"exit code {p.returncode}; output:\n{out[-3000:]}")
    return out.splitlines()[-1] if out else ""


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """All tensors of an HF dir (single file or index + shards): (tensors, dtype name per tensor, shard per tensor)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = ["model.safetensors"]
        weight_map = None
    tensors, dtypes, where = {}, {}, {}
    for shard in shards:
        with safe_open(os.path.join(path, shard), "pt") as f:
            for k in f.keys():
                expect(k not in tensors, f"tensor {k} stored twice ({where.get(k)} and {shard})")
                tensors[k] = f.get_tensor(k)
                dtypes[k] = f.get_slice(k).get_dtype()
                where[k] = shard
    if weight_map is not None:
        expect(weight_map == where, "weight_map does not match the shards' contents: "
               f"{sorted(set(weight_map.items()) ^ set(where.items()))[:5]}")
    return tensors, dtypes, where


@dataclasses.dataclass
class Setup:
    work: str
    hf_dir: str
    tokens_path: str
    seqs: list
    model: object
    ref_tensors: dict  # checkpoint name -> tensor of WORK/hf
    logits: np.ndarray
    loss: np.ndarray
    lengths: np.ndarray


def build_setup(work: str) -> Setup:
    """Fresh random model (hybrid_moe architecture, other seed), its checkpoint and token file, HF's outputs."""
    base = next(c for c in make_fixtures.CASES if c.name == "hybrid_moe")
    case = dataclasses.replace(base, name="round_trip", seed=SEED, batch=3, seq=SEQ_LEN)
    model, input_ids, seed, margin = make_fixtures.build_case(case)  # router top-k margin checked on these tokens
    seqs = [input_ids[0].tolist(), input_ids[1].tolist(), input_ids[2, :SHORT_LEN].tolist()]
    hf_dir = os.path.join(work, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokens_path = os.path.join(work, "tokens.txt")
    ref.write_token_file(tokens_path, seqs)
    expect(ref.read_token_file(tokens_path) == seqs, "token file does not read back")
    ref_tensors, _, _ = read_checkpoint(hf_dir)
    logits, loss, lengths = ref.eval_sequences(model, seqs)
    print(f"  model: seed {seed}, {sum(p.numel() for p in model.parameters())} parameters, router margin {margin:.4f}, "
          f"layers {list(model.config.layer_types)}; sequences {[len(s) for s in seqs]}; HF losses {loss.tolist()}")
    return Setup(work, hf_dir, tokens_path, seqs, model, ref_tensors, logits, loss, lengths)


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def check_sharded_f32(s: Setup, out_dir: str) -> str:
    expect(os.path.exists(os.path.join(out_dir, "config.json")), "no config.json")
    expect(os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")),
           "no model.safetensors.index.json (expected a sharded checkpoint with --max-shard-bytes 20000)")
    tensors, dtypes, where = read_checkpoint(out_dir)
    expect(set(tensors) == set(s.ref_tensors),
           f"tensor names differ: missing {sorted(set(s.ref_tensors) - set(tensors))[:5]}, "
           f"extra {sorted(set(tensors) - set(s.ref_tensors))[:5]}")
    shards = sorted(set(where.values()))
    expect(len(shards) > 1, f"only {len(shards)} shard")
    for shard in shards:
        names = [n for n in where if where[n] == shard]
        nbytes = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        expect(nbytes <= MAX_SHARD_BYTES or len(names) == 1, f"{shard}: {nbytes} data bytes in {len(names)} tensors")
    bad = [n for n in tensors if dtypes[n] != "F32"]
    expect(not bad, f"not F32: {bad[:5]}")
    diff = [n for n, t in tensors.items() if t.shape != s.ref_tensors[n].shape or not torch.equal(t, s.ref_tensors[n])]
    expect(not diff, f"values/shapes differ: {diff[:5]}")
    return f"{len(tensors)} tensors in {len(shards)} shards, bit-identical"


def check_config(s: Setup, out_dir: str, model) -> str:
    a, b = s.model.config, model.config
    diffs = [f"{k}: {getattr(a, k)!r} -> {getattr(b, k)!r}" for k in CONFIG_FIELDS if getattr(a, k) != getattr(b, k)]
    if list(a.layer_types) != list(b.layer_types):
        diffs.append(f"layer_types: {a.layer_types} -> {b.layer_types}")
    ra = {k: a.rope_parameters.get(k) for k in ("rope_type", "rope_theta", "partial_rotary_factor")}
    rb = {k: b.rope_parameters.get(k) for k in ("rope_type", "rope_theta", "partial_rotary_factor")}
    if ra != rb:
        diffs.append(f"rope_parameters: {ra} -> {rb}")
    expect(not diffs, "; ".join(diffs))
    return "layer types, rope and MoE fields preserved"


def check_f32_logits(s: Setup, model) -> str:
    logits, loss, _ = ref.eval_sequences(model, s.seqs)
    d = float(np.abs(logits - s.logits).max())
    expect(d == 0.0, f"max |logits diff| = {d:.3g}, expected exactly 0")
    expect(np.array_equal(loss, s.loss), "losses differ")
    return "max |diff| = 0"


def check_bf16_tensors(s: Setup, out_dir: str) -> str:
    tensors, dtypes, _ = read_checkpoint(out_dir)
    expect(set(tensors) == set(s.ref_tensors), "tensor names differ from the original checkpoint")
    kinds = {}
    for n, t in tensors.items():
        kinds[dtypes[n]] = kinds.get(dtypes[n], 0) + 1
        orig = s.ref_tensors[n]
        expect(dtypes[n] in ("BF16", "F32"), f"{n}: dtype {dtypes[n]}")
        expect(not (orig.dim() >= 2 and dtypes[n] != "BF16"), f"{n}: matrix stored as {dtypes[n]}, expected BF16")
        want = orig.to(torch.bfloat16) if dtypes[n] == "BF16" else orig
        expect(t.shape == orig.shape and torch.equal(t, want), f"{n}: not the original rounded to {dtypes[n]}")
    return f"dtypes {kinds}; every tensor = original rounded to nearest even"


def bf16_reference_model(s: Setup, dtypes: dict[str, str]):
    """The original model with exactly the tensors that the bf16 checkpoint stores as BF16 rounded to bf16."""
    model = copy.deepcopy(s.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            pieces = ref.checkpoint_tensors({name: p.detach()})
            kinds = {dtypes[k] for k in pieces}
            expect(len(kinds) == 1, f"{name}: its checkpoint pieces have mixed dtypes {kinds}")
            if kinds == {"BF16"}:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def check_bf16_logits(s: Setup, out_dir: str, model) -> str:
    _, dtypes, _ = read_checkpoint(out_dir)
    want_logits, want_loss, _ = ref.eval_sequences(bf16_reference_model(s, dtypes), s.seqs)
    logits, loss, _ = ref.eval_sequences(model, s.seqs)
    d = float(np.abs(logits - want_logits).max())
    expect(d <= BF16_ATOL, f"max |logits diff| = {d:.3g} > {BF16_ATOL}")
    expect(np.abs(loss - want_loss).max() <= BF16_ATOL, f"losses {loss} vs {want_loss}")
    moved = float(np.abs(logits - s.logits).max())
    return f"max |diff| = {d:.3g} (bf16 rounding itself moves logits by {moved:.3g})"


def check_eval_outputs(s: Setup, eval_dir: str) -> str:
    files = {k: os.path.join(eval_dir, k + ".npy") for k in ("logits", "loss", "lengths")}
    for k, p in files.items():
        expect(os.path.exists(p), f"missing {p}")
    logits, loss, lengths = (np.load(files[k]) for k in ("logits", "loss", "lengths"))
    n, max_len, vocab = len(s.seqs), int(s.lengths.max()), s.model.config.vocab_size
    expect(logits.dtype == np.float32 and logits.shape == (n, max_len, vocab),
           f"logits.npy {logits.dtype} {logits.shape}, expected float32 {(n, max_len, vocab)}")
    expect(loss.dtype == np.float32 and loss.shape == (n,), f"loss.npy {loss.dtype} {loss.shape}")
    expect(lengths.dtype == np.int64 and lengths.shape == (n,), f"lengths.npy {lengths.dtype} {lengths.shape}")
    expect(np.array_equal(lengths, s.lengths), f"lengths {lengths.tolist()}, expected {s.lengths.tolist()}")
    for i, length in enumerate(s.lengths):
        expect(not np.any(logits[i, length:]), f"sequence {i}: logits rows past its length {length} are not 0")
    return "shapes, dtypes, lengths and zero padding as specified"


def check_eval_values(s: Setup, eval_dir: str) -> str:
    logits = np.load(os.path.join(eval_dir, "logits.npy"))
    loss = np.load(os.path.join(eval_dir, "loss.npy"))
    msgs = []
    for i, length in enumerate(s.lengths):
        a, b = logits[i, :length], s.logits[i, :length]
        if not np.allclose(a, b, atol=EVAL_ATOL, rtol=EVAL_RTOL):
            bad = np.abs(a - b) - (EVAL_ATOL + EVAL_RTOL * np.abs(b))
            t = int(np.unravel_index(np.argmax(bad), bad.shape)[0])
            msgs.append(f"sequence {i}: logits max |diff| {np.abs(a - b).max():.3g} (worst at position {t})")
    if not np.allclose(loss, s.loss, atol=EVAL_ATOL, rtol=EVAL_RTOL):
        msgs.append(f"loss {loss.tolist()} vs transformers {s.loss.tolist()}")
    expect(not msgs, "; ".join(msgs))
    worst = max(float(np.abs(logits[i, :n] - s.logits[i, :n]).max()) for i, n in enumerate(s.lengths))
    return f"logits max |diff| {worst:.3g}, loss max |diff| {float(np.abs(loss - s.loss).max()):.3g}"


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--convert", required=True, help="path to the nextron-convert binary")
    ap.add_argument("--eval", required=True, help="path to the nextron-eval binary")
    ap.add_argument("--work", required=True,
                    help="scratch directory (created; only its hf/f32/bf16/eval/tokens.txt are replaced)")
    args = ap.parse_args()

    ref.quiet_transformers()
    ref.set_determinism(threads=1)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    for sub in ("hf", "f32", "bf16", "eval"):
        shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    if os.path.exists(os.path.join(work, "tokens.txt")):
        os.remove(os.path.join(work, "tokens.txt"))
    f32_dir, bf16_dir, eval_dir = (os.path.join(work, sub) for sub in ("f32", "bf16", "eval"))
    convert, evaluate = os.path.abspath(args.convert), os.path.abspath(args.eval)

    checks = Checks()
    holder: dict = {}

    def keep(key, fn, *a):
        """Run fn and keep its result in holder[key] (for checks that produce something later checks use)."""
        holder[key] = fn(*a)

    checks.run("reference model (transformers)", keep, "s", build_setup, work)
    s: Setup | None = holder.get("s")
    if s is None:
        for name in ("convert f32", "f32 checkpoint", "f32 load", "f32 config", "f32 logits", "convert bf16",
                     "bf16 tensors", "bf16 load", "bf16 logits", "eval run", "eval outputs", "eval values"):
            checks.skip(name, "no reference model")
    else:
        # f32 export
        conv = [convert, "--in", s.hf_dir, "--out", f32_dir, "--max-shard-bytes", str(MAX_SHARD_BYTES)]
        if checks.run("convert f32", run_tool, conv + ["--dtype", "f32"]):
            checks.run("f32 checkpoint", check_sharded_f32, s, f32_dir)
            if checks.run("f32 load", keep, "m32", ref.load_hf_model, f32_dir):
                checks.run("f32 config", check_config, s, f32_dir, holder["m32"])
                checks.run("f32 logits", check_f32_logits, s, holder["m32"])
            else:
                checks.skip("f32 config", "f32 load failed")
                checks.skip("f32 logits", "f32 load failed")
        else:
            for name in ("f32 checkpoint", "f32 load", "f32 config", "f32 logits"):
                checks.skip(name, "convert f32 failed")

        # bf16 export, loaded by transformers as fp32
        conv_bf16 = [convert, "--in", s.hf_dir, "--out", bf16_dir, "--dtype", "bf16",
                     "--max-shard-bytes", str(MAX_SHARD_BYTES)]
        if checks.run("convert bf16", run_tool, conv_bf16):
            checks.run("bf16 tensors", check_bf16_tensors, s, bf16_dir)
            if checks.run("bf16 load", keep, "m16", ref.load_hf_model, bf16_dir, torch.float32):
                checks.run("bf16 logits", check_bf16_logits, s, bf16_dir, holder["m16"])
            else:
                checks.skip("bf16 logits", "bf16 load failed")
        else:
            for name in ("bf16 tensors", "bf16 load", "bf16 logits"):
                checks.skip(name, "convert bf16 failed")

        # nextron-eval on the f32 export
        if not os.path.isdir(f32_dir):
            for name in ("eval run", "eval outputs", "eval values"):
                checks.skip(name, "no f32 export to evaluate")
        elif checks.run("eval run", run_tool,
                        [evaluate, "--model", f32_dir, "--tokens", s.tokens_path, "--out", eval_dir]):
            if checks.run("eval outputs", check_eval_outputs, s, eval_dir):
                checks.run("eval values", check_eval_values, s, eval_dir)
            else:
                checks.skip("eval values", "eval outputs malformed")
        else:
            checks.skip("eval outputs", "eval run failed")
            checks.skip("eval values", "eval run failed")

    print(f"hf_round_trip: {len(checks.passed)} passed, {len(checks.failed)} failed")
    return 0 if not checks.failed else 1


if __name__ == "__main__":
    sys.exit(main())
