#!/usr/bin/env bash
# Quickstart: build nextron, import a small HF Qwen3-Next checkpoint (made here with transformers, no download),
# score text from the Python standard library with nextron-eval, and compare with transformers on the same tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
BUILD="${NEXTRON_BUILD:-build}"
PY="${NEXTRON_VENV:-$HOME/.cache/nextron/venv}/bin/python"
Q="$BUILD/quickstart"
rm -rf "$Q" && mkdir -p "$Q"
export HF_HUB_OFFLINE=1

"$PY" tools/make_checkpoint.py --config configs/models/qwen3-next-tiny.json --out "$Q/hf" --seed 0
# Byte-level tokens of a standard-library source file, 128 tokens a line.
"$PY" - "$Q/tokens.txt" <<'PYEOF'
import inspect, json.decoder, sys
data = open(inspect.getsourcefile(json.decoder), "rb").read()[:16 * 128]
with open(sys.argv[1], "w") as f:
    for i in range(0, len(data) - 127, 128):
        f.write(" ".join(str(b) for b in data[i:i + 128]) + "\n")
PYEOF
echo "== nextron-eval"
"$BUILD/nextron-eval" --model "$Q/hf" --tokens "$Q/tokens.txt" --out "$Q/eval"
echo "== transformers on the same tokens"
"$PY" tools/hf_eval.py --model "$Q/hf" --tokens "$Q/tokens.txt" --compare "$Q/eval"
