"""The equal-size bicubic baseline for an autoencoder: bicubic down to as many values as the latent holds, and back.

    python -m dcae_jax.bicubic --data=bundled --split=validation --resolution=128 --factor=16 --channels=16

A latent of f x f spatial compression and c channels holds (R / f)^2 * c values per R x R image; an RGB image of side
s holds 3 s^2, so the baseline's side is s = floor(R / f * sqrt(c / 3)) (never more values than the latent). Images
are ADM-center-cropped like the evaluation, resized with PIL's bicubic filter down to s x s and back up to R x R,
and scored with the evaluation's PSNR / SSIM (uint8) and, where the genuine weights are available, LPIPS (AlexNet).
Library: `dcae_jax.studies.measure.bicubic_baseline`.
"""

from __future__ import annotations

import json

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string("data", "bundled", "bundled | folder:DIR | DIR | tfds:NAME[@DATA_DIR].")
    f.string("split", "validation", "Dataset split.")
    f.integer("resolution", 128, "ADM center crop to R x R.", lower_bound=1)
    f.integer("factor", 16, "The autoencoder's spatial compression f.", lower_bound=1)
    f.integer("channels", 16, "The autoencoder's latent channels c.", lower_bound=1)
    f.bool("no_lpips", False, "Skip LPIPS (no weights needed).")


def body(flags) -> None:
    from dcae_jax.studies import measure

    r = measure.bicubic_baseline(
        flags.data, flags.split, flags.resolution, flags.factor, flags.channels, lpips=not flags.no_lpips
    )
    print(json.dumps(r, indent=2))
    print(
        f"an autoencoder with {flags.factor}x spatial compression and {flags.channels} channels beats this baseline "
        f"when its PSNR at {flags.resolution}px on the same images (eval.md, evaluate) is above {r['psnr']:.2f} dB"
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run("bicubic", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
