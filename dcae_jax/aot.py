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

import dataclasses
import json
import pathlib
import sys
import tempfile

from absl import flags
from ml_collections import config_flags

from dcae_jax import cli
from dcae_jax.training import aot


def _die(msg: str) -> None:
    print(f"aot: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _oom(err: Exception) -> bool:
    msg = str(err)
    return "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg


def main(argv):
    opts = flags.FLAGS
    if len(argv) > 1:
        _die(f"unexpected arguments: {argv[1:]}")
    if not opts.topology:
        _die("--topology is required, e.g. --topology=v5p-64")
    if not 0 < opts.mfu <= 1:
        _die(f"--mfu={opts.mfu}: must be in (0, 1]")
    try:
        topo = aot.parse_topology(opts.topology)
        phases = [int(p) for p in opts.phases]
    except ValueError as err:
        _die(str(err))
    flag = flags.FLAGS["config"]
    configs = aot.phase_configs(
        opts.config, config_flags.get_config_filename(flag), config_flags.get_override_values(flag), phases
    )
    devices = aot.topology_devices(topo)
    rows, notes = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs:
            config, note = aot.with_lpips_stand_in(config, tmp)
            notes.update([note] if note else [])
            try:
                rows.append((name, aot.analyze(config, topo, devices, opts.mfu)))
            except Exception as err:
                if not _oom(err):
                    raise
                first = str(err).strip().splitlines()[0][:300]
                res = config.get("resolution", "latents")
                failed = {"resolution": res, "global_batch": config.global_batch_size, "fits": False}
                rows.append((name, {**failed, "error": f"TPU compiler: out of HBM ({first})"}))
            print(f"aot: {name} compiled", file=sys.stderr, flush=True)
    print(aot.table(topo, opts.mfu, rows))
    if opts.json:
        info = {"topology": topo.name, "chips": topo.chips, "chip": dataclasses.asdict(topo.chip), "mfu": opts.mfu}
        pathlib.Path(opts.json).write_text(json.dumps({**info, "phases": dict(rows)}, indent=2))
    for note in sorted(notes):
        print(f"\nNote: {note}.")
    too_big = [name for name, r in rows if not r["fits"]]
    if too_big:
        print(
            f"aot: error: {', '.join(too_big)} does not fit in {topo.chip.hbm_gib:g} GiB of HBM per chip on "
            f"{topo.name}; use more chips, a smaller per-chip batch, or FSDP (config.mesh.shape).",
            file=sys.stderr,
        )
        sys.exit(1)


def _define_flags() -> None:
    """Flags only when run as a program, so importing this module (tests) never collides with main.py's."""
    config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=False)
    flags.DEFINE_string("topology", None, "v5p-64, v5e-16, v4-32, v6e-8, or a string like v5p:2x4x4.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the projected step time.")
    flags.DEFINE_list("phases", [], "Phases to compile, e.g. 1,2,3 (default: the config as given).")
    flags.DEFINE_string("json", "", "Also write the numbers (bytes, FLOPs, seconds) per phase to this JSON file.")


if __name__ == "__main__":
    _define_flags()
    cli.run_absl("aot", main)
