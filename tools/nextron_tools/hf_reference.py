"""HF transformers reference for nextron: the Qwen3-Next model that nextron's numbers must match.

Shared by tools/make_fixtures.py, tools/test_hf_round_trip.py and other comparison scripts. Everything here runs
on CPU in fp32, offline (HF_HUB_OFFLINE=1 is forced before transformers is imported; nothing is ever downloaded),
with the plain reference code paths of transformers selected explicitly:

- attention:  ``attn_implementation="eager"`` (transformers' default is sdpa),
- experts:    ``experts_implementation="eager"`` (the per-expert loop; transformers' default on CPU is grouped_mm),
- DeltaNet / causal conv: the torch fallbacks ``torch_chunk_gated_delta_rule`` / ``causal_conv1d_fn``. transformers
  silently switches to the ``fla`` / ``causal_conv1d`` packages when they are importable; ``assert_torch_kernels``
  refuses to run if they are.

Main entry points:

- ``make_config(**fields)``, ``build_model(config)``: a fresh fp32 Qwen3NextForCausalLM.
- ``randomize_parameters(model, generator)``: give every parameter a random, O(1)-activation value so that a wrong
  convention (1 + w vs w, swapped split, ...) changes the outputs by far more than test tolerances.
- ``load_hf_model(path)``: from_pretrained (fp32, eager, offline), refusing missing / unexpected keys.
- ``read_token_file`` / ``write_token_file``: one sequence per line, whitespace-separated ints.
- ``eval_sequences(model, seqs)``: logits (N, max_len, V) zero-padded, per-sequence mean CE, lengths.
- ``per_sequence_loss(logits, labels)``: shifted mean CE per row, ignoring -100.
- ``save_safetensors_deterministic``: a byte-reproducible .safetensors writer.
- ``checkpoint_tensors(tensors)``: map in-memory parameter names/layouts to checkpoint names/layouts (fused
  experts ``gate_up_proj`` (E, 2I, H) = [gate; up] and ``down_proj`` (E, H, I) become per-expert
  ``experts.E.{gate,up,down}_proj.weight``), the layout ``save_pretrained`` writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402

IGNORE_INDEX = -100

# The reference code paths (see module docstring).
REFERENCE_IMPLEMENTATIONS = {"attn_implementation": "eager", "experts_implementation": "eager"}

_FUSED_GATE_UP = re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"^(.*\.mlp\.experts)\.down_proj$")


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info/warning chatter (errors still show)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def assert_torch_kernels() -> None:
    """Refuse to run if transformers would dispatch DeltaNet / conv to an optional compiled package.

    The reference must be transformers' own torch code; ``fla`` and ``causal_conv1d`` are picked up silently at
    import time of the modeling module when installed.
    """
    for pkg in ("fla", "causal_conv1d"):
        if importlib.util.find_spec(pkg) is not None:
            raise RuntimeError(
                f"package '{pkg}' is installed: transformers would use it instead of its torch reference code; "
                "use a venv without it"
            )


def set_determinism(threads: int = 1) -> None:
    """Deterministic CPU math: fixed thread count (reduction order) and deterministic algorithms."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


# ----------------------------------------------------------------------------------------------------------------
# Building, randomising, loading
# ----------------------------------------------------------------------------------------------------------------


def make_config(**fields) -> Qwen3NextConfig:
    """Qwen3NextConfig from keyword fields, with the reference (eager) implementations selected."""
    return Qwen3NextConfig(**fields, **REFERENCE_IMPLEMENTATIONS)


def build_model(config: Qwen3NextConfig) -> Qwen3NextForCausalLM:
    """A fresh fp32 model in eval mode (no dropout anyway; eval only documents intent). Weights are HF's init."""
    model = Qwen3NextForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def _randn(shape, std: float, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def randomize_parameters(model: Qwen3NextForCausalLM, gen: torch.Generator, router_std: float | None = None) -> dict:
    """Overwrite EVERY parameter with random values chosen so activations stay O(1).

    Rules (H = hidden_size), by in-memory parameter name:
      embed_tokens                       N(0, 1)
      zero-centred RMSNorm weights       N(0, 0.1)   (input/post-attention/final norm, q_norm, k_norm; y*(1+w))
      linear_attn.norm (gated RMSNorm)   1 + N(0, 0.1)  (plain y*w convention)
      linear_attn.A_log                  log(U(0.5, 8))
      linear_attn.dt_bias                N(-2, 0.5)  (softplus(a + dt_bias) ~ 0.05..0.5: a mix of short and long
                                                      memories, so state carried across the 64-token chunk matters)
      linear_attn.conv1d.weight          N(0, 0.5)
      mlp.gate.weight (router)           N(0, router_std), default 2/sqrt(H): router logits ~ N(0, 2^2), so the
                                         top-k choice is clear (callers also check the top-k margin) but the
                                         softmax is not saturated (the router still gets gradient)
      mlp.experts.gate_up_proj           N(0, 1/sqrt(H));  mlp.experts.down_proj  N(0, 1/sqrt(moe_intermediate))
      any other 2-D weight (Linear)      N(0, 1/sqrt(fan_in))
      any bias                           N(0, 0.2)
    Raises if a parameter matches no rule (so new parameters cannot silently keep HF's init).
    Returns {name: rule} for reporting.
    """
    cfg = model.config
    hidden = cfg.hidden_size
    if router_std is None:
        router_std = 2.0 / math.sqrt(hidden)
    zero_centred = re.compile(
        r"(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$|^model\.norm\.weight$"
    )
    rules = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("embed_tokens.weight"):
                rule, val = "N(0,1)", _randn(shape, 1.0, gen)
            elif zero_centred.search(name):
                rule, val = "N(0,0.1)", _randn(shape, 0.1, gen)
            elif name.endswith("linear_attn.norm.weight"):
                rule, val = "1+N(0,0.1)", _randn(shape, 0.1, gen, mean=1.0)
            elif name.endswith("linear_attn.A_log"):
                u = torch.rand(shape, generator=gen, dtype=torch.float32)
                rule, val = "log(U(0.5,8))", torch.log(0.5 + 7.5 * u)
            elif name.endswith("linear_attn.dt_bias"):
                rule, val = "N(-2,0.5)", _randn(shape, 0.5, gen, mean=-2.0)
            elif name.endswith("linear_attn.conv1d.weight"):
                rule, val = "N(0,0.5)", _randn(shape, 0.5, gen)
            elif name.endswith("mlp.gate.weight"):
                rule, val = f"N(0,{router_std:.3g})", _randn(shape, router_std, gen)
            elif name.endswith("mlp.experts.gate_up_proj"):
                rule, val = "N(0,1/sqrt(H))", _randn(shape, 1.0 / math.sqrt(shape[2]), gen)
            elif name.endswith("mlp.experts.down_proj"):
                rule, val = "N(0,1/sqrt(I))", _randn(shape, 1.0 / math.sqrt(shape[2]), gen)
            elif name.endswith(".bias"):
                rule, val = "N(0,0.2)", _randn(shape, 0.2, gen)
            elif name.endswith(".weight") and p.dim() == 2:
                rule, val = "N(0,1/sqrt(fan_in))", _randn(shape, 1.0 / math.sqrt(shape[1]), gen)
            else:
                raise RuntimeError(f"randomize_parameters: no rule for parameter {name} {shape}")
            p.copy_(val)
            rules[name] = rule
    return rules


def load_hf_model(path: str, dtype: torch.dtype = torch.float32) -> Qwen3NextForCausalLM:
    """Load an HF Qwen3-Next directory offline with the reference implementations, in eval mode.

    ``dtype`` is the compute dtype (checkpoint tensors are cast to it, e.g. bf16 -> fp32). Raises if any parameter
    is missing from the checkpoint, any checkpoint tensor is unexpected (``mtp.*`` is ignored by transformers
    itself) or any shape mismatches.
    """
    assert_torch_kernels()
    model, info = Qwen3NextForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, output_loading_info=True, **REFERENCE_IMPLEMENTATIONS
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"loading {path}: {problems}")
    # from_pretrained leaves parameters as views into the memory-mapped safetensors data, at whatever alignment the
    # file's layout gives them, and CPU BLAS picks different kernels (different rounding) for differently aligned
    # operands: the same weights loaded from two files, or loaded vs built in memory, then differ by ~1e-6.
    # Fresh allocations (64-byte aligned by torch's CPU allocator) make results depend only on the values.
    with torch.no_grad():
        for p in model.parameters():  # each Parameter once, so tied weights stay tied
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint layout
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map {in-memory parameter name: tensor} to {checkpoint tensor name: tensor} in checkpoint layout.

    Works for parameters and for their gradients alike. transformers v5 holds the experts of a layer fused:
    ``<p>.mlp.experts.gate_up_proj`` (E, 2I, H) with rows [gate (I); up (I)] and ``<p>.mlp.experts.down_proj``
    (E, H, I); ``save_pretrained`` writes them per expert as ``<p>.mlp.experts.<e>.gate_proj.weight`` (I, H),
    ``...up_proj.weight`` (I, H) and ``...down_proj.weight`` (H, I). Other names are unchanged.
    Returned tensors are contiguous copies.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m_gu, m_d = _FUSED_GATE_UP.match(name), _FUSED_DOWN.match(name)
        if m_gu:
            prefix = m_gu.group(1)
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter, :].contiguous().clone()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:, :].contiguous().clone()
        elif m_d:
            prefix = m_d.group(1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous().clone()
        else:
            out[name] = t.contiguous().clone()
    return out


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors_deterministic(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Write a .safetensors file byte-for-byte reproducibly.

    (safetensors' own writer emits ``__metadata__`` in hash-map order, which changes from run to run.) Layout: the
    JSON header has sorted keys and is space-padded so the data starts 8-byte aligned; tensor data is laid out by
    decreasing element size, then name, so every tensor is naturally aligned; little-endian, C order.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in order:
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


# ----------------------------------------------------------------------------------------------------------------
# Tokens, losses, evaluation
# ----------------------------------------------------------------------------------------------------------------


def read_token_file(path: str) -> list[list[int]]:
    """One sequence per non-empty line, whitespace-separated non-negative ints."""
    seqs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                seqs.append([int(x) for x in fields])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return seqs


def write_token_file(path: str, seqs: Iterable[Sequence[int]]) -> None:
    with open(path, "w") as f:
        for s in seqs:
            f.write(" ".join(str(int(x)) for x in s) + "\n")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with logits: position t predicts labels[t+1]; the last position gets IGNORE_INDEX."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE per row of (B, S, V) logits / (B, S) labels, ignoring IGNORE_INDEX. fp32, shape (B,)."""
    targets = shifted_targets(labels)
    ce = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, S), 0 where ignored
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if (counts == 0).any():
        raise ValueError("per_sequence_loss: a sequence has no target tokens")
    return ce.sum(dim=1) / counts.to(ce.dtype)


def batch_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: mean CE over all non-ignored shifted targets of the batch (scalar)."""
    targets = shifted_targets(labels)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def eval_sequences(model: Qwen3NextForCausalLM, seqs: Sequence[Sequence[int]]):
    """Run each sequence alone (batch 1, no padding, no cache) and collect its logits and mean CE.

    Returns numpy arrays: logits (N, max_len, V) f32 with rows beyond a sequence's length set to 0,
    loss (N,) f32 (shifted mean CE per sequence, labels = the sequence itself), lengths (N,) int64.
    """
    n = len(seqs)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if n == 0 or lengths.min() < 2:
        raise ValueError("eval_sequences: need at least one sequence, each of length >= 2")
    vocab = model.config.vocab_size
    logits_out = np.zeros((n, int(lengths.max()), vocab), dtype=np.float32)
    loss_out = np.zeros((n,), dtype=np.float32)
    for i, s in enumerate(seqs):
        ids = torch.tensor([list(s)], dtype=torch.long)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        logits_out[i, : len(s)] = logits[0].numpy()
        loss_out[i] = per_sequence_loss(logits, ids)[0].item()
    return logits_out, loss_out, lengths


@torch.no_grad()
def router_topk_margin(model: Qwen3NextForCausalLM, input_ids: torch.Tensor) -> float:
    """Smallest gap, over all MoE layers and tokens, between the k-th and (k+1)-th router logit (inf if no MoE).

    A small gap means an implementation with slightly different rounding could route a token differently.
    """
    cfg = model.config
    if cfg.num_experts == 0 or cfg.num_experts_per_tok >= cfg.num_experts:
        return math.inf
    out = model(input_ids=input_ids, use_cache=False, output_router_logits=True)
    k = cfg.num_experts_per_tok
    margin = math.inf
    for layer_logits in out.router_logits:
        top = torch.topk(layer_logits.float(), k + 1, dim=-1).values
        margin = min(margin, (top[:, k - 1] - top[:, k]).min().item())
    return margin
