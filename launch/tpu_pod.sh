#!/usr/bin/env bash
# Runs the dcae_jax trainer on every worker of a Cloud TPU VM (pod slice) over `gcloud ... ssh --worker=all`.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [options] CONFIG WORKDIR [--config.key=value ...] [-- flags]
#
# runs on all workers at once:
#   cd REMOTE_DIR && env JAX_NUM_PROCESSES=auto python3 -m dcae_jax.main --config=CONFIG --workdir=WORKDIR [extra flags]
# JAX_NUM_PROCESSES=auto makes the trainer call jax.distributed.initialize(), which finds the slice's
# hosts and coordinator from the TPU VM's metadata (no addresses to pass); orbax's multi-host checkpoint
# barriers need the distributed system it starts.
# CONFIG is a path inside REMOTE_DIR. WORKDIR is a Cloud Storage URL (gs://bucket/run: checkpoints, exports,
# logs written there directly) or an absolute path on a file system mounted at the same path on every worker
# (checkpoints are written collectively): Filestore/NFS, or a bucket through Cloud Storage FUSE.
# The repository must already be at REMOTE_DIR on every worker (e.g. git clone it with a
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command 'git clone URL dcae_jax'`).
#
# Options:
#   --tpu NAME              TPU VM name (required)
#   --zone ZONE             its zone (required)
#   --project PROJECT       GCP project (default: gcloud's configured project)
#   --remote-dir DIR        repository checkout on the workers, relative to the home directory or
#                           absolute (default: dcae_jax)
#   --setup                 first install "jax[tpu]==<version pinned in requirements.txt>" and
#                           requirements.txt on all workers, then train
#   --setup-only            only the install step
#   --dry-run               print the commands (one per line, prefixed by "+ ") instead of running them;
#                           DRY_RUN=1 does the same
#   -h, --help              show this help
# Environment: PYTHON (interpreter on the workers, default "python3"), DRY_RUN.
#
# Examples (check the fit first, on any machine with jax[tpu]: `python -m dcae_jax.aot --config=CONFIG
# --topology=v5p-64`, which exits 1 when the step does not fit; docs/scaling.md has the measured configs):
#   launch/tpu_pod.sh --tpu dcae-v5p-64 --zone "$ZONE" --setup \
#     configs/dcae.py:variant=f64c128,phase=1 /mnt/shared/runs/f64c128_p1
#   launch/tpu_pod.sh --tpu dcae-v5p-64 --zone "$ZONE" \
#     configs/uvit.py:model=uvit-h,latents=/mnt/shared/latents/f64c128 /mnt/shared/runs/uvit_h
# (/mnt/shared: a file system mounted at the same path on every worker.)
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() {
  printf 'tpu_pod.sh: error: %s\n' "$1" >&2
  printf "Run 'launch/tpu_pod.sh --help' for usage.\n" >&2
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
# A command line for the workers' shell, every word quoted as needed ("&&" passed as is).
remote_cmd() {
  local out="" word
  for word in "$@"; do
    if [[ $word == "&&" ]]; then out+=" &&"; else out+=" $(quote "$word")"; fi
  done
  printf '%s' "${out# }"
}

dry_run=${DRY_RUN:-0}
tpu=""
zone=""
project=""
remote_dir=dcae_jax
setup=0
train=1
positional=()
extra=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --setup) setup=1 ;;
    --setup-only) setup=1; train=0 ;;
    --tpu | --zone | --project | --remote-dir)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --tpu) tpu=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --remote-dir) remote_dir=$2 ;;
      esac
      shift ;;
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --remote-dir=*) remote_dir=${1#*=} ;;
    --) shift; extra+=("$@"); break ;;
    --config.*) extra+=("$1") ;;
    -*) die "unknown option '$1' (pass other dcae_jax.main flags after '--')" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

[[ $dry_run == 0 || $dry_run == 1 ]] || die "DRY_RUN must be 0 or 1, got '$dry_run'"
[[ -n $tpu ]] || die "--tpu NAME is required"
[[ -n $zone ]] || die "--zone ZONE is required"
remote_dir=${remote_dir#\~/} # ssh starts in the home directory; "~" would not expand once quoted
[[ -n $remote_dir ]] || die "--remote-dir is empty"
if ((train)); then
  ((${#positional[@]} == 2)) || die "expected CONFIG and WORKDIR, got ${#positional[@]} positional argument(s): ${positional[*]-}"
  config=${positional[0]}
  workdir=${positional[1]}
  [[ -n $config ]] || die "CONFIG is empty"
  if [[ $workdir =~ ^gs://[^/]+ ]]; then
    : # a bucket: every worker writes there directly
  elif [[ $workdir =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; then
    die "WORKDIR '$workdir': only gs:// URLs are supported (or an absolute path shared by all workers)"
  else
    [[ $workdir == /* ]] || die "WORKDIR must be gs://BUCKET/... or an absolute path on a file system shared by all workers, got '$workdir'"
  fi
else
  ((${#positional[@]} == 0)) || die "--setup-only takes no CONFIG/WORKDIR"
fi
((dry_run)) || command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI"

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ((train)) && [[ ! -f $repo_root/${config%%:*} && ! -f ${config%%:*} ]]; then
  printf "tpu_pod.sh: warning: config '%s' not found in this checkout; it must exist in %s on the workers\n" \
    "${config%%:*}" "$remote_dir" >&2
fi
python=${PYTHON:-python3}
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone")
[[ -z $project ]] || ssh+=(--project "$project")
ssh+=(--worker=all)

if ((setup)); then
  jax_version=$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$repo_root/requirements.txt")
  [[ -n $jax_version ]] || die "no 'jax==VERSION' pin in $repo_root/requirements.txt"
  run "${ssh[@]}" --command "$(remote_cmd cd "$remote_dir" "&&" "$python" -m pip install -U \
    "jax[tpu]==$jax_version" -r requirements.txt)"
fi
if ((train)); then
  run "${ssh[@]}" --command "$(remote_cmd cd "$remote_dir" "&&" env JAX_NUM_PROCESSES=auto "$python" -m dcae_jax.main \
    "--config=$config" \
    "--workdir=$workdir" ${extra[@]+"${extra[@]}"})"
fi
