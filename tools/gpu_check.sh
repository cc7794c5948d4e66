#!/usr/bin/env bash
# The GPU check in one command, in two halves (docs/cuda.md, "The GPU check").
#
#   bash tools/gpu_check.sh bundle [--build DIR] [--bundle-dir DIR]
#       Here (no GPU needed): builds Release for sm_90 (in build/, tools/setup.sh's, or DIR) and packs gpu-bundle/nextron-gpu.tar.xz (at most 60 MiB): the
#       test and benchmark binaries with every shared library a bare GPU machine lacks (RUNPATH $ORIGIN) and the
#       flash-linear-attention wheel for the peer benchmark (the fixtures, configs and tools travel with the tree). CUDA's own libraries (cuBLAS/cuBLASLt, cuDNN, NCCL, NVRTC) and the driver are
#       taken from the GPU machine (its PyTorch wheels or /usr/local/cuda).
#   bash tools/gpu_check.sh reference [--build DIR]
#       Here: remakes the 100-step CPU reference curve of the training part in tests/fixtures/gpu_check (on its
#       committed byte-tokenized dataset; made from README.md when absent); commit the result.
#   bash tools/gpu_check.sh run --out DIR [--bundle-dir DIR] [--only PART,...]
#       There, from the repository root: runs the parts below, each under its own time budget (8 minutes in all),
#       writes DIR/summary.json, DIR/logs.tar.gz (every log) and DIR/bench.json, and prints a short verdict. A failing
#       part does not stop the later ones. Exit status 0 only when every part that ran passed.
#   bash tools/gpu_check.sh --dry-run [--build DIR] [--bundle-dir DIR] [--out DIR]
#       Here and in CI: builds the bundle, checks its size and that every binary's libraries resolve inside the
#       bundle (ldd with an empty LD_LIBRARY_PATH; only the GPU machine's CUDA libraries may come from outside),
#       then runs the run half in its no-GPU mode (the parts that need no GPU run for real, the others are skipped).
#
# Parts of the run, in order, with their budgets in seconds:
#   device 20     GPU and library versions (nextron-bench-cuda --what versions, nvidia-smi)
#   kernels 110   nextron_cuda_tests without the whole-model tests
#   golden 45     the whole-model bf16 golden tests and the short training curve (nextron_cuda_tests)
#                 (a test of these two parts that skips for want of a GPU on the GPU machine fails the part)
#   sanitizer 70  compute-sanitizer memcheck and racecheck over a small subset of our own kernels
#   train 60      nextron-train --device cuda, 100 steps of the small model, loss curve vs the CPU reference
#   fla_wheel 20  installs the carried fla-core wheel offline
#   bench 240     tools/bench_gpu_peers.py: GEMM peak, delta rule vs fla, attention vs SDPA, layers, 1B step vs HF
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"

MAX_BUNDLE_MIB=60
# Shared libraries the GPU machine provides (driver, CUDA toolkit libraries from its PyTorch wheels or
# /usr/local/cuda) and the C runtime every Linux has; everything else a binary needs travels in the bundle.
IMAGE_LIBS='^(libcuda\.so|libcublas\.so|libcublasLt\.so|libcudnn[a-z_]*\.so|libnccl\.so|libnvrtc[a-z.-]*\.so)'
SYSTEM_LIBS='^(linux-vdso\.so|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|ld-linux-x86-64\.so|libresolv\.so|libutil\.so)'
BINARIES=(nextron_cuda_tests nextron-train nextron-bench-cuda nextron_nccl_tests)
# The 100-step training run of the check: the same options on the CPU (reference, at bundle time) and the GPU.
TRAIN_ARGS=(--model-config configs/models/qwen3-next-small.json --seq-len 256 --micro-batch-size 4
  --global-batch-size 8 --lr 1e-3 --min-lr 1e-4 --lr-warmup-steps 10 --lr-decay-steps 100 --lr-decay-style cosine
  --clip-grad 1.0 --weight-decay 0.1 --valid-fraction 0 --init-seed 7 --data-seed 7 --no-progress --resume none)
FLA_WHEELS=(fla-core==0.6.0)

die() { echo "gpu_check: $*" >&2; exit 2; }
log() { echo "gpu_check: $*" >&2; }

mode="${1:-}"
[ -n "$mode" ] || die "usage: tools/gpu_check.sh bundle|run|--dry-run [options] (see the top of this file)"
shift
BUILD="" BUNDLE_DIR="$REPO/gpu-bundle" OUT="" ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build) BUILD="$2"; shift 2 ;;
    --bundle-dir) BUNDLE_DIR="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    *) die "unknown option '$1' (see the top of tools/gpu_check.sh)" ;;
  esac
done
PARTS=",device,kernels,golden,sanitizer,train,fla_wheel,bench,nccl,"
for p in ${ONLY//,/ }; do
  [[ "$PARTS" == *",$p,"* ]] || die "--only: unknown part '$p' (parts: ${PARTS:1:-1})"
done
mkdir -p "$BUNDLE_DIR"
BUNDLE_DIR="$(cd "$BUNDLE_DIR" && pwd)"
ARCHIVE="$BUNDLE_DIR/nextron-gpu.tar.xz"

venv_python() {
  local py="${NEXTRON_PYTHON:-${NEXTRON_VENV:-$HOME/.cache/nextron/venv}/bin/python}"
  [ -x "$py" ] || die "the tools venv is missing ($py): run tools/setup.sh first"
  echo "$py"
}

# ---------------------------------------------------------------------------------------------------------------
# Bundle (here)
# ---------------------------------------------------------------------------------------------------------------

configure_build() {
  # The test build of tools/setup.sh (Release, sm_90 by default) unless --build names another.
  [ -n "$BUILD" ] || BUILD="${NEXTRON_BUILD:-$REPO/build}"
  if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$REPO" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DNEXTRON_PYTHON="$(venv_python)" >/dev/null
  fi
  [ -d "$BUILD/CMakeFiles/nextron_cuda.dir" ] ||
    die "$BUILD has no CUDA backend (configured with -DNEXTRON_CUDA=OFF or without nvcc)"
  [ -f "$BUILD/CMakeCache.txt" ] || die "$BUILD is not a configured build directory"
  grep -q '^CMAKE_BUILD_TYPE:STRING=Release$' "$BUILD/CMakeCache.txt" ||
    die "$BUILD is not a Release build: the GPU check measures speed; configure with -DCMAKE_BUILD_TYPE=Release"
  grep -q 'code=\[compute_90,sm_90\]' "$BUILD/CMakeFiles/nextron_cuda.dir/flags.make" 2>/dev/null ||
    die "$BUILD does not build for sm_90 (Hopper): configure with -DCMAKE_CUDA_ARCHITECTURES=90"
  cmake --build "$BUILD" -j"$(nproc)" --target "${BINARIES[@]}" >/dev/null
}

# Copies every shared library `file` needs (ldd, transitively) that is neither the C runtime nor the GPU machine's
# CUDA libraries into lib/, under its soname, with RUNPATH $ORIGIN.
carry_libraries() {
  local file="$1" lib="$2" name path
  while read -r name _ path _; do
    [[ "$name" =~ $SYSTEM_LIBS || "$name" =~ $IMAGE_LIBS ]] && continue
    [ -e "$lib/$name" ] && continue
    [ -f "$path" ] || die "$file needs $name, which is not found on this machine"
    cp -L "$path" "$lib/$name"
    chmod u+w "$lib/$name"
    strip --strip-unneeded "$lib/$name" 2>/dev/null || true
    patchelf --set-rpath '$ORIGIN' "$lib/$name"
  done < <(env -u LD_LIBRARY_PATH ldd "$file" | awk '/=>/ {print $1, $2, $3}')
}

make_bundle() {
  configure_build
  local py stage commit
  py="$(venv_python)"
  stage="$BUNDLE_DIR/stage/nextron-gpu"
  rm -rf "$BUNDLE_DIR/stage" "$ARCHIVE"
  mkdir -p "$stage/bin" "$stage/lib" "$stage/wheels"
  for b in "${BINARIES[@]}"; do
    cp "$BUILD/$b" "$stage/bin/"
    strip --strip-unneeded "$stage/bin/$b"
    patchelf --set-rpath '$ORIGIN/../lib' "$stage/bin/$b"
    carry_libraries "$stage/bin/$b" "$stage/lib"
  done

  log "flash-linear-attention wheel (${FLA_WHEELS[*]})"
  local wheels="$HOME/.cache/nextron/wheels"  # downloaded once (pure Python wheels, any platform)
  mkdir -p "$wheels"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
    --platform any -d "$wheels" "${FLA_WHEELS[@]}" || die "downloading ${FLA_WHEELS[*]} from PyPI failed"
  local w
  for w in "${FLA_WHEELS[@]}"; do
    cp "$wheels/$(echo "${w%%==*}" | tr - _)-${w##*==}-"*.whl "$stage/wheels/" || die "no wheel of $w in $wheels"
  done

  commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git -C "$REPO" diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
  "$py" - "$stage" "$commit" "$BUILD" <<'EOF'
import json, os, platform, sys, time
stage, commit, build = sys.argv[1:]
files = {}
for root, _, names in os.walk(stage):
    for n in names:
        p = os.path.join(root, n)
        files[os.path.relpath(p, stage)] = os.path.getsize(p)
json.dump({"commit": commit, "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
           "build_dir": build, "files": files}, open(os.path.join(stage, "MANIFEST.json"), "w"), indent=1)
EOF
  (cd "$BUNDLE_DIR/stage" && tar -cf - nextron-gpu | xz -T"$(nproc)" -6 >"$ARCHIVE")
  cp "$stage/MANIFEST.json" "$BUNDLE_DIR/MANIFEST.json"
  local mib
  mib=$(($(stat -c %s "$ARCHIVE") >> 20))
  log "bundle $ARCHIVE: ${mib} MiB (unpacked $(du -sm "$stage" | cut -f1) MiB), commit $commit"
  [ "$mib" -le "$MAX_BUNDLE_MIB" ] || die "the bundle is ${mib} MiB, over the ${MAX_BUNDLE_MIB} MiB the GPU machine takes"
}

# The training run's dataset and its CPU (fp32) reference curve, committed in tests/fixtures/gpu_check (about 6
# minutes on 2 cores). Rerun when the model's math changes on purpose: the dry run (CI) replays the first steps on
# the CPU and fails when they no longer match the committed curve.
make_reference() {
  configure_build
  local py ref="$REPO/tests/fixtures/gpu_check" tmp
  py="$(venv_python)"
  tmp="$(mktemp -d)"
  mkdir -p "$ref"
  if [ ! -f "$ref/data.h5" ]; then  # kept when present: the curve is remade on the same tokens
    "$py" -c "import sys; sys.path.insert(0, '$REPO/tools'); import train_test_data as t; t.fresh_byte_dataset('$tmp/data')" ||
      die "making the dataset failed"
    cp "$tmp/data/data.h5" "$ref/data.h5"
  fi
  log "CPU reference: 100 steps of the small model (a few minutes)"
  OMP_NUM_THREADS="$(nproc)" "$BUILD/nextron-train" "${TRAIN_ARGS[@]}" --train-steps 100 --data "$ref/data.h5" \
    --device cpu --metrics "$tmp/train_cpu.jsonl" >"$tmp/train_cpu.log" 2>&1 ||
    { cat "$tmp/train_cpu.log" >&2; die "the CPU reference run failed"; }
  cp "$tmp/train_cpu.jsonl" "$ref/train_cpu.jsonl"
  rm -rf "$tmp"
  log "wrote $ref/data.h5 and $ref/train_cpu.jsonl: commit them"
}

# Every binary and carried library must resolve each of its libraries inside the bundle, except the C runtime and
# the GPU machine's CUDA libraries (which may be missing here, or found in /usr/local/cuda).
check_bundle_libraries() {
  local root="$1" bad=0 f name path
  for f in "$root"/bin/* "$root"/lib/*; do
    while read -r name _ path _; do
      [[ "$name" =~ $SYSTEM_LIBS || "$name" =~ $IMAGE_LIBS ]] && continue
      path="$(realpath -m "$path")"
      if [[ "$path" != "$root/lib/"* ]]; then
        echo "gpu_check: $(basename "$f") resolves $name to '$path', outside the bundle" >&2
        bad=1
      fi
    done < <(env -u LD_LIBRARY_PATH ldd "$f" | awk '/=>/ {print $1, $2, $3}')
  done
  [ "$bad" -eq 0 ] || die "the bundle is not self-contained (above); carry_libraries must copy those libraries"
  log "every binary's libraries resolve inside the bundle (ldd, empty LD_LIBRARY_PATH)"
}

# ---------------------------------------------------------------------------------------------------------------
# Run (there)
# ---------------------------------------------------------------------------------------------------------------

# The CUDA libraries of the machine: its PyTorch's nvidia-* wheels, then the toolkit's.
image_library_path() {
  local dirs=""
  if command -v python3 >/dev/null; then
    dirs="$(python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
seen = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)):
        if glob.glob(os.path.join(d, "*.so*")) and d not in seen:
            seen.append(d)
print(":".join(seen))
EOF
)"
  fi
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib; do [ -d "$d" ] && dirs="${dirs:+$dirs:}$d"; done
  echo "$dirs"
}

run_check() {
  local dry="$1"
  [ -n "$OUT" ] || die "run needs --out DIR (the folder for summary.json, logs.tar.gz, bench.json)"
  mkdir -p "$OUT"
  OUT="$(cd "$OUT" && pwd)"
  [ -f "$ARCHIVE" ] || die "no bundle at $ARCHIVE: build it here with 'bash tools/gpu_check.sh bundle' and carry gpu-bundle"
  local work="${TMPDIR:-/tmp}/nextron-gpu-check"
  rm -rf "$work"
  mkdir -p "$work/logs"
  local t0=$SECONDS
  if command -v xz >/dev/null; then
    tar -C "$work" -xJf "$ARCHIVE" || die "unpacking $ARCHIVE failed"
  else  # a machine without xz-utils: Python's lzma
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$ARCHIVE" "$work" ||
      die "unpacking $ARCHIVE failed"
  fi
  local B="$work/nextron-gpu" LOGS="$work/logs" REF="$REPO/tests/fixtures/gpu_check" PY
  log "unpacked the bundle in $((SECONDS - t0)) s: $(python3 -c "import json; print(json.load(open('$B/MANIFEST.json'))['commit'])" 2>/dev/null || echo '?')"
  export LD_LIBRARY_PATH
  LD_LIBRARY_PATH="$(image_library_path)"
  export NEXTRON_FIXTURES_DIR="$REPO/tests/fixtures" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  export NEXTRON_COMMIT
  NEXTRON_COMMIT="$(python3 -c "import json; print(json.load(open('$B/MANIFEST.json'))['commit'])")"
  PY=python3
  if [ "$dry" = 1 ]; then PY="$(venv_python)"; fi
  local gpus=0
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpus=$(nvidia-smi -L | grep -c '^GPU'); fi
  [ "$dry" = 1 ] && gpus=0
  local results="$work/results.jsonl"
  : >"$results"

  # part NAME BUDGET NEEDS_GPU CMD...: runs CMD under `timeout BUDGET`, output in logs/NAME.log, one result line.
  part() {
    local name="$1" budget="$2" needs_gpu="$3"
    shift 3
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
    if [ "$needs_gpu" = 1 ] && [ "$gpus" -eq 0 ]; then
      echo "{\"part\": \"$name\", \"status\": \"skipped\", \"reason\": \"no GPU\", \"budget_s\": $budget}" >>"$results"
      log "$name: skipped (no GPU)"
      return 0
    fi
    log "$name (budget ${budget} s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$budget" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - start)) status=pass
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      status=timeout
    elif [ "$rc" -ne 0 ]; then
      status=fail
    fi
    echo "{\"part\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $took, \"budget_s\": $budget}" >>"$results"
    log "$name: $status in ${took} s (rc $rc)"
  }

  part device 20 0 bash -c "'$B/bin/nextron-bench-cuda' --what versions --json > '$LOGS/versions.json' &&
    cat '$LOGS/versions.json' && (nvidia-smi || true)"
  if [ "$gpus" -gt 0 ]; then
    part kernels 110 1 "$B/bin/nextron_cuda_tests" --gtest_filter='-*CudaModelGolden*:CudaTraining*:*CudaModelVsCpu*' \
      --gtest_output="json:$LOGS/kernels.json"
  else  # no GPU: the binary still loads, finds its fixtures and skips every GPU test with the reason
    part kernels 110 0 "$B/bin/nextron_cuda_tests" --gtest_output="json:$LOGS/kernels.json"
  fi
  part golden 45 1 "$B/bin/nextron_cuda_tests" --gtest_filter='*CudaModelGolden*:CudaTraining*:*CudaModelVsCpu*' \
    --gtest_output="json:$LOGS/golden.json"
  part sanitizer 70 1 bash -c "command -v compute-sanitizer >/dev/null || { echo 'compute-sanitizer not found'; exit 3; }
    compute-sanitizer --tool memcheck --error-exitcode 9 '$B/bin/nextron_cuda_tests' \
      --gtest_filter='RmsnormCuda.*:L2normCuda.*:MoeDispatchCuda.*:EmbeddingCuda.*:CrossEntropyCuda.*:GatedDeltaRuleCuda.HeadGroups:AdamWCuda.*:GroupedGemmCutlass.ForwardBackwardMatchPerExpertCpu:CudaOpsReads.*' &&
    compute-sanitizer --tool racecheck --error-exitcode 9 '$B/bin/nextron_cuda_tests' \
      --gtest_filter='NormsCuda.DwIsBitIdenticalAndAccumulatesExactly:GatedDeltaRuleCuda.HeadGroups:SumCuda.*'"
  if [ "$gpus" -gt 0 ]; then
    part train 60 1 bash -c "'$B/bin/nextron-train' ${TRAIN_ARGS[*]} --train-steps 100 --data '$REF/data.h5' --device cuda \
        --peak-tflops 989 --metrics '$LOGS/train_cuda.jsonl' &&
      '$PY' '$REPO/tools/gpu_check_report.py' compare-loss --reference '$REF/train_cpu.jsonl' \
        --run '$LOGS/train_cuda.jsonl' --rtol 0.03"
  else  # no GPU: the bundled nextron-train runs 3 CPU steps, no MPI launcher, and must reproduce the reference
    part train 60 0 bash -c "OMP_NUM_THREADS=2 '$B/bin/nextron-train' ${TRAIN_ARGS[*]} --train-steps 3 --data '$REF/data.h5' \
        --device cpu --metrics '$LOGS/train_cpu3.jsonl' &&
      '$PY' '$REPO/tools/gpu_check_report.py' compare-loss --reference '$REF/train_cpu.jsonl' \
        --run '$LOGS/train_cpu3.jsonl' --rtol 1e-4"
  fi
  part fla_wheel 20 0 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$work/fla-site" "$B"/wheels/*.whl
  part bench 240 1 "$PY" "$REPO/tools/bench_gpu_peers.py" --bench "$B/bin/nextron-bench-cuda" \
    --config "$REPO/configs/models/qwen3-next-1b-real-heads.json" --batch 2 --seq-len 4096 --iters 10 --warmup 3 \
    --step-iters 5 --step-warmup 2 --fla-site "$work/fla-site" --out "$LOGS/bench.json"
  if [ "$gpus" -gt 1 ] && command -v mpirun >/dev/null; then
    part nccl 90 1 mpirun --allow-run-as-root --oversubscribe -np 2 "$B/bin/nextron_nccl_tests"
  fi

  local verdict=0
  "$PY" "$REPO/tools/gpu_check_report.py" summary --results "$results" --logs "$LOGS" --manifest "$B/MANIFEST.json" \
    --out "$OUT/summary.json" --dry-run "$dry" || verdict=$?
  [ -f "$LOGS/bench.json" ] && cp "$LOGS/bench.json" "$OUT/bench.json"
  tar -C "$work" -czf "$OUT/logs.tar.gz" logs
  log "total $((SECONDS - t0)) s; logs in $OUT/logs.tar.gz"
  return $verdict
}

case "$mode" in
  bundle) make_bundle ;;
  reference) make_reference ;;
  run) run_check 0 ;;
  --dry-run)
    make_bundle
    check_bundle_libraries "$BUNDLE_DIR/stage/nextron-gpu"
    [ -n "$OUT" ] || OUT="$BUNDLE_DIR/dry-run-out"
    run_check 1
    ;;
  *) die "unknown mode '$mode': bundle, run or --dry-run" ;;
esac
