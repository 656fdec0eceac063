"""Convert LPIPS / FID-Inception weights you already have as PyTorch files (torchvision, lpips, pytorch-fid) to ours.

    python -m dcae_jax.convert_weights --lpips=vgg --backbone=vgg16-397923af.pth --out=lpips_vgg.npz [--lin=vgg.pth]
    python -m dcae_jax.convert_weights --fid_inception=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.npz
    python -m dcae_jax.convert_weights --fid_distance=a.npz,b.npz       # FID between two statistics files

Most users need none of this: `python -m dcae_jax.fetch_weights` makes the genuine files without torch. Reading
.pth files needs torch. The stats files are ours (`fid_stats`) or pytorch-fid's `--save-stats`.
"""

from __future__ import annotations

from absl import app, flags

from dcae_jax import cli

_LPIPS = flags.DEFINE_enum("lpips", None, ["alex", "vgg"], "Convert an LPIPS network: its torchvision trunk.")
_BACKBONE = flags.DEFINE_string("backbone", None, "With --lpips: vgg16-397923af.pth or alexnet-owt-7be5be79.pth.")
_LIN = flags.DEFINE_string(
    "lin", None, "With --lpips: lpips weights/v0.1/{vgg,alex}.pth (default: the lpips package's)."
)
_FID = flags.DEFINE_string("fid_inception", None, "Convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
_DISTANCE = flags.DEFINE_list("fid_distance", None, "Two statistics files: print the FID between them.")
_OUT = flags.DEFINE_string("out", None, "Output .npz (with --lpips or --fid_inception).")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    modes = [
        name for name, f in (("--lpips", _LPIPS), ("--fid_inception", _FID), ("--fid_distance", _DISTANCE)) if f.value
    ]
    if len(modes) != 1:
        raise app.UsageError(f"give exactly one of --lpips, --fid_inception, --fid_distance (got {modes or 'none'})")
    from dcae_jax.metrics import fid, lpips

    if _DISTANCE.value:
        if len(_DISTANCE.value) != 2:
            raise app.UsageError(f"--fid_distance needs two files, got {_DISTANCE.value}")
        a, b = (fid.load_stats(p) for p in _DISTANCE.value)
        print(f"FID: {fid.frechet_distance(*a, *b):.6f}")
        return 0
    if not _OUT.value:
        raise app.UsageError(f"{modes[0]} needs --out")
    if _LPIPS.value:
        if not _BACKBONE.value:
            raise app.UsageError("--lpips needs --backbone (the torchvision trunk .pth)")
        n = lpips.convert_files(_LPIPS.value, _BACKBONE.value, _LIN.value, _OUT.value)
        print(f"wrote {_OUT.value}: LPIPS {_LPIPS.value}, {n:,} parameters (trunk {_BACKBONE.value})")
    else:
        n = fid.convert_file(_FID.value, _OUT.value)
        print(f"wrote {_OUT.value}: FID InceptionV3 (pool3), {n:,} values from {_FID.value}")
    print(
        f"use it with e.g. python -m dcae_jax.evaluate --{'lpips' if _LPIPS.value else 'fid'}-weights {_OUT.value} ..."
    )
    return 0


if __name__ == "__main__":
    cli.run_absl("convert_weights", main)
