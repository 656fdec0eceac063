"""Convert any supported DC-AE checkpoint to dcae_jax's export format, or back to a PyTorch format.

    python -m dcae_jax.convert --src=path/or/repo --out=exports/name [--variant=NAME]
    python -m dcae_jax.convert --src=/runs/ft/export --out=exports/ft-diffusers --to=diffusers     # AutoencoderDC
    python -m dcae_jax.convert --src=/runs/ft/export --out=exports/ft-original --to=efficientvit  # DC-Gen layout

The weight mapping (a library, not a command) lives in `dcae_jax.autoencoder.convert`.
"""

from __future__ import annotations

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string("src", None, "Checkpoint dir/file (diffusers, efficientvit) or Hugging Face repo id.", required=True)
    f.string("out", None, "Output directory (orbax checkpoint + dcae_config.json).", required=True)
    f.string("variant", None, "Registry name when the source does not say (-in vs -mix).")
    f.enum("to", "dcae_jax", ["dcae_jax", "diffusers", "efficientvit"], "Output format.")


def body(flags) -> None:
    from dcae_jax.autoencoder.pretrained import DCAE

    ae = DCAE.from_pretrained(flags.src, variant=flags.variant)
    ae.save_pretrained(flags.out, format=flags.to)
    print(
        f"wrote {flags.out} ({flags.to} format): {ae.config.name}, {ae.num_params():,} parameters, "
        f"scaling_factor={ae.config.scaling_factor}"
        + (
            f"; try python -m dcae_jax.reconstruct --model={flags.out} --input=photos/ --output=recon/"
            if flags.to == "dcae_jax"
            else "; load it in PyTorch with diffusers.AutoencoderDC.from_pretrained(...)"
            if flags.to == "diffusers"
            else "; load model.safetensors into the efficientvit / DC-Gen DCAE of that name"
        )
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run("convert", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
