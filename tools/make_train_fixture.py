"""Golden training curve: train a tiny Qwen3-Next with transformers + torch.optim.AdamW and record every step.

    ~/.cache/nextron/venv/bin/python tools/make_train_fixture.py [--out tests/fixtures/train_curve]

Writes OUT/hf/ (the initial HF checkpoint), OUT/batches.safetensors ("tokens": int64 (steps, accum, micro, S+1),
one training sample per row: ids = row[:S], targets = row[1:]) and OUT/expected.safetensors ("loss", "lm_loss",
"aux_loss", "grad_norm", "lr": f32 (steps,); "final.<checkpoint name>": every parameter after the last step) with
the optimizer settings as JSON metadata. nextron's trainer, started from OUT/hf on the same batches with the same
settings, must reproduce the curve (tests/golden/test_train_curve.cpp).

Semantics (the same as nextron-train): per micro-batch, loss = mean CE over its S * micro targets +
router_aux_loss_coef * load-balancing loss of that micro-batch; gradients are averaged over the accum micro-batches;
clip_grad_norm_(clip); lr from Megatron's warmup (lr * s / warmup for s <= warmup, s = optimizer steps taken so
far) then cosine to min_lr at `steps`; torch.optim.AdamW (foreach=False) with weight decay only on matrices
(not on norms, biases, A_log, dt_bias). The loss recorded for step s is the mean over micro-batches before update s.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nextron_tools import hf_reference as ref  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from make_fixtures import CASES  # noqa: E402

SETTINGS = dict(steps=12, accum=2, micro=2, seq=24, lr=3e-3, min_lr=3e-4, warmup=2, clip=1.0, weight_decay=0.1,
                beta1=0.9, beta2=0.95, eps=1e-8, seed=7, distinct_batches=3)


def lr_at(s, st):
    if st["warmup"] > 0 and s <= st["warmup"]:
        return st["lr"] * s / st["warmup"]
    r = (s - st["warmup"]) / (st["steps"] - st["warmup"])
    return st["min_lr"] + 0.5 * (math.cos(math.pi * r) + 1) * (st["lr"] - st["min_lr"])


def no_decay(name):
    return name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith(".bias") or \
        name.endswith("A_log") or name.endswith("dt_bias")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "tests", "fixtures", "train_curve"))
    args = ap.parse_args()
    st = SETTINGS
    ref.quiet_transformers()
    ref.assert_torch_kernels()
    ref.set_determinism(1)
    torch.manual_seed(st["seed"])
    case = next(c for c in CASES if c.name == "hybrid_moe")
    model = ref.build_model(ref.make_config(**case.config))  # transformers' own initialisation
    # ... except A_log: transformers draws A from U(0.01, 16), and a head with A ~ 10 decays its state by
    # exp(-10) per token, so its gate gradients (A_log, dt_bias, in_proj_ba rows) are ~1e-8, the size of AdamW's
    # eps. AdamW's normalised update then turns fp32 rounding noise (ours and torch's own chunked decays) into
    # O(lr) weight differences. A in [0.5, 3] keeps every gradient well conditioned; the math is unchanged.
    with torch.no_grad():
        gen_a = torch.Generator().manual_seed(st["seed"] + 1)
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 3.0, generator=gen_a).log())
    model.train()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(os.path.join(args.out, "hf"), safe_serialization=True)
    coef = model.config.router_aux_loss_coef
    V = model.config.vocab_size

    gen = torch.Generator().manual_seed(st["seed"])
    distinct = torch.randint(0, V, (st["distinct_batches"], st["accum"], st["micro"], st["seq"] + 1), generator=gen)
    tokens = torch.stack([distinct[s % st["distinct_batches"]] for s in range(st["steps"])])

    decay = [p for n, p in model.named_parameters() if not no_decay(n)]
    nodecay = [p for n, p in model.named_parameters() if no_decay(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": st["weight_decay"]},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=st["lr"], betas=(st["beta1"], st["beta2"]), eps=st["eps"], foreach=False)
    rec = {k: [] for k in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr")}
    for s in range(st["steps"]):
        opt.zero_grad(set_to_none=False)
        tot = lm_tot = aux_tot = 0.0
        for a in range(st["accum"]):
            sample = tokens[s, a]
            ids, targets = sample[:, :-1], sample[:, 1:]
            out = model(input_ids=ids, use_cache=False, output_router_logits=True)
            lm = F.cross_entropy(out.logits.float().reshape(-1, V), targets.reshape(-1))
            loss = lm + coef * out.aux_loss
            (loss / st["accum"]).backward()
            tot += loss.item() / st["accum"]
            lm_tot += lm.item() / st["accum"]
            aux_tot += out.aux_loss.item() / st["accum"]
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), st["clip"])
        lr = lr_at(s, st)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        for k, v in zip(rec, (tot, lm_tot, aux_tot, gn.item(), lr)):
            rec[k].append(v)
        print(f"step {s}: loss {tot:.6f} lm {lm_tot:.6f} aux {aux_tot:.6f} grad_norm {gn.item():.6f} lr {lr:.6g}")

    final = ref.checkpoint_tensors({n: p.detach().clone() for n, p in model.named_parameters()})
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in rec.items()}
    tensors.update({"final." + n: t.float().contiguous() for n, t in final.items()})
    meta = {"settings": json.dumps(st, sort_keys=True), "versions": json.dumps(ref.versions(), sort_keys=True)}
    ref.save_safetensors_deterministic(tensors, os.path.join(args.out, "expected.safetensors"), meta)
    ref.save_safetensors_deterministic({"tokens": tokens.to(torch.int64).contiguous()},
                                       os.path.join(args.out, "batches.safetensors"), meta)
    for f in os.listdir(os.path.join(args.out, "hf")):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(args.out, "hf", f))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
