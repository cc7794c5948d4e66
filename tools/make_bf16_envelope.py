#!/usr/bin/env python3
"""How far transformers' own bf16 run lands from its fp32 golden run, per golden fixture: the yardstick of the
GPU whole-model test (tests/cuda/test_cuda_model.cpp).

    python tools/make_bf16_envelope.py [--fixtures tests/fixtures] [--check]

For each fixture with a golden.safetensors, loads model.safetensors into transformers twice (fp32, and cast to
bf16: weights and every activation in bf16, the DeltaNet core in fp32 as transformers computes it), runs the
golden batch forward and backward (the bf16 run replaying the fp32 run's expert choice, as the GPU test replays
the CPU model's), and writes bf16_envelope.json beside it: the bf16 run's error against the fp32
golden with the test's own metrics (max |bf16 - fp32| over a tensor divided by the fp32 tensor's largest
magnitude) for the logits and every gradient (checkpoint names), and the relative lm_loss error.

Why the test needs this: the golden fixtures have deliberately large random weights (so a wrong convention moves
outputs by O(1)), and at that scale some of their outputs are not determined at bf16 precision. In the MoE
fixtures a rounding-size change flips a token's top-k experts (a discrete choice), which changes that token's
logits by O(10 %) and the gradients of the experts involved by O(1); the DeltaNet gates' gradients (A_log, dt_bias)
are sums that cancel. transformers' own bf16 run shows it: hybrid_moe's logits land 0.23 (of their largest
magnitude) from its fp32 run, while dense stays at 0.02. Replaying the fp32 run's expert choice removes the flips
(hybrid_moe: 0.063) but not the rest (its expert gradients still miss by up to 0.39, moe_unnormed's conv1d gradient
by 0.16). The GPU test therefore replays the CPU model's choice and allows each quantity the larger of its fixed
tolerance and a multiple of what transformers' replayed bf16 run misses by (see the test's header).

--check recomputes and compares with the committed files instead of writing: exit 1 where a value differs by more
than 40 % (or 1e-3), which a fixture regenerated without its envelope does (new random weights move these errors by
O(1)), while another CPU's bf16 kernels (other rounding of the same products) do not: an AMX-BF16 Sapphire Rapids
with torch 2.15 moves the most sensitive gradients (DeltaNet gates, MoE experts) by up to 27 % from the committed
values, which another machine produced.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nextron_tools import hf_reference as ref  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (max |got - want| where want is all zero), the C++ tests' metric."""
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    return err / scale if scale > 0 else err


class TopkReplay:
    """Routing replay for transformers: records the indices of every torch.topk call of one run (the MoE routers,
    then the load-balancing loss), and makes the same calls of a later run return them (values gathered from that
    run's own input), as nextron's RoutingReplay does for the GPU test."""

    def __init__(self):
        self.recorded, self.mode, self.pos = [], None, 0
        self.orig = torch.topk

    def __call__(self, x, k, dim=-1, *a, **kw):
        if self.mode == "replay":
            idx = self.recorded[self.pos]
            self.pos += 1
            return torch.return_types.topk((x.gather(dim, idx), idx))
        res = self.orig(x, k, dim, *a, **kw)
        self.recorded.append(res.indices)
        return res

    def run(self, mode, fn):
        self.mode, self.pos = mode, 0
        torch.topk = self
        try:
            return fn()
        finally:
            torch.topk = self.orig


def envelope(case_dir: str, replay: bool) -> dict:
    golden = load_file(os.path.join(case_dir, "golden.safetensors"))
    ids, labels = golden["input_ids"], golden["labels"]
    model = ref.load_hf_model(case_dir)
    moe = model.config.num_experts > 0
    topk = TopkReplay()
    if replay:
        with torch.no_grad():
            topk.run("record", lambda: model(input_ids=ids, labels=labels, use_cache=False, output_router_logits=moe))
    model = model.to(torch.bfloat16)
    model.zero_grad(set_to_none=True)
    out = topk.run("replay" if replay else None,
                   lambda: model(input_ids=ids, labels=labels, use_cache=False, output_router_logits=moe))
    logits = out.logits.detach().float()
    lm_loss = ref.batch_lm_loss(logits, labels)
    out.loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
             for n, p in model.named_parameters()}
    grads = ref.checkpoint_tensors(grads)
    res = {
        "what": "transformers bf16 vs its fp32 golden run with the fp32 run's expert choice replayed, "
                "max |d| / max |fp32| per tensor (tools/make_bf16_envelope.py)",
        "torch": torch.__version__,
        "transformers": ref.transformers.__version__,
        "logits": max_rel(logits, golden["logits"]),
        "lm_loss": abs(lm_loss.item() - golden["lm_loss"].item()) / abs(golden["lm_loss"].item()),
        "grads": {},
    }
    for n in sorted(grads):
        res["grads"]["grad." + n] = max_rel(grads[n], golden["grad." + n])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", default=os.path.join(REPO, "tests", "fixtures"))
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args()
    ref.quiet_transformers()
    torch.manual_seed(0)
    status = 0
    for name in sorted(os.listdir(args.fixtures)):
        case_dir = os.path.join(args.fixtures, name)
        if not os.path.isfile(os.path.join(case_dir, "golden.safetensors")):
            continue
        res = envelope(case_dir, replay=True)
        path = os.path.join(case_dir, "bf16_envelope.json")
        worst = max(res["grads"], key=res["grads"].get)
        print(f"{name}: logits {res['logits']:.3g}, lm_loss {res['lm_loss']:.2g}, worst gradient {worst} "
              f"{res['grads'][worst]:.3g}")
        if args.check:
            with open(path) as f:
                old = json.load(f)
            keys = ["logits", "lm_loss"] + [("grads", k) for k in res["grads"]]
            for k in keys:
                a = res[k[0]][k[1]] if isinstance(k, tuple) else res[k]
                b = old[k[0]].get(k[1]) if isinstance(k, tuple) else old.get(k)
                if b is None or abs(a - b) > max(1e-3, 0.4 * abs(b)):
                    print(f"{path}: {k} is {a}, the file says {b}", file=sys.stderr)
                    status = 1
        else:
            with open(path, "w") as f:
                json.dump(res, f, indent=1, sort_keys=True)
                f.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
