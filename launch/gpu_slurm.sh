#!/usr/bin/env bash
#SBATCH --job-name=dcae
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --output=slurm-%j.out
# Runs the dcae_jax trainer on GPUs under Slurm: one JAX process per GPU (default) or per node.
#
#   sbatch [sbatch options] launch/gpu_slurm.sh [options] CONFIG WORKDIR [--config.key=value ...] [-- flags]
#   launch/gpu_slurm.sh [options] CONFIG WORKDIR ...   # inside salloc: srun now; outside: submits itself
#
# Inside an allocation it exports, for all tasks,
#   JAX_COORDINATOR_ADDRESS=FIRST_NODE:PORT  first host of `scontrol show hostnames $SLURM_JOB_NODELIST`
# and `srun`s `python -m dcae_jax.main --config=CONFIG --workdir=WORKDIR [extra flags]`, each task
# setting from its own Slurm variables (the trainer calls `jax.distributed.initialize()` from these):
#   JAX_NUM_PROCESSES=$SLURM_NTASKS   JAX_PROCESS_ID=$SLURM_PROCID
#   JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID (per gpu) or 0,1,..,G-1 (per node): the GPUs the process drives.
#     Set explicitly because JAX's Slurm auto-detection would otherwise pick GPU $SLURM_LOCALID only.
# Tasks see all GPUs of their node (no --gpu-bind); the repository is put on PYTHONPATH.
# Outside an allocation (no SLURM_JOB_ID) it submits itself with `sbatch --nodes --gpus-per-node
# --ntasks-per-node`; set SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ... for the rest.
# Edit the #SBATCH lines above, or pass sbatch options, for plain `sbatch launch/gpu_slurm.sh` use.
#
# Options:
#   --per gpu|node          one process per GPU (default) or per node
#   --gpus-per-node G       GPUs per node (default: $SLURM_GPUS_ON_NODE, $SLURM_GPUS_PER_NODE, or 8 to submit)
#   --nodes N               nodes to request when submitting (default 1; inside an allocation: all of it)
#   --port PORT             coordinator port (default 61440 + SLURM_JOB_ID % 4096, as JAX's Slurm detection)
#   --repo DIR              repository root (default: this script's parent, else $SLURM_SUBMIT_DIR)
#   --dry-run               print the commands (one per line, prefixed by "+ ") instead of running them;
#                           DRY_RUN=1 does the same (scontrol is still queried for the hostnames)
#   -h, --help              show this help
# Environment: PYTHON (interpreter on the nodes, default "python"), DRY_RUN.
#
# Examples (WORKDIR and latents on a filesystem every node sees; each node makes the default LPIPS weights):
#   launch/gpu_slurm.sh --nodes 4 configs/dcae.py:variant=f64c128,phase=1 /shared/runs/f64c128_p1
#   launch/gpu_slurm.sh --nodes 8 configs/uvit.py:model=uvit-h,latents=/shared/latents/f64c128 /shared/runs/uvit_h
set -euo pipefail

usage() { sed -n '/^# Runs/,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() {
  printf 'gpu_slurm.sh: error: %s\n' "$1" >&2
  printf "Run 'launch/gpu_slurm.sh --help' for usage.\n" >&2
  exit 2
}
# Shell-quotes a word only when needed, so dry-run lines are readable and can be pasted into a shell.
quote() {
  local safe='^[A-Za-z0-9_./:=,@%+-]+$' sq="'"
  if [[ $1 =~ $safe ]]; then printf '%s' "$1"; else printf "'%s'" "${1//$sq/$sq\\$sq$sq}"; fi
}
format_cmd() {
  local out="+" word
  for word in "$@"; do out+=" $(quote "$word")"; done
  printf '%s' "$out"
}
run() {
  if ((dry_run)); then printf '%s\n' "$(format_cmd "$@")"; else "$@"; fi
}
# positive_int FLAG VALUE [MAX]: dies unless VALUE is an integer in 1..MAX.
positive_int() {
  if ! [[ $2 =~ ^[1-9][0-9]{0,8}$ ]] || (($2 > ${3:-999999999})); then
    die "$1 must be a positive integer${3:+ <= $3}, got '$2'"
  fi
}

dry_run=${DRY_RUN:-0}
per=gpu
gpus_per_node=""
nodes=""
port=""
repo=""
positional=()
extra=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --per | --gpus-per-node | --nodes | --port | --repo)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --per) per=$2 ;;
        --gpus-per-node) gpus_per_node=$2 ;;
        --nodes) nodes=$2 ;;
        --port) port=$2 ;;
        --repo) repo=$2 ;;
      esac
      shift ;;
    --per=*) per=${1#*=} ;;
    --gpus-per-node=*) gpus_per_node=${1#*=} ;;
    --nodes=*) nodes=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --) shift; extra+=("$@"); break ;;
    --config.*) extra+=("$1") ;;
    -*) die "unknown option '$1' (pass other dcae_jax.main flags after '--')" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

[[ $dry_run == 0 || $dry_run == 1 ]] || die "DRY_RUN must be 0 or 1, got '$dry_run'"
((${#positional[@]} == 2)) || die "expected CONFIG and WORKDIR, got ${#positional[@]} positional argument(s): ${positional[*]-}"
config=${positional[0]}
workdir=${positional[1]}
[[ -n $workdir ]] || die "WORKDIR is empty"
[[ $per == gpu || $per == node ]] || die "--per must be 'gpu' or 'node', got '$per'"
[[ -z $port ]] || positive_int --port "$port" 65535
[[ -z $nodes ]] || positive_int --nodes "$nodes"
if [[ -z $gpus_per_node ]]; then
  gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  gpus_per_node=${gpus_per_node##*:} # "h100:8" -> "8"
fi

# Repository root: the script's parent, unless sbatch runs a spooled copy of it.
if [[ -z $repo ]]; then
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  [[ -d $repo/dcae_jax || -z ${SLURM_SUBMIT_DIR:-} ]] || repo=$SLURM_SUBMIT_DIR
fi
[[ -d $repo/dcae_jax ]] || die "no dcae_jax package under '$repo'; pass --repo DIR (the repository root)"
repo=$(cd "$repo" && pwd)
[[ -f ${config%%:*} ]] || die "config file '${config%%:*}' not found (relative to $(pwd))"

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  # Not in an allocation: submit this script; the batch job re-enters below.
  command -v sbatch >/dev/null || ((dry_run)) || die "sbatch not found: run on a Slurm login node"
  gpus_per_node=${gpus_per_node:-8}
  positive_int --gpus-per-node "$gpus_per_node"
  tasks_per_node=1
  [[ $per == node ]] || tasks_per_node=$gpus_per_node
  script=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
  forward=(--per "$per" --gpus-per-node "$gpus_per_node" --repo "$repo")
  [[ -z $port ]] || forward+=(--port "$port")
  run sbatch "--nodes=${nodes:-1}" "--gpus-per-node=$gpus_per_node" "--ntasks-per-node=$tasks_per_node" \
    "$script" "${forward[@]}" "$config" "$workdir" -- ${extra[@]+"${extra[@]}"}
  exit 0
fi

[[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not"
[[ -n $gpus_per_node ]] || die "cannot tell GPUs per node (no SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE); pass --gpus-per-node"
positive_int --gpus-per-node "$gpus_per_node"
alloc_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
positive_int SLURM_JOB_NUM_NODES "$alloc_nodes"
if [[ -n $nodes ]] && ((nodes != alloc_nodes)); then
  printf 'gpu_slurm.sh: warning: --nodes %s ignored; using all %s nodes of job %s\n' "$nodes" "$alloc_nodes" \
    "$SLURM_JOB_ID" >&2
fi
command -v scontrol >/dev/null || die "scontrol not found: run inside a Slurm allocation"
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
first_host=${hosts%%$'\n'*}
[[ -n $first_host ]] || die "scontrol returned no hostnames for '$SLURM_JOB_NODELIST'"
if [[ -z $port ]]; then
  [[ $SLURM_JOB_ID =~ ^[0-9]+$ ]] || die "cannot derive a port from SLURM_JOB_ID '$SLURM_JOB_ID'; pass --port"
  port=$((61440 + 10#$SLURM_JOB_ID % 4096))
fi

# Per-task variables must be expanded by each task, hence the single quotes.
# shellcheck disable=SC2016
task_env='JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"'
if [[ $per == gpu ]]; then
  tasks_per_node=$gpus_per_node
  # shellcheck disable=SC2016
  task_env+=' JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"'
else
  tasks_per_node=1
  task_env+=" JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus_per_node - 1)))"
fi
main_cmd=("${PYTHON:-python}" -m dcae_jax.main "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})

if ((dry_run)); then
  printf '+ export JAX_COORDINATOR_ADDRESS=%s\n' "$(quote "$first_host:$port")"
  printf '+ export PYTHONPATH=%s\n' "$(quote "$repo${PYTHONPATH:+:$PYTHONPATH}")"
else
  export JAX_COORDINATOR_ADDRESS=$first_host:$port
  export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
fi
run srun "--nodes=$alloc_nodes" "--ntasks=$((alloc_nodes * tasks_per_node))" "--ntasks-per-node=$tasks_per_node" \
  --kill-on-bad-exit=1 bash -c "export $task_env; exec \"\$@\"" bash "${main_cmd[@]}"
