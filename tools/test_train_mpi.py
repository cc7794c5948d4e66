#!/usr/bin/env python3
"""nextron-train as an MPI job (mpirun -np 4): TP 2 x DP 2 with sequence parallelism against one process, rank-0-only
logging, checkpoints that resume bit-identically at the same layout and also load into another layout, and a bad
layout that fails on every rank without hanging. Pipelines: PP 2 x DP 2 and interleaved PP 2 x VPP 2 against one
process, a PP checkpoint resumed on one process and a one-process checkpoint resumed under PP 4. Experts: EP 2 x EDP 2
against one process, its checkpoint resumed under EP 4, folded experts (TP 2 + SP, ETP 1, EP 2), an EP that does
not divide the experts.

    python tools/test_train_mpi.py --train build/nextron-train --mpiexec mpiexec --work build/train_mpi

Prints "train_mpi: N passed, M failed"; exit code 0 only when all pass.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

import h5py
import numpy as np

from checks import Checks
from train_test_data import TINY, fresh_byte_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    w = args.work
    data = fresh_byte_dataset(w)
    # Global batch 8 of 32 tokens; micro-batch 2 per DP rank (one process: 4 = 2 x DP 2, the same micro-batches).
    common = ["--model-config", TINY, "--data", data, "--seq-len", "32", "--global-batch-size", "8", "--lr", "1e-3",
              "--lr-warmup-steps", "2", "--lr-decay-steps", "6", "--no-progress", "--threads", "1", "--peak-tflops", "1",
              "--valid-fraction", "0.05"]
    tp2dp2 = common + ["--micro-batch-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    check = Checks()

    def run(extra, np=4):
        cmd = [args.train] + extra
        if np > 1:
            cmd = [args.mpiexec, "--allow-run-as-root", "--oversubscribe", "-np", str(np)] + cmd
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


    def losses(path):
        return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r.get("kind") == "train"}

    # 1. TP 2 x DP 2 + SP, 4 steps saving at 2 and 4, with validation and an HF export.
    par = os.path.join(w, "par")
    r = run(tp2dp2 + ["--train-steps", "4", "--save", par, "--save-interval", "2", "--eval-interval", "2",
                      "--export-hf", os.path.join(w, "hf")])
    check("TP2 x DP2 + SP job runs", r.returncode == 0, r.stdout[-600:] + r.stderr[-800:])
    check("only rank 0 logs", r.stdout.count("step 1/4") == 1 and "TP 2" in r.stdout, r.stdout[-600:])
    saved = sorted(d for d in os.listdir(par) if d.startswith("step_")) if os.path.isdir(par) else []
    check("checkpoints saved", saved == ["step_00000002", "step_00000004"], str(saved))
    check("HF export written", os.path.exists(os.path.join(w, "hf", "model.safetensors")))

    # 2. The same training on one process: the same losses (fp32; only summation orders differ).
    one = os.path.join(w, "one")
    r = run(common + ["--micro-batch-size", "4", "--train-steps", "4", "--save", one], np=1)
    check("one-process run", r.returncode == 0, r.stderr[-800:])
    lp, l1 = losses(os.path.join(par, "metrics.jsonl")), losses(os.path.join(one, "metrics.jsonl"))
    check("losses equal the one-process run within 1e-5",
          sorted(lp) == [1, 2, 3, 4] and all(abs(lp[s] - l1[s]) <= 1e-5 * abs(l1[s]) for s in lp), f"{lp} vs {l1}")

    # 3. Resume at the same layout: steps 5-6 bit-identical to an uninterrupted 6-step run.
    r = run(tp2dp2 + ["--train-steps", "6", "--save", par])
    check("resume continues at step 5", r.returncode == 0 and "continuing at step 4" in r.stdout and
          "step 5/6" in r.stdout, r.stdout[-600:] + r.stderr[-600:])
    full = os.path.join(w, "full")
    r = run(tp2dp2 + ["--train-steps", "6", "--save", full])
    lr_, lf = losses(os.path.join(par, "metrics.jsonl")), losses(os.path.join(full, "metrics.jsonl"))
    check("resumed steps are bit-identical", r.returncode == 0 and lr_.get(5) == lf.get(5) and
          lr_.get(6) == lf.get(6), f"{lr_} vs {lf}")

    # 3b. --async-save: the shards of interval checkpoints are written by a background thread while training goes on;
    # the training is the same bit for bit, every checkpoint completes, holds the synchronous save's bytes and
    # resumes bit-identically.
    asy = os.path.join(w, "async")
    r = run(tp2dp2 + ["--train-steps", "6", "--save", asy, "--save-interval", "2", "--async-save"])
    la = losses(os.path.join(asy, "metrics.jsonl")) if r.returncode == 0 else {}
    saved = sorted(d for d in os.listdir(asy) if d.startswith("step_")) if os.path.isdir(asy) else []
    check("--async-save trains bit-identically and completes every checkpoint", r.returncode == 0 and la == lf and
          saved == ["step_00000002", "step_00000004", "step_00000006"] and
          r.stdout.count("(written in the background)") == 2, f"{saved} {la} vs {lf}; {r.stdout[-600:]}{r.stderr[-600:]}")
    same = all(open(os.path.join(asy, "step_00000004", f), "rb").read() ==
               open(os.path.join(par, "step_00000004", f), "rb").read()
               for f in os.listdir(os.path.join(par, "step_00000004")) if f.startswith("shard_"))
    check("a shard written in the background equals the synchronous save's byte for byte", same)
    res = os.path.join(w, "async_resume")
    shutil.copytree(os.path.join(asy, "step_00000004"), os.path.join(res, "step_00000004"))
    r = run(tp2dp2 + ["--train-steps", "6", "--save", res])
    lr2 = losses(os.path.join(res, "metrics.jsonl")) if r.returncode == 0 else {}
    check("a checkpoint written in the background resumes bit-identically", lr2.get(5) == lf.get(5) and
          lr2.get(6) == lf.get(6), f"{lr2} vs {lf}; {r.stderr[-600:]}")

    # 4. The checkpoint holds the whole model: it also resumes under another layout (DP 4, micro-batch 1).
    other = os.path.join(w, "other")
    shutil.copytree(os.path.join(par, "step_00000004"), os.path.join(other, "step_00000004"))
    r = run(common + ["--micro-batch-size", "1", "--train-steps", "6", "--save", other])
    lo = losses(os.path.join(other, "metrics.jsonl")) if r.returncode == 0 else {}
    check("resumes under DP 4", r.returncode == 0 and "continuing at step 4" in r.stdout and
          all(abs(lo.get(s, 0) - lf[s]) <= 1e-4 * abs(lf[s]) for s in (5, 6)), f"{lo} vs {lf}; {r.stderr[-600:]}")

    # 4b. The sharded format: each of the 4 ranks wrote its own shard and no element twice (the params and moment
    # datasets of all shards add up to the model's size exactly); the checkpoint resumes on one process and on two
    # ranks (TP 2) continuing the uninterrupted run; a damaged shard is named and --resume auto takes the older one.
    ck = os.path.join(par, "step_00000004")
    shards = sorted(f for f in os.listdir(ck) if f.startswith("shard_"))
    with h5py.File(os.path.join(ck, "metadata.h5"), "r") as md:
        # The parameters' elements (the flat layout's alignment gaps between them are not stored).
        ndim, dims = md["param_ndim"][()], md["param_dims"][()]
        total, at = 0, 0
        for n in ndim:
            total += int(np.prod(dims[at:at + n]))
            at += n
    stored = {"params": 0, "exp_avg": 0}
    for f in shards:  # the 64-byte header: magic, then version, rank, shards, total, params, moments, reserved
        header = struct.unpack("<8s7q", open(os.path.join(ck, f), "rb").read(64))
        stored["params"] += header[5]
        stored["exp_avg"] += header[6]
    check("TP2 x DP2 wrote 4 shards holding every element once", len(shards) == 4 and
          stored == {"params": total, "exp_avg": total}, f"{shards} {stored} vs {total}")
    for name, np_, extra in (("one process", 1, ["--micro-batch-size", "4"]),
                             ("TP 2 (2 ranks)", 2, ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2"])):
        where = os.path.join(w, "reshard_" + str(np_))
        shutil.copytree(ck, os.path.join(where, "step_00000004"))
        r = run(common + extra + ["--train-steps", "6", "--save", where], np=np_)
        lo = losses(os.path.join(where, "metrics.jsonl")) if r.returncode == 0 else {}
        check(f"the TP2 x DP2 checkpoint resumes on {name}", r.returncode == 0 and "continuing at step 4" in r.stdout
              and all(abs(lo.get(s, 0) - lf[s]) <= 1e-4 * abs(lf[s]) for s in (5, 6)), f"{lo} vs {lf}; {r.stderr[-600:]}")
    # nextron-convert streams the 4-rank checkpoint into the same HF file the job exported at that step, byte for
    # byte (the export itself is checked against transformers by hf_round_trip).
    convert = os.path.join(os.path.dirname(os.path.abspath(args.train)), "nextron-convert")
    r = subprocess.run([convert, "--in", ck, "--out", os.path.join(w, "ck_hf")], capture_output=True, text=True,
                       timeout=300)
    same = r.returncode == 0 and open(os.path.join(w, "ck_hf", "model.safetensors"), "rb").read() == \
        open(os.path.join(w, "hf", "model.safetensors"), "rb").read()
    check("nextron-convert of the 4-rank checkpoint equals the job's HF export byte for byte", same, r.stderr[-600:])
    damaged = os.path.join(w, "damaged")
    for step in ("step_00000004", "step_00000006"):
        shutil.copytree(os.path.join(par, step), os.path.join(damaged, step))
    with open(os.path.join(damaged, "step_00000006", "shard_00002.bin"), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    r = run(tp2dp2 + ["--train-steps", "6", "--save", damaged])
    check("a damaged shard is named and --resume auto takes the older checkpoint",
          r.returncode == 0 and "shard_00002.bin" in r.stderr and "checksum" in r.stderr and
          "continuing at step 4" in r.stdout, r.stdout[-400:] + r.stderr[-800:])

    # 4c. Context parallelism end to end: the tiny model at S = 4096 split over CP 4 (zigzag: 8 chunks of 512 tokens,
    # rank c holding chunks c and 7 - c; the DeltaNet state and conv halo passed between chunks, attention over the
    # gathered keys) trains with the losses of
    # one process; its sharded checkpoint resumes on one process and continues the uninterrupted run.
    long = ["--model-config", TINY, "--data", data, "--seq-len", "4096", "--global-batch-size", "4",
            "--micro-batch-size", "1", "--lr", "1e-3", "--lr-warmup-steps", "1", "--lr-decay-steps", "4",
            "--no-progress", "--threads", "1", "--peak-tflops", "1", "--valid-fraction", "0"]
    cp_one, cp4 = os.path.join(w, "cp_one"), os.path.join(w, "cp4")
    r = run(long + ["--train-steps", "4", "--save", cp_one], np=1)
    l_one = losses(os.path.join(cp_one, "metrics.jsonl")) if r.returncode == 0 else {}
    r = run(long + ["--train-steps", "3", "--save", cp4, "--context-parallel-size", "4"])
    l_cp = losses(os.path.join(cp4, "metrics.jsonl")) if r.returncode == 0 else {}
    check("CP 4 at S = 4096 equals the one-process losses within 1e-5", r.returncode == 0 and "CP 4" in r.stdout and
          sorted(l_cp) == [1, 2, 3] and all(abs(l_cp[s] - l_one.get(s, 0)) <= 1e-5 * abs(l_one.get(s, 1))
                                            for s in l_cp), f"{l_cp} vs {l_one}; {r.stderr[-800:]}")
    r = run(long + ["--train-steps", "4", "--save", cp4], np=1)
    l_res = losses(os.path.join(cp4, "metrics.jsonl")) if r.returncode == 0 else {}
    check("the CP 4 checkpoint resumes on one process", r.returncode == 0 and "continuing at step 3" in r.stdout and
          abs(l_res.get(4, 0) - l_one.get(4, 1)) <= 1e-4 * abs(l_one.get(4, 1)), f"{l_res} vs {l_one}; {r.stderr[-600:]}")
    r = run(common + ["--micro-batch-size", "2", "--train-steps", "1", "--context-parallel-size", "3"], np=3)
    check("CP 3 with sequences of 32 fails naming it", r.returncode != 0 and "not divisible by 2 x CP = 6" in r.stderr
          and "--context-parallel-order contiguous" in r.stderr, r.stderr[-600:])

    # 5. Pipeline parallelism: PP 2 x DP 2 (1F1B) and PP 2 x VPP 2 (interleaved, 2 ranks) give the one-process losses
    # (the same micro-batches: global micro-batch 4); the PP checkpoint resumes on one process and the one-process
    # checkpoint under PP 4, both continuing the uninterrupted run.
    pp = os.path.join(w, "pp")
    r = run(common + ["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2", "--train-steps", "4",
                      "--save", pp, "--eval-interval", "4"])
    lpp = losses(os.path.join(pp, "metrics.jsonl")) if r.returncode == 0 else {}
    check("PP2 x DP2 losses equal the one-process run within 1e-5", r.returncode == 0 and sorted(lpp) == [1, 2, 3, 4] and
          all(abs(lpp[s] - l1[s]) <= 1e-5 * abs(l1[s]) for s in lpp), f"{lpp} vs {l1}; {r.stderr[-800:]}")
    check("PP2 x DP2 validates and logs the layout", "valid step 4" in r.stdout and "PP 2" in r.stdout, r.stdout[-600:])
    vpp = os.path.join(w, "vpp")
    r = run(common + ["--micro-batch-size", "1", "--pipeline-model-parallel-size", "2",
                      "--virtual-pipeline-model-parallel-size", "2", "--train-steps", "2", "--save", vpp], np=2)
    one_m1 = os.path.join(w, "one_m1")
    r1 = run(common + ["--micro-batch-size", "1", "--train-steps", "2", "--save", one_m1], np=1)
    lv, lm1 = (losses(os.path.join(d, "metrics.jsonl")) if os.path.exists(os.path.join(d, "metrics.jsonl")) else {}
               for d in (vpp, one_m1))
    check("PP2 x VPP2 losses equal the one-process run within 1e-5", r.returncode == 0 and r1.returncode == 0 and
          sorted(lv) == [1, 2] and all(abs(lv[s] - lm1[s]) <= 1e-5 * abs(lm1[s]) for s in lv),
          f"{lv} vs {lm1}; {r.stderr[-800:]}")
    pp_to_one = os.path.join(w, "pp_to_one")
    shutil.copytree(os.path.join(pp, "step_00000004"), os.path.join(pp_to_one, "step_00000004"))
    r = run(common + ["--micro-batch-size", "4", "--train-steps", "6", "--save", pp_to_one], np=1)
    lo = losses(os.path.join(pp_to_one, "metrics.jsonl")) if r.returncode == 0 else {}
    check("a PP2 checkpoint resumes on one process", r.returncode == 0 and "continuing at step 4" in r.stdout and
          all(abs(lo.get(s, 0) - lf[s]) <= 1e-4 * abs(lf[s]) for s in (5, 6)), f"{lo} vs {lf}; {r.stderr[-600:]}")
    one_to_pp = os.path.join(w, "one_to_pp")
    shutil.copytree(os.path.join(one, "step_00000004"), os.path.join(one_to_pp, "step_00000004"))
    r = run(common + ["--micro-batch-size", "4", "--pipeline-model-parallel-size", "4", "--train-steps", "6",
                      "--save", one_to_pp])
    lo = losses(os.path.join(one_to_pp, "metrics.jsonl")) if r.returncode == 0 else {}
    check("a one-process checkpoint resumes under PP4", r.returncode == 0 and "continuing at step 4" in r.stdout and
          all(abs(lo.get(s, 0) - lf[s]) <= 1e-4 * abs(lf[s]) for s in (5, 6)), f"{lo} vs {lf}; {r.stderr[-600:]}")
    r = run(common + ["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2",
                      "--virtual-pipeline-model-parallel-size", "4", "--train-steps", "1"], np=2)
    check("PP x VPP beyond the layer count fails naming it", r.returncode != 0 and
          "is not divisible by PP x VPP = 2 x 4" in r.stderr, r.stderr[-800:])

    # Recomputation changes no number: the one-process run again with whole layers recomputed, and PP2 with the MLP
    # blocks recomputed; a flag that does not combine is refused.
    rc = os.path.join(w, "rc")
    r = run(common + ["--micro-batch-size", "4", "--train-steps", "4", "--save", rc, "--recompute-granularity", "full",
                      "--recompute-method", "uniform", "--recompute-num-layers", "2"], np=1)
    lrc = losses(os.path.join(rc, "metrics.jsonl")) if r.returncode == 0 else {}
    check("full recomputation gives the same losses bit for bit", lrc == l1, f"{lrc} vs {l1}; {r.stderr[-600:]}")
    rcp = os.path.join(w, "rcp")
    r = run(common + ["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2", "--train-steps", "4",
                      "--save", rcp, "--recompute-granularity", "selective", "--recompute-modules", "mlp", "moe"])
    lrcp = losses(os.path.join(rcp, "metrics.jsonl")) if r.returncode == 0 else {}
    check("PP2 x DP2 with selective recomputation equals PP2 x DP2 without", lrcp == lpp, f"{lrcp} vs {lpp}")
    r = run(common + ["--micro-batch-size", "2", "--recompute-granularity", "full", "--train-steps", "1"])
    check("full recomputation without a method fails naming it", r.returncode != 0 and
          "needs --recompute-method uniform or block" in r.stderr, r.stderr[-600:])

    # Vocabulary padding: a 257-id (byte) vocabulary under TP 2 pads to 512 rows (128 x TP) and trains like one
    # process (padded to 384); the export holds the real 257 rows.
    cfg = json.load(open(TINY))
    cfg["vocab_size"] = 257
    byte_cfg = os.path.join(w, "byte_vocab.json")
    json.dump(cfg, open(byte_cfg, "w"))
    bcommon = [a if a != TINY else byte_cfg for a in common]
    b2, b1 = os.path.join(w, "byte_tp2"), os.path.join(w, "byte_one")
    r = run(bcommon + ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2", "--train-steps", "2", "--save", b2,
                       "--export-hf", os.path.join(w, "byte_hf")], np=2)
    r1 = run(bcommon + ["--micro-batch-size", "4", "--train-steps", "2", "--save", b1], np=1)
    lb2, lb1 = (losses(os.path.join(d, "metrics.jsonl")) if os.path.exists(os.path.join(d, "metrics.jsonl")) else {}
                for d in (b2, b1))
    check("a 257-id vocabulary trains under TP 2 (padded) like one process", r.returncode == 0 and r1.returncode == 0 and
          sorted(lb2) == [1, 2] and all(abs(lb2[s] - lb1[s]) <= 1e-5 * abs(lb1[s]) for s in lb2),
          f"{lb2} vs {lb1}; {r.stderr[-600:]}")
    def tensor_shapes(path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return {k: v["shape"] for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
    st = os.path.join(w, "byte_hf", "model.safetensors")
    shapes = tensor_shapes(st) if os.path.exists(st) else {}
    check("the export holds the real vocabulary (257 rows)",
          shapes.get("model.embed_tokens.weight", [0])[0] == 257 and shapes.get("lm_head.weight", [0])[0] == 257,
          str({k: v for k, v in shapes.items() if "embed" in k or "lm_head" in k}))

    # Expert parallelism: EP 2 x EDP 2 over 4 ranks (micro-batch 1: the one-process run's micro-batches) gives the
    # one-process losses; its checkpoint resumes under EP 4 and continues the uninterrupted run; an EP that does not
    # divide the experts is refused naming it.
    ep = os.path.join(w, "ep")
    r = run(common + ["--micro-batch-size", "1", "--expert-model-parallel-size", "2", "--train-steps", "4",
                      "--save", ep, "--moe-per-layer-logging"])
    lep = losses(os.path.join(ep, "metrics.jsonl")) if r.returncode == 0 else {}
    check("EP2 x EDP2 losses equal the one-process run within 1e-5", r.returncode == 0 and sorted(lep) == [1, 2, 3, 4] and
          all(abs(lep[s] - l1[s]) <= 1e-5 * abs(l1[s]) for s in lep), f"{lep} vs {l1}; {r.stderr[-800:]}")
    check("EP2 logs the expert grid", "EP 2" in r.stdout, r.stdout[-600:])
    metrics_path = os.path.join(ep, "metrics.jsonl")
    loads = [json.loads(x) for x in open(metrics_path)] if os.path.exists(metrics_path) else []
    loads = [x for x in loads if x.get("kind") == "expert_load"]
    tokens_per_layer = 8 * 32 * json.load(open(TINY))["num_experts_per_tok"]
    check("--moe-per-layer-logging writes every step's expert load",
          [x["step"] for x in loads] == [1, 2, 3, 4] and
          all(sum(t) == tokens_per_layer for x in loads for t in x["tokens"]), str(loads[:1])[:400])
    plot = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "plot_metrics.py"), "--metrics",
                           metrics_path, "--expert-load", str(loads[0]["layers"][0]) if loads else "0"],
                          capture_output=True, text=True, timeout=120)
    check("plot_metrics draws the expert load", plot.returncode == 0 and
          os.path.exists(os.path.join(ep, "expert_load.png")), plot.stderr[-400:])
    ep_to_ep4 = os.path.join(w, "ep_to_ep4")
    if os.path.isdir(os.path.join(ep, "step_00000004")):
        shutil.copytree(os.path.join(ep, "step_00000004"), os.path.join(ep_to_ep4, "step_00000004"))
    r = run(common + ["--micro-batch-size", "1", "--expert-model-parallel-size", "4", "--train-steps", "6",
                      "--save", ep_to_ep4])
    lo = losses(os.path.join(ep_to_ep4, "metrics.jsonl")) if r.returncode == 0 else {}
    check("an EP2 checkpoint resumes under EP4", r.returncode == 0 and "continuing at step 4" in r.stdout and
          all(abs(lo.get(s, 0) - lf[s]) <= 1e-4 * abs(lf[s]) for s in (5, 6)), f"{lo} vs {lf}; {r.stderr[-600:]}")
    # MoE parallel folding: TP 2 + SP with whole experts (ETP 1) over EP 2 (the TP group), DP 2.
    fold = os.path.join(w, "fold")
    r = run(common + ["--micro-batch-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                      "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1", "--train-steps", "4",
                      "--save", fold])
    lfold = losses(os.path.join(fold, "metrics.jsonl")) if r.returncode == 0 else {}
    check("TP2 + SP x EP2 with ETP 1 (folded) equals the one-process run within 1e-5", r.returncode == 0 and
          sorted(lfold) == [1, 2, 3, 4] and all(abs(lfold[s] - l1[s]) <= 1e-5 * abs(l1[s]) for s in lfold),
          f"{lfold} vs {l1}; {r.stderr[-800:]}")
    r = run(common + ["--micro-batch-size", "2", "--expert-model-parallel-size", "3", "--train-steps", "1"], np=3)
    check("EP 3 with 8 experts fails naming it", r.returncode != 0 and "is not divisible by EP 3" in r.stderr,
          r.stderr[-800:])

    # 6. Bad layouts: every rank finds the problem before any communication and aborts the job (no hang), so at least
    # the first rank's message is printed (MPI_Abort may kill the others before they print theirs).
    r = run(common + ["--micro-batch-size", "2", "--tensor-model-parallel-size", "3", "--train-steps", "1"])
    check("TP 3 fails naming the constraint", r.returncode != 0 and r.stderr.count("num_attention_heads 4 is not divisible by"
                                                                            " TP 3") >= 1, r.stderr[-800:])
    r = run(common + ["--micro-batch-size", "8", "--tensor-model-parallel-size", "2", "--train-steps", "1"])
    check("global batch not divisible by micro x DP", r.returncode != 0 and
          "must be a multiple of --micro-batch-size x data-parallel size" in r.stderr, r.stderr[-800:])
    r = run(common + ["--micro-batch-size", "2", "--tensor-model-parallel-size", "2"], np=1)
    check("a layout larger than the world", r.returncode == 1 and "world size 1 is not divisible" in r.stderr,
          r.stderr[-600:])

    return check.report("train_mpi")


if __name__ == "__main__":
    sys.exit(main())
