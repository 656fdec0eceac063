"""Convert any supported DC-AE checkpoint to dcae_jax's export format.

    python -m dcae_jax.convert --src path/or/repo --out exports/name [--variant NAME]

The weight mapping (a library, not a command) lives in `dcae_jax.models.convert`.
"""

from __future__ import annotations

from dcae_jax import cli


def main(argv: list[str] | None = None) -> None:
    import argparse

    from dcae_jax.pretrained import DCAE

    p = argparse.ArgumentParser(description="Convert a DC-AE checkpoint to dcae_jax's export format.")
    p.add_argument("--src", required=True, help="checkpoint dir/file (diffusers, efficientvit) or HF repo id")
    p.add_argument("--out", required=True, help="output directory (orbax checkpoint + dcae_config.json)")
    p.add_argument("--variant", default=None, help="registry name when the source does not say (-in vs -mix)")
    args = p.parse_args(cli.snake_case_flags(argv, "convert"))
    ae = DCAE.from_pretrained(args.src, variant=args.variant)
    ae.save_pretrained(args.out)
    print(
        f"wrote {args.out}: {ae.config.name}, {ae.num_params():,} parameters, scaling_factor={ae.config.scaling_factor}"
    )


if __name__ == "__main__":
    cli.run_argparse("convert", main)
