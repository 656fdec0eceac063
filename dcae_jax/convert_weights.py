"""Convert LPIPS / FID-Inception weights you already have as PyTorch files (torchvision, lpips, pytorch-fid) to ours.

    python -m dcae_jax.convert_weights --lpips=vgg --backbone=vgg16-397923af.pth --out=lpips_vgg.npz [--lin=vgg.pth]
    python -m dcae_jax.convert_weights --fid_inception=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.npz
    python -m dcae_jax.convert_weights --fid_distance=a.npz,b.npz       # FID between two statistics files

Most users need none of this: `python -m dcae_jax.fetch_weights` makes the genuine files without torch. Reading
.pth files needs torch. The stats files are ours (`fid_stats`) or pytorch-fid's `--save-stats`.
"""

from __future__ import annotations

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.enum("lpips", None, ["alex", "vgg"], "Convert an LPIPS network: its torchvision trunk.")
    f.string("backbone", None, "With --lpips: vgg16-397923af.pth or alexnet-owt-7be5be79.pth.")
    f.string("lin", None, "With --lpips: lpips weights/v0.1/{vgg,alex}.pth (default: the lpips package's).")
    f.string("fid_inception", None, "Convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
    f.list("fid_distance", None, "Two statistics files: print the FID between them.")
    f.string("out", None, "Output .npz (with --lpips or --fid_inception).")


def body(flags) -> None:
    from dcae_jax.metrics import fid, lpips

    modes = [name for name in ("lpips", "fid_inception", "fid_distance") if flags[name].value]
    if len(modes) != 1:
        raise ValueError(f"give exactly one of --lpips, --fid_inception, --fid_distance (got {modes or 'none'})")
    if flags.fid_distance:
        if len(flags.fid_distance) != 2:
            raise ValueError(f"--fid_distance needs two files, got {flags.fid_distance}")
        a, b = (fid.load_stats(p) for p in flags.fid_distance)
        print(f"FID: {fid.frechet_distance(*a, *b):.6f}")
        return
    if not flags.out:
        raise ValueError(f"--{modes[0]} needs --out")
    if flags.lpips:
        if not flags.backbone:
            raise ValueError("--lpips needs --backbone (the torchvision trunk .pth)")
        n = lpips.convert_files(flags.lpips, flags.backbone, flags.lin, flags.out)
        print(f"wrote {flags.out}: LPIPS {flags.lpips}, {n:,} parameters (trunk {flags.backbone})")
    else:
        n = fid.convert_file(flags.fid_inception, flags.out)
        print(f"wrote {flags.out}: FID InceptionV3 (pool3), {n:,} values from {flags.fid_inception}")
    kind = "lpips" if flags.lpips else "fid"
    print(f"use it with e.g. python -m dcae_jax.evaluate --{kind}_weights={flags.out} ...")


def main(argv: list[str] | None = None) -> int:
    return cli.run("convert_weights", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
