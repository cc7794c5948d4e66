#!/usr/bin/env bash
# Runs CUDA kernel tests (tests/cuda/test_<name>.cpp) on the CPU through the block emulator, under AddressSanitizer.
#   bash tools/cuda_emu/run.sh [name ...]       (default: every emulable test; see README.md)
#   EMU_SCHED=0|1|2  thread order in each scheduling round: forward / reverse (blocks too) / random
#   KOPT="-O2 -mfma -ffp-contract=fast"  compile the kernels with FMA contraction, as nvcc does by default
# Builds into build-emu/, or $EMU_BUILD (two runs at once need two directories; objects of unchanged sources are
# reused).
set -euo pipefail
cd "$(dirname "$0")/../.."
E=tools/cuda_emu
B=${EMU_BUILD:-build-emu}
SRC=src
OPT="-O1 -g -fsanitize=address -fno-omit-frame-pointer"
KOPT="${KOPT:-}"
INC="-I$B/gen -I$E -I$E/shim -I$SRC -I/usr/local/cuda/include -I/usr/include/x86_64-linux-gnu/openblas-openmp"
mkdir -p "$B/gen/kernels/cuda" "$B/obj" "$B/cpuobj"

# The kernels each test exercises.
declare -A KERNELS=(
  [norms]="rmsnorm rmsnorm_gated l2norm"
  [elementwise]="rope conv1d gdn_gates sigmoid_gate swiglu embedding cast glue"
  [loss_optim]="cross_entropy reduce adamw"
  [moe]="router moe_dispatch load_balancing"
  [grouped_gemm_args]="grouped_gemm_args"
  [gated_delta_rule]="gated_delta_rule gated_delta_rule_fwd gated_delta_rule_bwd delta_state gated_delta_rule_step"
)
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(norms elementwise loss_optim moe grouped_gemm_args gated_delta_rule)

# Headers with device code are rewritten too (extern __shared__ -> emulator shared memory) and found first.
for h in $SRC/kernels/cuda/*.cuh; do python3 $E/cu2cpp.py "$h" > "$B/gen/kernels/cuda/$(basename "$h")"; done

[ "$B/obj/emu.o" -nt $E/emu.cpp ] || g++ -std=c++17 $OPT -I$E -I/usr/local/cuda/include -c $E/emu.cpp -o "$B/obj/emu.o"
cpu=()
for s in $SRC/kernels/cpu/*.cpp $SRC/kernels/*.cpp $SRC/core/*.cpp $SRC/optim/*.cpp; do
  o="$B/cpuobj/$(echo "${s#$SRC/}" | tr / _).o"
  [ -f "$o" ] && [ "$o" -nt "$s" ] || g++ -std=c++20 -O2 -g -fopenmp $INC -c "$s" -o "$o"
  cpu+=("$o")
done
rm -f "$B/cpuobj/libcpu.a"
ar rcs "$B/cpuobj/libcpu.a" "${cpu[@]}"

status=0
for t in "${TESTS[@]}"; do
  [ -n "${KERNELS[$t]:-}" ] || { echo "cuda_emu: no kernel list for test '$t' (see KERNELS in $0)"; exit 2; }
  objs=()
  for k in ${KERNELS[$t]}; do
    python3 $E/cu2cpp.py "$SRC/kernels/cuda/$k.cu" > "$B/gen/$k.cpp"
    g++ -std=c++17 $OPT $KOPT -w -include $E/emu.h $INC -c "$B/gen/$k.cpp" -o "$B/obj/$k.o"
    objs+=("$B/obj/$k.o")
  done
  g++ -std=c++20 $OPT -Itests/cuda $INC -c "tests/cuda/test_$t.cpp" -o "$B/obj/test_$t.o"
  g++ $OPT -fopenmp "$B/obj/test_$t.o" "${objs[@]}" "$B/obj/emu.o" "$B/cpuobj/libcpu.a" -o "$B/test_$t" \
    -lgtest -lgtest_main -lopenblas -lpthread
  echo "== $t"
  "$B/test_$t" || status=1
done
exit $status
