#!/usr/bin/env bash
# Installs everything nextron needs on a Debian machine and builds it. Idempotent: when all is in place it only
# runs an incremental build.
#   NEXTRON_VENV   Python venv for tools/ (default ~/.cache/nextron/venv, shared by every checkout)
#   NEXTRON_BUILD  build directory (default ./build)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(build-essential cmake git pkg-config python3-venv libopenmpi-dev openmpi-bin libhdf5-dev
  libboost-program-options-dev nlohmann-json3-dev libopenblas-openmp-dev libgtest-dev zlib1g-dev patchelf xz-utils
  slurm-wlm munge)  # slurm-wlm + munge: slurmctld, slurmd, sbatch, munged for the launch_slurm test
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

VENV="${NEXTRON_VENV:-$HOME/.cache/nextron/venv}"
stamp="$VENV/.nextron-requirements"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s tools/requirements.txt "$stamp"; then
  echo "setup: creating the Python venv $VENV (torch, transformers, ...)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r tools/requirements.txt
  cp tools/requirements.txt "$stamp"
fi

BUILD="${NEXTRON_BUILD:-build}"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DNEXTRON_PYTHON="$VENV/bin/python"
fi
cmake --build "$BUILD" -j"$(nproc)"
echo "setup: done (build in $BUILD, venv in $VENV)"
