"""Convert any supported DC-AE checkpoint to dcae_jax's export format.

    python -m dcae_jax.convert --src=path/or/repo --out=exports/name [--variant=NAME]

The weight mapping (a library, not a command) lives in `dcae_jax.autoencoder.convert`.
"""

from __future__ import annotations

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string("src", None, "Checkpoint dir/file (diffusers, efficientvit) or Hugging Face repo id.", required=True)
    f.string("out", None, "Output directory (orbax checkpoint + dcae_config.json).", required=True)
    f.string("variant", None, "Registry name when the source does not say (-in vs -mix).")


def body(flags) -> None:
    from dcae_jax.autoencoder.pretrained import DCAE

    ae = DCAE.from_pretrained(flags.src, variant=flags.variant)
    ae.save_pretrained(flags.out)
    print(
        f"wrote {flags.out}: {ae.config.name}, {ae.num_params():,} parameters, scaling_factor={ae.config.scaling_factor}"
        f"; try python -m dcae_jax.reconstruct --model={flags.out} --input=photos/ --output=recon/"
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run("convert", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
