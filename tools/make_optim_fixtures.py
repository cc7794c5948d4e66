#!/usr/bin/env python3
"""Build tests/fixtures/optim/adamw.safetensors: torch.optim.AdamW + clip_grad_norm_ on a few small tensors.

Run (from the repo root; CPU, well under a second):

    /root/.cache/nextron/venv/bin/python tools/make_optim_fixtures.py [--out tests/fixtures/optim/adamw.safetensors]

The reference is torch.optim.AdamW's single-tensor path (foreach=False, fused=False; the path torch takes on CPU),
fp32, with weight decay only in the parameter group of the tensors marked `decay` below (the others, like norms
and biases in nextron's ParamTable, get weight_decay 0). Each of STEPS steps:

    1. grads = per-step deterministic random tensors (torch.Generator seeded SEED + 1000 * step), scaled by
       GRAD_SCALE[step] so that some steps are clipped and some are not;
    2. grad_norm[step] = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=False)  (pre-clip total norm);
    3. lr[step] = Megatron's warmup + cosine schedule (nextron's LrSchedule, see src/optim/lr_schedule.h) at
       s = step, with LR, MIN_LR, WARMUP_STEPS, DECAY_STEPS below; set as the group's lr;
    4. optimizer.step().

Tensors (all F32):
    init.<name>          parameters before step 0
    grad.<step>.<name>   the gradients of step <step> BEFORE clipping (the C++ test clips them itself)
    lr                   (STEPS,) learning rate used by each step
    grad_norm            (STEPS,) total L2 norm before clipping, as clip_grad_norm_ returns it
    final.<name>         parameters after the last step
    exp_avg.<name>, exp_avg_sq.<name>   optimizer state after the last step
The hyperparameters are also written as metadata (one key, "config": a JSON object with sorted keys, so the file
is byte-for-byte reproducible; safetensors writes several metadata keys in hash-map order); tests/unit/test_optim.cpp
repeats them (keep both in sync).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

# (name, shape, decay); the order is the flat layout the C++ test builds.
PARAMS = [
    ("w1", (4, 6), True),
    ("norm", (6,), False),
    ("w2", (3, 4), True),
    ("bias", (3,), False),
]
STEPS = 5
SEED = 1234
GRAD_SCALE = [2.0, 0.05, 1.0, 0.1, 0.5]
MAX_NORM = 1.0
LR, MIN_LR, WARMUP_STEPS, DECAY_STEPS = 1e-2, 1e-3, 2, 5
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1


def megatron_lr(s: int) -> float:
    """nextron's LrSchedule (cosine): Megatron-LM OptimizerParamScheduler.get_lr with lr_warmup_init = 0."""
    if WARMUP_STEPS > 0 and s <= WARMUP_STEPS:
        return LR * float(s) / float(WARMUP_STEPS)
    if s > DECAY_STEPS:
        return MIN_LR
    r = float(s - WARMUP_STEPS) / float(DECAY_STEPS - WARMUP_STEPS)
    return MIN_LR + 0.5 * (math.cos(math.pi * r) + 1.0) * (LR - MIN_LR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/optim/adamw.safetensors")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(SEED)
    params = {n: torch.randn(shape, generator=gen, dtype=torch.float32).requires_grad_(True) for n, shape, _ in PARAMS}
    out: dict[str, torch.Tensor] = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    decay = [params[n] for n, _, d in PARAMS if d]
    no_decay = [params[n] for n, _, d in PARAMS if not d]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS, foreach=False, fused=False,
    )
    lrs, norms = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(SEED + 1000 * (step + 1))
        for n, shape, _ in PARAMS:
            grad = torch.randn(shape, generator=g, dtype=torch.float32) * GRAD_SCALE[step]
            params[n].grad = grad.clone()
            out[f"grad.{step}.{n}"] = grad
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM, foreach=False)
        norms.append(float(norm))
        lr = megatron_lr(step)
        lrs.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    for n, p in params.items():
        st = opt.state[p]
        assert int(st["step"]) == STEPS
        out[f"final.{n}"] = p.detach().clone()
        out[f"exp_avg.{n}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].clone()
    out["lr"] = torch.tensor(lrs, dtype=torch.float32)
    out["grad_norm"] = torch.tensor(norms, dtype=torch.float32)
    meta = {
        "torch": torch.__version__,
        "params": ";".join(f"{n}:{'x'.join(map(str, s))}:{'decay' if d else 'no_decay'}" for n, s, d in PARAMS),
        "lr": repr(LR), "min_lr": repr(MIN_LR), "warmup_steps": str(WARMUP_STEPS), "decay_steps": str(DECAY_STEPS),
        "betas": repr(BETAS), "eps": repr(EPS), "weight_decay": repr(WEIGHT_DECAY), "max_norm": repr(MAX_NORM),
        "grad_scale": repr(GRAD_SCALE), "seed": str(SEED),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in out.items()}
    save_file(tensors, args.out, metadata={"config": json.dumps(meta, sort_keys=True)})
    print(f"wrote {args.out}: lr {lrs}, grad_norm {[round(x, 4) for x in norms]}")


if __name__ == "__main__":
    main()
