#!/usr/bin/env python3
"""Per-rank peak host memory (getrusage's max RSS, via /usr/bin/time) of saving, loading and converting a sharded
training checkpoint, against the model's size: the evidence for docs/formats.md that no rank holds the whole model.

Runs the small model (configs/models/qwen3-next-small.json) under mpirun at TP 2 x DP 2 (4 ranks):
  train    1 step, no checkpoint                      (the baseline)
  save     1 step and a checkpoint                    (save = its peak minus the baseline's)
  train2   2 steps, saving at the end                 (the baseline of load)
  load     resume that checkpoint, 1 more step, saving at the end (load = its peak minus train2's)
and nextron-convert of the checkpoint to HF (one process; its whole peak). Prints a table; --json writes it.

  python tools/measure_checkpoint_memory.py --build build [--work /tmp/ckmem] [--json out.json]
"""
import argparse
import json
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(REPO, "configs", "models", "qwen3-next-small.json")
DATA = os.path.join(REPO, "tests", "fixtures", "gpu_check", "data.h5")
NP = 4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True)
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--work", default="/tmp/nextron_ckmem")
    ap.add_argument("--json")
    args = ap.parse_args()
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    train = os.path.join(args.build, "nextron-train")
    common = ["--model-config", SMALL, "--data", DATA, "--seq-len", "32", "--micro-batch-size", "1",
              "--global-batch-size", "2", "--tensor-model-parallel-size", "2", "--lr", "1e-3", "--no-progress",
              "--threads", "1", "--peak-tflops", "1", "--valid-fraction", "0"]

    def ranks_peak_mib(name, extra):
        """Runs nextron-train on NP ranks, each under /usr/bin/time; returns each rank's max RSS in MiB."""
        out = os.path.join(w, name + ".rss")
        inner = " ".join(["/usr/bin/time", "-f", "%M", "-o", out + ".$OMPI_COMM_WORLD_RANK", train] + common + extra)
        r = subprocess.run([args.mpiexec, "--allow-run-as-root", "--oversubscribe", "-np", str(NP), "bash", "-c", inner],
                           capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return [int(open(f"{out}.{k}").read().split()[-1]) / 1024 for k in range(NP)]

    base = ranks_peak_mib("train", ["--train-steps", "1"])
    save_dir = os.path.join(w, "ck")
    save = ranks_peak_mib("save", ["--train-steps", "1", "--save", save_dir, "--save-interval", "1"])
    ck = os.path.join(save_dir, "step_00000001")
    load_dir = os.path.join(w, "load")
    shutil.copytree(ck, os.path.join(load_dir, "step_00000001"))
    load = ranks_peak_mib("load", ["--train-steps", "2", "--save", load_dir, "--save-interval", "100"])
    # The 2-step run also ends with a save; measure the load alone against a 2-step run without a checkpoint to read.
    base2 = ranks_peak_mib("train2", ["--train-steps", "2", "--save", os.path.join(w, "base2"),
                                      "--save-interval", "100"])
    hf = os.path.join(w, "hf")
    rss = os.path.join(w, "convert.rss")
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss, os.path.join(args.build, "nextron-convert"), "--in", ck,
                    "--out", hf], check=True, capture_output=True, env=env)
    convert = int(open(rss).read().split()[-1]) / 1024
    with __import__("h5py").File(os.path.join(ck, "metadata.h5"), "r") as md:
        numel = int(md.attrs["total_numel"])
    shards = {f: os.path.getsize(os.path.join(ck, f)) / 2**20 for f in sorted(os.listdir(ck)) if f.startswith("shard_")}
    model_mib = numel * 4 / 2**20
    result = {"parameters": numel, "model_fp32_mib": model_mib, "model_and_moments_mib": 3 * model_mib,
              "shard_mib": shards, "train_peak_mib": base, "save_peak_mib": save,
              "save_extra_mib": [s - b for s, b in zip(save, base)], "train2_peak_mib": base2, "load_peak_mib": load,
              "load_extra_mib": [l - b for l, b in zip(load, base2)], "convert_peak_mib": convert}
    print(f"model: {numel} parameters, {model_mib:.1f} MiB fp32, {3 * model_mib:.1f} MiB with both moments")
    print("rank  shard MiB  train peak  save peak  (+)   train2 peak  load peak  (+)")
    for k, f in enumerate(shards):
        print(f"{k:4d}  {shards[f]:9.1f}  {base[k]:10.1f}  {save[k]:9.1f}  {save[k] - base[k]:+5.1f}  "
              f"{base2[k]:11.1f}  {load[k]:9.1f}  {load[k] - base2[k]:+5.1f}")
    print(f"nextron-convert (one process, whole checkpoint to HF): peak {convert:.1f} MiB")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
