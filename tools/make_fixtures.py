#!/usr/bin/env python3
"""Build the golden test fixtures: tiny random Qwen3-Next models and what HF transformers computes for them.

Run (from the repo root; CPU only, offline, ~10 s):

    /root/.cache/nextron/venv/bin/python tools/make_fixtures.py            # all cases -> tests/fixtures/
    /root/.cache/nextron/venv/bin/python tools/make_fixtures.py --out DIR --only dense

For each case the directory tests/fixtures/<case>/ holds:

- config.json, generation_config.json, model.safetensors: the HF checkpoint exactly as ``save_pretrained`` writes it
  (fp32). config.json is then rewritten where a case asks for the released model's legacy form (top-level
  ``rope_theta`` / ``partial_rotary_factor``, ``full_attention_interval`` instead of ``layer_types``); the script
  checks that transformers reloads the edited file to the identical model (logits bit-identical).
  Experts are stored per expert: ``model.layers.N.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight`` with shapes
  (I, H), (I, H), (H, I), although transformers holds them fused in memory (``gate_up_proj`` (E, 2I, H) = [gate; up],
  ``down_proj`` (E, H, I)).
- golden.safetensors:
    input_ids     int64 (B, S)
    labels        int64 (B, S)   input_ids, with some positions -100 in some cases (unshifted, HF convention)
    logits        f32 (B, S, V)
    lm_loss       f32 (1,)       mean next-token CE over all non-ignored targets of the batch
    aux_loss      f32 (1,)       transformers' load_balancing_loss_func over all MoE layers (0 without experts);
                                 all B*S tokens count (no attention mask), labels do not matter
    loss          f32 (1,)       lm_loss + router_aux_loss_coef * aux_loss (transformers' `loss` output)
    per_seq_loss  f32 (B,)       mean next-token CE of each sequence (ignoring -100)
    grad.<name>   f32            d loss / d tensor, for EVERY checkpoint tensor <name> in model.safetensors, with the
                                 checkpoint's name and shape (fused expert gradients split per expert)
  Metadata (strings): case, torch / transformers versions, router_aux_loss_coef, layer_types, mlp_types.

Reference semantics: fp32, eager attention, eager (per-expert loop) experts, transformers' torch DeltaNet/conv code,
no cache, no attention mask, positions 0..S-1. Every parameter is randomised (see
nextron_tools.hf_reference.randomize_parameters) so convention errors are large; seeds are fixed and the router top-k
margin is checked (seeds advance deterministically until no token is within MIN_ROUTER_MARGIN of a tie).
One thread + deterministic algorithms: rerunning reproduces identical files (the summary prints SHA-256 prefixes).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nextron_tools import hf_reference as ref  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures")

# A token whose k-th and (k+1)-th router logits are closer than this could be routed differently by an
# implementation with other rounding; such seeds are skipped.
MIN_ROUTER_MARGIN = 2e-3
KEEP_FILES = {"config.json", "model.safetensors", "generation_config.json"}


@dataclasses.dataclass
class Case:
    name: str
    description: str
    config: dict  # Qwen3NextConfig keyword fields
    batch: int
    seq: int
    seed: int
    # "v5": config.json as save_pretrained writes it (rope_parameters dict, explicit layer_types).
    # "legacy": like the released Qwen3-Next config.json: top-level rope_theta / partial_rotary_factor and
    #           full_attention_interval instead of layer_types.
    config_form: str = "v5"
    ignored_labels: tuple = ()  # (row, col) positions of labels set to -100


CASES = [
    Case(
        name="hybrid_moe",
        description="4 layers lin/full/full/lin, Hv=2Hk, partial RoPE 0.25, 8 experts top-2 normed, layer 2 dense "
        "(mlp_only_layers), S=70 > one 64-token DeltaNet chunk",
        config=dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            mlp_only_layers=[2],
            decoder_sparse_step=1,
            router_aux_loss_coef=0.01,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        batch=2,
        seq=70,
        seed=1001,
        config_form="v5",
    ),
    Case(
        name="moe_unnormed",
        description="3 layers via full_attention_interval=2 (lin/full/lin), decoder_sparse_step 2 (dense/MoE/dense), "
        "6 experts top-3 un-normalised, attention_bias, GQA 2:1, dk=16 != dv=8, legacy config form, "
        "some labels -100",
        config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            full_attention_interval=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_theta=1000000.0,
            partial_rotary_factor=0.5,
            attention_bias=True,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,
            norm_topk_prob=False,
            mlp_only_layers=[],
            decoder_sparse_step=2,
            router_aux_loss_coef=0.02,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        batch=3,
        seq=20,
        seed=2002,
        config_form="legacy",
        # (0, 0) is never a target (shift) and must not change anything; (1, 19) is the last target of row 1.
        ignored_labels=((0, 0), (0, 5), (0, 6), (0, 7), (1, 19), (2, 10)),
    ),
    Case(
        name="dense",
        description="no experts, 2 layers lin/full, Hv=3Hk, dk=8 != dv=16, GQA 4:1, head_dim 8, partial RoPE 0.5, "
        "S=65 (one token into the second DeltaNet chunk)",
        config=dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
            linear_num_key_heads=2,
            linear_num_value_heads=6,
            linear_key_head_dim=8,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            num_experts=0,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            mlp_only_layers=[],
            decoder_sparse_step=1,
            router_aux_loss_coef=0.001,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        batch=1,
        seq=65,
        seed=3003,
        config_form="v5",
    ),
]


def mlp_types(cfg) -> list[str]:
    """'moe' / 'dense' per layer, by the rule in Qwen3NextDecoderLayer."""
    return [
        "moe"
        if (i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0)
        else "dense"
        for i in range(cfg.num_hidden_layers)
    ]


def expected_rope(case: Case) -> dict:
    c = case.config
    if "rope_parameters" in c:
        return dict(c["rope_parameters"])
    return {"rope_type": "default", "rope_theta": c["rope_theta"], "partial_rotary_factor": c["partial_rotary_factor"]}


def build_case(case: Case):
    """Model + inputs for a case. Seeds advance deterministically until the router top-k margin is clear."""
    for attempt in range(100):
        seed = case.seed + 7919 * attempt
        torch.manual_seed(seed)  # HF's own init (overwritten below) draws from the global RNG
        gen = torch.Generator().manual_seed(seed)
        model = ref.build_model(ref.make_config(**case.config))
        ref.randomize_parameters(model, gen)
        input_ids = torch.randint(0, model.config.vocab_size, (case.batch, case.seq), generator=gen)
        margin = ref.router_topk_margin(model, input_ids)
        if margin >= MIN_ROUTER_MARGIN:
            return model, input_ids, seed, margin
    raise RuntimeError(f"{case.name}: no seed with router margin >= {MIN_ROUTER_MARGIN}")


def rewrite_config(path: str, case: Case, cfg) -> None:
    """Turn save_pretrained's config.json into the case's config form (no-op for 'v5')."""
    if case.config_form == "v5":
        return
    assert case.config_form == "legacy", case.config_form
    with open(path) as f:
        data = json.load(f)
    rope = data.pop("rope_parameters")
    data["rope_theta"] = rope["rope_theta"]
    data["partial_rotary_factor"] = rope["partial_rotary_factor"]
    data.pop("layer_types")
    data["full_attention_interval"] = case.config["full_attention_interval"]
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def make_case(case: Case, out_root: str) -> dict:
    model, input_ids, seed, margin = build_case(case)
    cfg = model.config
    moe = cfg.num_experts > 0
    coef = float(cfg.router_aux_loss_coef)
    check(cfg.rope_parameters == expected_rope(case), f"{case.name}: rope_parameters {cfg.rope_parameters}")

    labels = input_ids.clone()
    for r, c in case.ignored_labels:
        labels[r, c] = ref.IGNORE_INDEX

    # ---- forward + backward (the golden run) ----
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels, use_cache=False, output_router_logits=moe)
    logits = out.logits.detach().float()
    loss = out.loss
    lm_loss = ref.batch_lm_loss(logits, labels)
    aux = out.aux_loss.detach().float() if moe else torch.zeros(())
    check(
        abs(lm_loss.item() + coef * aux.item() - loss.item()) <= 1e-6 * max(1.0, abs(loss.item())),
        f"{case.name}: loss {loss.item()} != lm {lm_loss.item()} + {coef} * aux {aux.item()}",
    )
    per_seq = ref.per_sequence_loss(logits, labels)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    unused_experts = []
    if moe:
        for name, g in grads.items():
            if name.endswith("mlp.experts.down_proj"):
                dead = [e for e in range(g.shape[0]) if not g[e].abs().sum().item() > 0]
                if dead:
                    unused_experts.append((name, dead))

    # ---- write the checkpoint ----
    case_dir = os.path.join(out_root, case.name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    model.save_pretrained(case_dir, safe_serialization=True)
    for fn in sorted(os.listdir(case_dir)):
        if fn not in KEEP_FILES:
            os.remove(os.path.join(case_dir, fn))
    check({"config.json", "model.safetensors"} <= set(os.listdir(case_dir)), f"{case.name}: save_pretrained output")
    config_path = os.path.join(case_dir, "config.json")
    rewrite_config(config_path, case, cfg)

    # The saved tensors must be exactly our checkpoint mapping of the in-memory parameters (this validates the
    # names/layout used for the gradients below).
    params_ckpt = ref.checkpoint_tensors({n: p.detach() for n, p in model.named_parameters()})
    saved = load_file(os.path.join(case_dir, "model.safetensors"))
    check(set(saved) == set(params_ckpt), f"{case.name}: saved names differ: {set(saved) ^ set(params_ckpt)}")
    for n, t in saved.items():
        check(t.dtype == torch.float32 and torch.equal(t, params_ckpt[n]), f"{case.name}: saved tensor {n} differs")

    # ---- reload with transformers: same config semantics and bit-identical outputs ----
    reloaded = ref.load_hf_model(case_dir)
    rcfg = reloaded.config
    check(list(rcfg.layer_types) == list(cfg.layer_types), f"{case.name}: reloaded layer_types {rcfg.layer_types}")
    check(dict(rcfg.rope_parameters) == expected_rope(case), f"{case.name}: reloaded rope {rcfg.rope_parameters}")
    check(mlp_types(rcfg) == mlp_types(cfg), f"{case.name}: reloaded mlp types")
    with torch.no_grad():
        rout = reloaded(input_ids=input_ids, labels=labels, use_cache=False, output_router_logits=moe)
    check(torch.equal(rout.logits, logits), f"{case.name}: reloaded logits differ")
    check(torch.equal(rout.loss, loss.detach()), f"{case.name}: reloaded loss differs")

    # Information only: transformers' default fast paths (sdpa attention, grouped_mm experts) on the same weights.
    fast = type(model).from_pretrained(case_dir, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        fast_logits = fast(input_ids=input_ids, use_cache=False).logits
    fast_diff = (fast_logits - logits).abs().max().item()
    fast_impl = f"{fast.config._attn_implementation}/{fast.config._experts_implementation}"

    # ---- golden ----
    grads_ckpt = ref.checkpoint_tensors(grads)
    check(set(grads_ckpt) == set(saved), f"{case.name}: gradient names differ from checkpoint names")
    golden = {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "logits": logits.contiguous(),
        "lm_loss": lm_loss.detach().float().reshape(1),
        "aux_loss": aux.float().reshape(1),
        "loss": loss.detach().float().reshape(1),
        "per_seq_loss": per_seq.float().contiguous(),
    }
    for n in sorted(grads_ckpt):
        check(grads_ckpt[n].shape == saved[n].shape, f"{case.name}: grad shape {n}")
        golden["grad." + n] = grads_ckpt[n].float().contiguous()
    metadata = {
        "case": case.name,
        "description": case.description,
        "router_aux_loss_coef": repr(coef),
        "layer_types": ",".join(cfg.layer_types),
        "mlp_types": ",".join(mlp_types(cfg)),
        "seed": str(seed),
        "loss_definition": "loss = lm_loss + router_aux_loss_coef * aux_loss; grads are d loss",
        **ref.versions(),
    }
    golden_path = os.path.join(case_dir, "golden.safetensors")
    ref.save_safetensors_deterministic(golden, golden_path, metadata=metadata)
    with safe_open(golden_path, "pt") as f:  # the reference reader must read back exactly what we wrote
        check(set(f.keys()) == set(golden) and f.metadata() == metadata, f"{case.name}: golden keys/metadata")
        for n, t in golden.items():
            r = f.get_tensor(n)
            check(r.dtype == t.dtype and torch.equal(r, t), f"{case.name}: golden tensor {n} reads back differently")

    files = {fn: os.path.getsize(os.path.join(case_dir, fn)) for fn in sorted(os.listdir(case_dir))}
    return {
        "case": case.name,
        "dir": os.path.relpath(case_dir, REPO_ROOT),
        "seed": seed,
        "layers": list(zip(cfg.layer_types, mlp_types(cfg))),
        "params": sum(p.numel() for p in model.parameters()),
        "B,S,V": (case.batch, case.seq, cfg.vocab_size),
        "loss": loss.item(),
        "lm_loss": lm_loss.item(),
        "aux_loss": aux.item(),
        "per_seq_loss": [round(x, 6) for x in per_seq.tolist()],
        "router_margin": margin,
        "max|logit|": logits.abs().max().item(),
        "grad_norm": torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item(),
        "unused_experts": unused_experts,
        "fast_path_max_diff": (fast_impl, fast_diff),
        "files": files,
        "total_bytes": sum(files.values()),
        "sha256": {fn: sha(os.path.join(case_dir, fn)) for fn in files},
        "expert_names_example": sorted(n for n in saved if ".mlp.experts.0." in n)[:3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output root (default: tests/fixtures)")
    ap.add_argument("--only", action="append", help="build only this case (repeatable)")
    args = ap.parse_args()

    ref.quiet_transformers()
    ref.assert_torch_kernels()
    ref.set_determinism(threads=1)
    os.makedirs(args.out, exist_ok=True)
    names = [c.name for c in CASES]
    for n in args.only or []:
        if n not in names:
            ap.error(f"unknown case {n}; known: {names}")
    selected = [c for c in CASES if not args.only or c.name in args.only]

    print(f"make_fixtures: torch {ref.versions()['torch']}, transformers {ref.versions()['transformers']}")
    for case in selected:
        s = make_case(case, args.out)
        print(f"\n== {s['case']} -> {s['dir']} ({s['total_bytes'] / 1024:.1f} KiB)")
        print(f"   {case.description}")
        for key in ("seed", "layers", "params", "B,S,V", "loss", "lm_loss", "aux_loss", "per_seq_loss",
                    "router_margin", "max|logit|", "grad_norm", "unused_experts", "fast_path_max_diff",
                    "expert_names_example"):
            print(f"   {key}: {s[key]}")
        for fn, size in s["files"].items():
            print(f"   {fn:24s} {size:8d} B  sha256 {s['sha256'][fn]}")
    print("\nmake_fixtures: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
