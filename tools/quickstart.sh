#!/usr/bin/env bash
# Quickstart: set up and build nextron, tokenize the Python standard library's sources (already on any Debian
# machine, no download), train a small Qwen3-Next for a few minutes on the CPU, save checkpoints, export the result
# to HF format, and check the export with transformers.
#   STEPS=300 bash tools/quickstart.sh   (fewer steps for a quicker look)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
BUILD="${NEXTRON_BUILD:-build}"
PY="${NEXTRON_VENV:-$HOME/.cache/nextron/venv}/bin/python"
Q="$BUILD/quickstart"
STEPS="${STEPS:-1500}"
rm -rf "$Q" && mkdir -p "$Q"
export HF_HUB_OFFLINE=1

STDLIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
echo "== tokenizing $STDLIB/*.py (byte-level tokenizer)"
"$PY" tools/preprocess.py "$STDLIB"/[a-z]*.py --tokenizer byte --out "$Q/stdlib.h5" --progress

echo "== training configs/models/qwen3-next-tiny.json for $STEPS steps"
"$BUILD/nextron-train" --model-config configs/models/qwen3-next-tiny.json --data "$Q/stdlib.h5" \
  --seq-len 128 --micro-batch-size 8 --global-batch-size 8 --train-steps "$STEPS" \
  --lr 2e-3 --min-lr 2e-4 --lr-warmup-steps 30 --eval-interval 250 --eval-iters 8 --log-interval 50 \
  --save "$Q/run" --save-interval 500 --keep-last 2 --export-hf "$Q/hf"

"$PY" tools/plot_metrics.py --metrics "$Q/run/metrics.jsonl" --out "$Q/run/loss.png"
echo "== the exported checkpoint in nextron-eval and in transformers"
"$PY" - "$STDLIB/json/decoder.py" "$Q/tokens.txt" <<'PYEOF'
import sys
data = open(sys.argv[1], "rb").read()[:16 * 128]
with open(sys.argv[2], "w") as f:
    for i in range(0, len(data) - 127, 128):
        f.write(" ".join(str(b) for b in data[i:i + 128]) + "\n")
PYEOF
"$BUILD/nextron-eval" --model "$Q/hf" --tokens "$Q/tokens.txt" --out "$Q/eval"
"$PY" tools/hf_eval.py --model "$Q/hf" --tokens "$Q/tokens.txt" --compare "$Q/eval"
echo "== a sample from the trained model (nextron-generate, temperature 0.7, top-k 40, seed 1)"
"$BUILD/nextron-generate" --model "$Q/hf" --tokenizer byte --prompt "def " --max-new-tokens 160 --ignore-eos \
  --temperature 0.7 --top-k 40 --seed 1 \
  --out "$Q/sample.jsonl"
"$PY" -c 'import json, sys; g = json.loads(open(sys.argv[1]).readline()); print(g["prompt"] + g["text"])' "$Q/sample.jsonl"
echo "== done: metrics $Q/run/metrics.jsonl, plot $Q/run/loss.png, checkpoints $Q/run, HF export $Q/hf, sample $Q/sample.jsonl"
