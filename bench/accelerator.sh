#!/usr/bin/env bash
# The accelerator scale of bench.suite as one call on a lent GPU machine (bench/README.md, "The accelerator plan").
#
#   bash bench/accelerator.sh OUT [WHEELS [SUITE_ARGS...]]
#
# OUT: folder for environment.txt, preflight/ (one tiny encode+decode row on the GPU: imports, weight conversion,
# both frameworks on the device), accelerator/ (results.json and results.md, rewritten after each row) and
# accelerator.log. WHEELS: a folder of wheels to install first, for a machine without a package index (installed
# with --no-deps into a folder put first on PYTHONPATH, so they win over the machine's own packages). If the
# preflight fails with the wheels' flax, it is retried once with the machine's own flax. Run from the repository
# root; JAX_PLATFORMS defaults to cuda.
set -uo pipefail
out=${1:?usage: bash bench/accelerator.sh OUT [WHEELS [SUITE_ARGS...]]}
wheels=${2:-}
shift $(($# < 2 ? $# : 2))
mkdir -p "$out" || exit 2
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
site=${TMPDIR:-/tmp}/dcae_jax_site

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  grep -m1 "model name" /proc/cpuinfo
  echo "cores: $(nproc)"
  echo "machine's own packages:"
  "$python" -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__)" 2>&1
} >"$out/environment.txt"

if [[ -n $wheels ]]; then
  rm -rf "$site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl || { echo "accelerator.sh: could not install the wheels of $wheels" >&2; exit 2; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  { printf 'installed from %s:' "$wheels"; for w in "$wheels"/*.whl; do printf ' %s' "${w##*/}"; done; echo; } \
    >>"$out/environment.txt"
fi

preflight() {
  "$python" -m bench.suite --scale smoke --only "ae tiny" --budget 120 --out "$out/preflight" \
    >"$out/preflight.log" 2>&1 && grep -q '"status": "ok"' "$out/preflight/results.json"
}
if ! preflight; then
  tail -20 "$out/preflight.log" >&2
  if [[ -n $wheels ]] && compgen -G "$site/flax" >/dev/null; then
    echo "accelerator.sh: preflight failed with the wheels' flax; retrying with the machine's own" >&2
    rm -rf "$site"/flax "$site"/flax-*.dist-info
    echo "flax: the machine's own (the wheels' flax failed the preflight)" >>"$out/environment.txt"
    preflight || { tail -20 "$out/preflight.log" >&2; exit 1; }
  else
    exit 1
  fi
fi
"$python" -c "import jax, flax, diffusers; print('used: jax', jax.__version__, 'flax', flax.__version__, \
'diffusers', diffusers.__version__, 'devices', jax.devices())" >>"$out/environment.txt" 2>&1

"$python" -m bench.suite --scale accelerator --out "$out/accelerator" "$@" 2>&1 | tee "$out/accelerator.log" ||
  exit 1
echo "accelerator.sh: wrote $out (environment.txt, preflight/, accelerator/results.json and results.md, logs)"
