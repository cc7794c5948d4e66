#!/usr/bin/env bash
# Sets up and builds (tools/setup.sh), then runs the whole test suite with CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
BUILD="${NEXTRON_BUILD:-build}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
ctest --test-dir "$BUILD" --output-on-failure -j1 "$@"
