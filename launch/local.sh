#!/usr/bin/env bash
# Runs the dcae_jax trainer on this machine: one process, or N local processes (multi-process testing).
#
#   launch/local.sh [options] CONFIG WORKDIR [--config.key=value ...] [-- other dcae_jax.main flags]
#
# runs `python -m dcae_jax.main --config=CONFIG --workdir=WORKDIR [extra flags]` with the repository on
# PYTHONPATH. With --num-processes N > 1 it starts N background processes and waits for all of them;
# if one fails, it stops the others (they would block in a collective otherwise) and exits with its
# status. Process i gets these environment variables, from which the trainer calls
# `jax.distributed.initialize()`:
#
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT   process 0 serves the coordinator here (read by JAX itself)
#   JAX_NUM_PROCESSES=N                      total process count (the trainer initializes when > 1)
#   JAX_PROCESS_ID=i                         0 .. N-1
#
# Options:
#   -n, --num-processes N   local processes (default 1: no distributed variables are set)
#   --port PORT             coordinator port for N > 1 (default 12355)
#   --cpu-devices K         run on CPU with K virtual devices per process
#                           (JAX_PLATFORMS=cpu, XLA_FLAGS+=--xla_force_host_platform_device_count=K)
#   --dry-run               print the commands (one per line, prefixed by "+ ") instead of running them;
#                           DRY_RUN=1 does the same
#   -h, --help              show this help
# Environment: PYTHON (interpreter, default "python"), DRY_RUN.
#
# Examples:
#   launch/local.sh configs/quickstart.py /tmp/run
#   launch/local.sh -n 2 --cpu-devices 4 configs/tiny_test.py /tmp/run2   # 2 processes x 4 CPU devices
#   launch/local.sh configs/dcae.py:variant=f32c32,phase=1 /runs/f32_p1
#   launch/local.sh configs/uvit.py:model=uvit-h,latents=/data/latents/f64c128 /runs/uvit_h   # this host's GPUs/TPUs
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() {
  printf 'local.sh: error: %s\n' "$1" >&2
  printf "Run 'launch/local.sh --help' for usage.\n" >&2
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
# positive_int FLAG VALUE [MAX]: dies unless VALUE is an integer in 1..MAX.
positive_int() {
  if ! [[ $2 =~ ^[1-9][0-9]{0,8}$ ]] || (($2 > ${3:-999999999})); then
    die "$1 must be a positive integer${3:+ <= $3}, got '$2'"
  fi
}

dry_run=${DRY_RUN:-0}
num_processes=1
port=12355
cpu_devices=""
positional=()
extra=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    -n | --num-processes | --port | --cpu-devices)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        -n | --num-processes) num_processes=$2 ;;
        --port) port=$2 ;;
        --cpu-devices) cpu_devices=$2 ;;
      esac
      shift ;;
    --num-processes=*) num_processes=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --cpu-devices=*) cpu_devices=${1#*=} ;;
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
[[ -f ${config%%:*} ]] || die "config file '${config%%:*}' not found (relative to $(pwd))"
[[ -n $workdir ]] || die "WORKDIR is empty"
positive_int --num-processes "$num_processes"
positive_int --port "$port" 65535
[[ -z $cpu_devices ]] || positive_int --cpu-devices "$cpu_devices"

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_vars=("PYTHONPATH=$repo_root${PYTHONPATH:+:$PYTHONPATH}")
if [[ -n $cpu_devices ]]; then
  env_vars+=(JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices")
fi
main_cmd=("${PYTHON:-python}" -m dcae_jax.main "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})

if ((num_processes == 1)); then
  if ((dry_run)); then
    printf '%s\n' "$(format_cmd env "${env_vars[@]}" "${main_cmd[@]}")"
    exit 0
  fi
  exec env "${env_vars[@]}" "${main_cmd[@]}"
fi

pids=()
stop_all() {
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
  return 0
}
# A signal to the launcher (a scheduler's preemption notice, Ctrl-C) goes to every process as SIGTERM: each one
# checkpoints its step in flight and exits (143); the launcher exits when they all have, 143 (130 for SIGINT).
on_signal() {
  trap - INT TERM
  stop_all
  wait || true
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
for ((i = 0; i < num_processes; i++)); do
  cmd=(env "${env_vars[@]}" "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_processes"
    "JAX_PROCESS_ID=$i" "${main_cmd[@]}")
  if ((dry_run)); then
    printf '%s &\n' "$(format_cmd "${cmd[@]}")"
  else
    "${cmd[@]}" &
    pids+=("$!")
  fi
done
if ((dry_run)); then
  printf '+ wait\n'
  exit 0
fi
for ((i = 0; i < num_processes; i++)); do
  if wait -n; then
    continue
  else
    status=$?
    printf 'local.sh: a process exited with status %d; stopping the others\n' "$status" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
