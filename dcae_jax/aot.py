"""Will it fit, and how fast? Compiles each phase's train step for a TPU slice on this machine, no TPU needed.

    python -m dcae_jax.aot --config=configs/dcae.py:variant=f32c32 --topology=v5p-64 --phases=1,2,3 [--mfu=0.4]
    python -m dcae_jax.aot --config=configs/quickstart.py --topology=v5e-4            # every phase of a chain

Logic: `dcae_jax.training.aot`. The real sharded train step (`train.lower_train_step`) is compiled by libtpu (`pip install "jax[tpu]"`)
for the compile-only devices of `jax.experimental.topologies.get_topology_desc`, then XLA reports per-chip
memory and FLOPs. Printed per phase: arguments, outputs, temporaries and their total (arguments + outputs -
donated aliases + temporaries + program code) against the chip's HBM; XLA's counted FLOPs per step; a
projected step time and throughput at `--mfu` of the chip's peak bf16 rate. Exits 1 when a phase does not
fit (or the TPU compiler itself runs out of HBM), so a launch script can run it first.

`--topology` takes Cloud TPU names (`v4-32`, `v5p-64`, `v5litepod-16` / `v5e-16`, `v6e-8`; for v4 and v5p
the number counts TensorCores, two per chip, for v5e and v6e it counts chips) or a topology string
(`v5p:2x4x4`). docs/scaling.md has the table. `--phases` re-reads a per-phase config file with `phase=N`
(or picks the chain members of that phase); without it the config is compiled as given. LPIPS: without a
weights file, random VGG16 weights of the right shapes are used (memory and FLOPs depend on shapes only).
"""

from __future__ import annotations

import sys

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training configuration file.", flag_values=f.values, lock_config=False
    )
    f.mark_flag_as_required("config")
    f.string("topology", None, "v5p-64, v5e-16, v4-32, v6e-8, or a string like v5p:2x4x4.", required=True)
    f.float("mfu", 0.4, "Model FLOPs utilisation assumed for the projected step time.", lower_bound=1e-6, upper_bound=1)
    f.list("phases", [], "Phases to compile, e.g. 1,2,3 (default: the config as given).")
    f.string("json", "", "Also write the numbers (bytes, FLOPs, seconds) per phase to this JSON file.")


def body(flags) -> int:
    from ml_collections import config_flags

    from dcae_jax.training import aot

    topo = aot.parse_topology(flags.topology)
    try:
        phases = [int(p) for p in flags.phases]
    except ValueError:
        raise ValueError(f"--phases={','.join(flags.phases)}: expected phase numbers, e.g. 1,2,3") from None
    if set(phases) - {1, 2, 3}:  # all of them before any compiles
        raise ValueError(f"--phases={','.join(flags.phases)}: the phases are 1, 2 and 3")
    flag = flags["config"]
    configs = aot.phase_configs(
        flags.config, config_flags.get_config_filename(flag), config_flags.get_override_values(flag), phases
    )
    rows, notes = aot.analyze_all(
        configs, topo, flags.mfu, log=lambda s: print(f"aot: {s}", file=sys.stderr, flush=True)
    )
    print(aot.table(topo, flags.mfu, rows))
    if flags.json:
        aot.write_json(flags.json, topo, flags.mfu, rows)
        print(f"\nwrote {flags.json}")
    for note in notes:
        print(f"\nNote: {note}.")
    too_big = [name for name, r in rows if not r["fits"]]
    if too_big:
        print(
            f"aot: error: {', '.join(too_big)} does not fit in {topo.chip.hbm_gib:g} GiB of HBM per chip on "
            f"{topo.name}; use more chips, a smaller per-chip batch, or FSDP (config.mesh.shape).",
            file=sys.stderr,
        )
        return 1
    config_arg = config_flags.get_config_filename(flag)  # the file and its args, as given
    overrides = "".join(f" --config.{k}={v}" for k, v in config_flags.get_override_values(flag).items())
    print(f"\nfits; launch it with launch/tpu_pod.sh --tpu NAME --zone ZONE {config_arg} WORKDIR{overrides}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("aot", __doc__, define_flags, body, argv)


if __name__ == "__main__":
    cli.exit_with(main())
