#!/usr/bin/env bash
# Starts nextron-train as an MPI job with Open MPI's mpirun, on this machine or on the nodes of a hostfile, with a
# log folder per job. Everything that can be checked before a rank starts is checked here first (hostfile slots,
# config file, flags), so that a mistake costs a message, not a half-started job. See --help.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

usage() {
  cat <<'EOF'
usage: launch/mpirun.sh --config FILE [options] [-- nextron-train arguments...]

Runs nextron-train under mpirun (through launch/nextron-mpirun, so that Ctrl-C or SIGTERM to this script makes
every rank finish its step, save and exit with status 3; a second one aborts), one process per rank, the same
number of ranks on every node.

  --config FILE          nextron-train --config-file ("name = value" lines; required). Arguments after `--`
                         are added to the command line and win over the file.
  --hostfile FILE        Open MPI hostfile, one node per line: `HOST [slots=N]` (1 slot when slots= is absent,
                         a host on several lines adds up). Absent: this machine only.
  --nodes N              nodes to use: the first N hosts of the hostfile (default: all of them; 1 without one)
  --ranks-per-node N     ranks on every node (default 1); with --device cuda, one per GPU of the node
  --device cpu|cuda      passed to nextron-train as --device (default: what the config file says)
  --job-name NAME        names the log folder (default: the config file's name without its extension)
  --log-dir DIR          where the job's log folder DIR/NAME-YYYYmmdd-HHMMSS/ is made (default: logs)
  --train PATH           the nextron-train binary (default: $NEXTRON_TRAIN, else build/nextron-train of this
                         checkout); it must be at the same path on every node (a shared file system)
  --mpirun-arg ARG       one more argument for mpirun (repeatable), e.g. --mpirun-arg --mca --mpirun-arg
                         btl_tcp_if_include --mpirun-arg eth0
  --dry-run              print the exact command and exit, creating nothing
  -h, --help             this help

The job's log folder holds command.txt (the exact command), env.txt (hosts, versions, the environment passed to
the ranks), a copy of the config file, and ranks/1/rank.R/{stdout,stderr}: every rank's output (mpirun
--output-filename; rank 0's stdout is the training log). The output also goes to this terminal.

GPUs: each rank uses the GPU of its node-local rank (nextron-train reads OMPI_COMM_WORLD_LOCAL_RANK), so
nothing here restricts CUDA_VISIBLE_DEVICES: leave it unset or list at least --ranks-per-node GPUs.
Environment: NCCL_DEBUG defaults to WARN; NCCL_*, UCX_*, OMP_*, CUDA_*, HF_* and NEXTRON_* variables set here are
passed to the ranks of every node (-x), and OMP_NUM_THREADS defaults to this machine's cores / ranks per node.
OMPI_MCA_* variables reach every node by themselves (e.g. OMPI_MCA_btl_tcp_if_include=eth0). MPIRUN selects
another mpirun.

Example (2 nodes x 4 GPUs):
  launch/mpirun.sh --hostfile hosts --nodes 2 --ranks-per-node 4 --device cuda --config run.conf -- --train-steps 100
EOF
}

die() {
  echo "launch/mpirun.sh: $*" >&2
  exit 2
}

# Checks that $2 is a positive integer for option $1.
positive_int() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 '$2': give a positive integer"
}

hostfile="" nodes="" ranks_per_node=1 config="" log_dir="logs" job_name="" device="" dry_run=0
train="${NEXTRON_TRAIN:-$REPO/build/nextron-train}"
mpirun_args=() train_args=()
while [ $# -gt 0 ]; do
  opt="$1"
  case "$opt" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --) shift; train_args=("$@"); break ;;
    --hostfile | --nodes | --ranks-per-node | --config | --log-dir | --job-name | --device | --train | --mpirun-arg) ;;
    --*=*) die "write '${opt%%=*} ${opt#*=}' (a space, not '='); see --help" ;;
    *) die "unknown argument '$opt' (nextron-train's own arguments go after '--'); see --help for the options" ;;
  esac
  [ $# -ge 2 ] || die "$opt needs a value; see --help"
  val="$2"
  shift 2
  case "$opt" in
    --hostfile) hostfile="$val" ;;
    --nodes) positive_int "$opt" "$val"; nodes="$val" ;;
    --ranks-per-node) positive_int "$opt" "$val"; ranks_per_node="$val" ;;
    --config) config="$val" ;;
    --log-dir) log_dir="$val" ;;
    --job-name) job_name="$val" ;;
    --device) [[ "$val" == cpu || "$val" == cuda ]] || die "--device '$val': use cpu or cuda"; device="$val" ;;
    --train) train="$val" ;;
    --mpirun-arg) mpirun_args+=("$val") ;;
  esac
done

[ -n "$config" ] || die "--config FILE is required (nextron-train options as 'name = value' lines)"
[[ -f "$config" && -r "$config" ]] || die "--config '$config': no such readable file; give the path of a nextron-train config file"
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"  # the ranks may start in another directory
[ -x "$train" ] || die "nextron-train not found at '$train': build it (cmake --build build) or give --train PATH / NEXTRON_TRAIN"
MPIRUN="${MPIRUN:-mpirun}"
command -v "$MPIRUN" >/dev/null || die "'$MPIRUN' not found: install Open MPI (openmpi-bin) or set MPIRUN"
[ -n "$job_name" ] || job_name="$(basename "${config%.*}")"
[[ "$job_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job-name '$job_name': use letters, digits, '.', '_' and '-' only (it names a folder)"

# The hosts and their slots, in hostfile order. A host listed twice adds up, as in Open MPI. Only the first
# --nodes hosts are given to mpirun, each with --ranks-per-node slots (--host HOST:SLOTS), so that the job
# gets exactly nodes x ranks-per-node ranks whatever else the hostfile holds.
hosts=()
declare -A slots=()
if [ -n "$hostfile" ]; then
  [[ -f "$hostfile" && -r "$hostfile" ]] || die "--hostfile '$hostfile': no such readable file"
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line="${line%%#*}"
    read -r -a words <<<"$line" || true
    [ ${#words[@]} -gt 0 ] || continue
    host="${words[0]}" n=1
    for w in "${words[@]:1}"; do
      case "$w" in
        slots=*) n="${w#slots=}"; [[ "$n" =~ ^[0-9]+$ ]] || die "--hostfile '$hostfile' line $lineno: bad '$w' (slots=N)" ;;
      esac
    done
    if [ -z "${slots[$host]+set}" ]; then
      hosts+=("$host")
      slots[$host]=0
    fi
    slots[$host]=$((${slots[$host]} + n))
  done <"$hostfile"
  [ ${#hosts[@]} -gt 0 ] || die "--hostfile '$hostfile' lists no host (one 'HOST slots=N' line per node)"
  nodes="${nodes:-${#hosts[@]}}"
  total=0
  for h in "${hosts[@]}"; do total=$((total + ${slots[$h]})); done
  need=$((nodes * ranks_per_node))
  [ "${#hosts[@]}" -ge "$nodes" ] ||
    die "--hostfile '$hostfile' lists ${#hosts[@]} host(s), fewer than --nodes $nodes: add hosts or lower --nodes"
  [ "$total" -ge "$need" ] ||
    die "--hostfile '$hostfile' has $total slot(s) in all, fewer than --nodes $nodes x --ranks-per-node $ranks_per_node = $need: give each host 'slots=$ranks_per_node' or lower --nodes / --ranks-per-node"
  for h in "${hosts[@]:0:$nodes}"; do
    [ "${slots[$h]}" -ge "$ranks_per_node" ] ||
      die "--hostfile '$hostfile': host '$h' has ${slots[$h]} slot(s), fewer than --ranks-per-node $ranks_per_node: write '$h slots=$ranks_per_node' or lower --ranks-per-node"
  done
  hosts=("${hosts[@]:0:$nodes}")
else
  nodes="${nodes:-1}"
  [ "$nodes" -eq 1 ] || die "--nodes $nodes needs a --hostfile naming the nodes (without one the job runs on this machine)"
  hosts=(localhost)
fi
np=$((nodes * ranks_per_node))
host_list=""
for h in "${hosts[@]}"; do host_list+="${host_list:+,}$h:$ranks_per_node"; done

if [ "$device" = cuda ] && [ -n "${CUDA_VISIBLE_DEVICES-}" ]; then
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  [ "${#visible[@]}" -ge "$ranks_per_node" ] ||
    die "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' shows ${#visible[@]} GPU(s), fewer than --ranks-per-node $ranks_per_node (each rank takes the GPU of its node-local rank): unset it or lower --ranks-per-node"
fi

# Environment for the ranks. NCCL's default INFO/unset level is either silent on errors or very chatty; WARN
# prints what goes wrong. OMP_NUM_THREADS: without it every rank would start one thread per core of the node.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
cores="$(nproc 2>/dev/null || echo 1)"
threads=$((cores / ranks_per_node))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"
forward=()
while IFS= read -r name; do
  case "$name" in
    NCCL_* | UCX_* | OMP_* | CUDA_* | HF_* | NEXTRON_*) forward+=(-x "$name") ;;
  esac
done < <(compgen -e | sort)

log_dir="$(realpath -m "$log_dir")"  # --output-filename is opened on every node: an absolute path
stamp="$(date +%Y%m%d-%H%M%S)"
job_dir="$log_dir/$job_name-$stamp"
# Two jobs of the same name started in the same second get their own folders.
suffix=1
while [ -e "$job_dir" ]; do suffix=$((suffix + 1)); job_dir="$log_dir/$job_name-$stamp-$suffix"; done

train_cmd=("$train" --config-file "$config")
[ -z "$device" ] || train_cmd+=(--device "$device")
train_cmd+=("${train_args[@]}")
# --map-by ppr:N:node puts exactly N ranks on each node (the node-local rank picks the GPU); --bind-to none
# leaves the OpenMP threads of a rank free to use the cores it is given (binding would pin them all to one core).
# As root (containers) Open MPI refuses to start without --allow-run-as-root.
cmd=("$HERE/nextron-mpirun" -np "$np" --host "$host_list" --map-by "ppr:$ranks_per_node:node" --bind-to none
  --output-filename "$job_dir/ranks" "${forward[@]}")
[ "$(id -u)" -ne 0 ] || cmd+=(--allow-run-as-root)
cmd+=("${mpirun_args[@]}" "${train_cmd[@]}")

# The command as one shell line: plain words as they are, others quoted (printf %q would also escape commas).
quoted() {
  local a out=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
  done
  echo "${out% }"
}

if [ "$dry_run" -eq 1 ]; then
  quoted "${cmd[@]}"
  exit 0
fi

mkdir -p "$log_dir"
mkdir "$job_dir" || die "cannot create the log folder '$job_dir': check --log-dir"
quoted "${cmd[@]}" >"$job_dir/command.txt"
cp "$config" "$job_dir/$(basename "$config")"
{
  echo "job:              $job_name"
  echo "started:          $(date -Is)"
  echo "launch host:      $(hostname)"
  echo "user:             $(id -un)"
  echo "cwd:              $(pwd)"
  echo "nodes:            $nodes (${hosts[*]})"
  echo "ranks per node:   $ranks_per_node ($np ranks)"
  echo "config:           $config"
  echo "nextron-train:    $train"
  echo "git commit:       $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "mpirun:           $(command -v "$MPIRUN") ($("$MPIRUN" --version 2>/dev/null | head -n 1))"
  echo "environment passed to the ranks:"
  for ((i = 1; i < ${#forward[@]}; i += 2)); do echo "  ${forward[$i]}=${!forward[$i]}"; done
  env | grep '^OMPI_MCA_' | sed 's/^/  /' || true
} >"$job_dir/env.txt"
echo "launch/mpirun.sh: $np ranks on $nodes node(s); logs in $job_dir/" >&2
# exec: nextron-mpirun takes this process's place, so Ctrl-C and SIGTERM sent to it reach the ranks as SIGUSR1.
export MPIRUN
exec "${cmd[@]}"
