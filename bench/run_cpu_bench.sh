#!/usr/bin/env bash
# CPU forward+backward throughput of nextron against transformers + torch, same config, batch and thread count,
# measured in the same run. Adds a table row per config to the CPU table of docs/benchmarks.md (after its last row;
# or prints with --dry-run).
#   bash bench/run_cpu_bench.sh [--dry-run] [config ...]   (default: tiny and small)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${NEXTRON_BUILD:-build}"
PY="${NEXTRON_VENV:-$HOME/.cache/nextron/venv}/bin/python"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(configs/models/qwen3-next-tiny.json configs/models/qwen3-next-small.json)
THREADS="${THREADS:-$(nproc)}"
BATCH="${BATCH:-2}"
SEQ="${SEQ:-256}"
STEPS="${STEPS:-5}"
cmake --build "$BUILD" -j"$(nproc)" --target nextron-bench >/dev/null
commit=$(git rev-parse --short HEAD)
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
for cfg in "${CONFIGS[@]}"; do
  ours=$("$BUILD/nextron-bench" --config "$cfg" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup 1 --threads "$THREADS")
  theirs=$(HF_HUB_OFFLINE=1 "$PY" tools/bench_torch.py --config "$cfg" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup 1 --threads "$THREADS" | tail -1)
  row=$("$PY" - "$cfg" "$ours" "$theirs" "$commit" "$cpu" "$THREADS" "$BATCH" "$SEQ" <<'PYEOF'
import json, sys
cfg, ours, theirs, commit, cpu, threads, batch, seq = sys.argv[1:]
o, t = json.loads(ours), json.loads(theirs)
print(f"| {cfg.split('/')[-1]} | {batch}x{seq} | {threads} | {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} "
      f"(torch {t['torch']}, transformers {t['transformers']}, experts {t.get('experts_implementation', '?')}) "
      f"| **{o['tokens_per_s'] / t['tokens_per_s']:.2f}x** | {commit} | {cpu} |")
PYEOF
)
  echo "$row"
  if [ "$DRY" = 0 ]; then
    # Insert after the last row of the first table (the CPU section's), not at the end of the file.
    "$PY" - "$row" <<'PYEOF'
import sys
row, path = sys.argv[1], "docs/benchmarks.md"
lines = open(path).read().split("\n")
start = next(i for i, l in enumerate(lines) if l.startswith("| config |"))
end = start
while end + 1 < len(lines) and lines[end + 1].startswith("|"):
    end += 1
lines.insert(end + 1, row)
open(path, "w").write("\n".join(lines))
PYEOF
  fi
done
