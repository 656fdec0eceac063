"""Ahead-of-time compilation of the train steps for a TPU slice, on any machine (the library behind
`python -m dcae_jax.aot`): TPU generations and topologies, compile-only devices, per-phase configs, and the
per-chip memory / FLOPs / projected-time analysis of XLA's compiled step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Any

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip specs (Cloud TPU system-architecture pages): peak bf16 TFLOP/s and HBM."""

    kind: str
    peak_tflops: float
    hbm_gib: float
    cores_per_name_unit: int  # v4-N / v5p-N count TensorCores (2 per chip); v5e-N / v6e-N count chips
    dims: int  # torus dimensions


CHIPS = {
    "v4": Chip("TPU v4", 275.0, 32.0, 2, 3),  # cloud.google.com/tpu/docs/v4
    "v5e": Chip("TPU v5e", 197.0, 16.0, 1, 2),  # cloud.google.com/tpu/docs/v5e
    "v5p": Chip("TPU v5p", 459.0, 95.0, 2, 3),  # cloud.google.com/tpu/docs/v5p
    "v6e": Chip("TPU v6e", 918.0, 32.0, 1, 2),  # cloud.google.com/tpu/docs/v6e
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# Chips -> slice shape of the standard (untwisted) Cloud TPU slices.
SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # key of CHIPS
    name: str  # what get_topology_desc takes, e.g. "v5p:2x4x4"
    chips: int

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]


def parse_topology(name: str) -> Topology:
    """`v5p-64` (Cloud TPU name) or `v5p:2x4x4` (topology string) -> Topology."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v5lite|v6e)([-:])(.+)", name.strip().lower())
    if not m:
        raise ValueError(f"--topology={name!r}: expected e.g. v5p-64, v5e-16, v4-32, v6e-8 or v5p:2x4x4")
    gen = _ALIASES.get(m.group(1), m.group(1))
    chip = CHIPS[gen]
    if m.group(2) == ":":
        dims = m.group(3).split("x")
        if len(dims) != chip.dims or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"--topology={name!r}: {gen} needs {chip.dims} dimensions, e.g. {_example(gen)}")
        chips = 1
        for d in dims:
            chips *= int(d)
        return Topology(gen, f"{gen}:{m.group(3)}", chips)
    if not m.group(3).isdigit() or int(m.group(3)) % chip.cores_per_name_unit:
        counts = "TensorCores, 2 per chip" if chip.cores_per_name_unit == 2 else "chips"
        what = "an even number" if chip.cores_per_name_unit == 2 else "a number"
        raise ValueError(f"--topology={name!r}: {gen}-N counts {counts}, so N must be {what}")
    chips = int(m.group(3)) // chip.cores_per_name_unit
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if chips not in shapes:
        sizes = ", ".join(f"{gen}-{c * chip.cores_per_name_unit}" for c in shapes)
        raise ValueError(f"--topology={name!r}: known sizes {sizes}; or pass a topology string like {_example(gen)}")
    return Topology(gen, f"{gen}:{shapes[chips]}", chips)


def _example(gen: str) -> str:
    return f"{gen}:2x2x2" if CHIPS[gen].dims == 3 else f"{gen}:4x4"


def topology_devices(topo: Topology) -> list[Any]:
    """Compile-only TPU devices, one per chip (v4 as megacore, as it runs by default)."""
    from jax.experimental import topologies

    # Compile-only use touches no chip, so libtpu's one-process-per-host lock (/tmp/libtpu_lockfile) need not apply.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = {}
    if topo.generation == "v4":
        kwargs["chip_config_name"] = "megacore"
    if topo.chips < 4:  # below the default 2x2x1 chips per host
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    devices = list(topologies.get_topology_desc(topology_name=topo.name, platform="tpu", **kwargs).devices)
    if len(devices) != topo.chips:
        raise RuntimeError(
            f"{topo.name}: libtpu describes {len(devices)} devices, expected {topo.chips} (one per chip)"
        )
    return devices


# ----------------------------------------------------------------------------------------------
# Configs per phase.


def phase_configs(config, config_path: str, overrides: dict[str, Any], phases: list[int]) -> list[tuple[str, Any]]:
    """(name, single-phase config) pairs: chain members, or the config file re-read with `phase=N`."""
    if "chain" in config:
        members = [(n, config[n]) for n in config.chain]
        chosen = [(n, c) for n, c in members if not phases or c.phase in phases]
        if not chosen:
            raise ValueError(f"--phases={phases}: the chain has phases {[c.phase for _, c in members]}")
        return chosen
    if config.get("trainer", "dcae") == "diffusion":
        if phases:
            raise ValueError(f"--phases={phases}: a diffusion config has no phases")
        from dcae_jax.diffusion.train import model_config

        name = model_config(config, tuple(config.data.latent_shape)).name  # the trainer's model, overrides applied
        return [(f"{name} ({config.objective})", config)]
    if not phases:
        return [(f"phase{config.phase}", config)]
    path, _, arg = config_path.partition(":")
    out = []
    for p in phases:
        items = [a for a in arg.split(",") if a and not a.startswith("phase=")]
        c = _load_config(path, ",".join([*items, f"phase={p}"]))
        for key, value in overrides.items():
            node = c
            *parents, leaf = key.split(".")
            for k in parents:
                node = node[k]
            node[leaf] = value
        out.append((f"phase{p}", c))
    return out


def _load_config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("aot_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def with_lpips_stand_in(config, tmpdir: str):
    """LPIPS configured but no weights file: random VGG16 weights of the right shapes (shape-only analysis)."""
    if (
        "loss" not in config
        or config.loss.lpips_weight <= 0
        or (config.loss.lpips_weights and os.path.isfile(config.loss.lpips_weights))
    ):
        return config, ""
    import jax
    import jax.numpy as jnp

    from dcae_jax.metrics import lpips

    path = os.path.join(tmpdir, "lpips_vgg_random.npz")
    if not os.path.exists(path):
        variables = jax.jit(lpips.LPIPS(net="vgg").init)(jax.random.key(0), *[jnp.zeros((1, 64, 64, 3))] * 2)
        lpips.save_lpips_weights(variables, path, "vgg")
    config = config.copy_and_resolve_references()
    config.loss.lpips_weights = path
    return (
        config,
        "LPIPS VGG16 with random weights of the right shapes (the fit and the FLOPs do not depend on the values)",
    )


# ----------------------------------------------------------------------------------------------
# Analysis.


def analyze(config, topo: Topology, devices: list[Any], mfu: float) -> dict[str, Any]:
    """Compiles one phase's train step for `devices`; memory per chip in bytes, FLOPs per chip and step."""
    from dcae_jax.autoencoder import train
    from dcae_jax.diffusion import train as diffusion_train

    t0 = time.time()
    diffusion = config.get("trainer", "dcae") == "diffusion"
    lower = diffusion_train.lower_train_step if diffusion else train.lower_train_step
    compiled = lower(config, devices=devices).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0))  # per device: the partitioned (per-chip) program
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    step_s = flops / (topo.chip.peak_tflops * 1e12 * mfu)
    return {
        "resolution": "x".join(map(str, config.data.latent_shape)) if diffusion else config.resolution,
        "global_batch": config.global_batch_size,
        "per_chip_batch": config.global_batch_size / topo.chips,
        "arguments": mem.argument_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,
        "temporaries": mem.temp_size_in_bytes,
        "code": mem.generated_code_size_in_bytes,
        "total": total,
        "hbm": topo.chip.hbm_gib * GIB,
        "fits": total <= topo.chip.hbm_gib * GIB,
        "flops_per_chip": flops,
        "flops_global": flops * topo.chips,
        "step_s": step_s,
        "images_per_s": config.global_batch_size / step_s if step_s > 0 else float("inf"),
        "compile_s": time.time() - t0,
    }


def table(topo: Topology, mfu: float, rows: list[tuple[str, dict]]) -> str:
    head = (
        f"{topo.chip.kind} {topo.name} ({topo.chips} chips; {topo.chip.hbm_gib:g} GiB HBM and "
        f"{topo.chip.peak_tflops:g} bf16 TFLOP/s peak per chip), projected at MFU {mfu:g}\n\n"
        "| phase | resolution | batch (global / chip) | arguments | outputs | temporaries | total per chip | "
        "HBM use | TFLOP/step/chip | step @ MFU | images/s | compile |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {r['resolution']} | {r['global_batch']} | {r['error']} |||||||||")
            continue
        lines.append(
            f"| {name} | {r['resolution']} | {r['global_batch']} / {r['per_chip_batch']:g} | "
            f"{_size(r['arguments'])} | {_size(r['outputs'])} | {_size(r['temporaries'])} | {_size(r['total'])} | "
            f"{100 * r['total'] / r['hbm']:.1f}% | {r['flops_per_chip'] / 1e12:.4g} | {r['step_s'] * 1e3:.3g} ms | "
            f"{r['images_per_s']:.4g} | {r['compile_s']:.0f} s |"
        )
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _out_of_hbm(err: Exception) -> bool:
    msg = str(err)
    return "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg


def analyze_all(
    configs: list[tuple[str, Any]], topo: Topology, mfu: float, log=lambda s: None
) -> tuple[list[tuple[str, dict]], list[str]]:
    """`analyze` for each (name, config); a phase the TPU compiler cannot fit becomes a row with `fits` False and
    the compiler's first line. Returns (rows, notes about stand-in LPIPS weights)."""
    import tempfile

    devices = topology_devices(topo)
    rows, notes = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs:
            config, note = with_lpips_stand_in(config, tmp)
            notes.update([note] if note else [])
            try:
                rows.append((name, analyze(config, topo, devices, mfu)))
            except Exception as err:
                if not _out_of_hbm(err):
                    raise
                first = str(err).strip().splitlines()[0][:300]
                failed = {"resolution": config.get("resolution", "latents"), "global_batch": config.global_batch_size}
                rows.append((name, {**failed, "fits": False, "error": f"TPU compiler: out of HBM ({first})"}))
            log(f"{name} compiled")
    return rows, sorted(notes)


def write_json(path: str, topo: Topology, mfu: float, rows: list[tuple[str, dict]]) -> None:
    """The numbers (bytes, FLOPs, seconds) per phase, with the topology and chip, as JSON (atomically)."""
    import json

    from dcae_jax.runtime import paths

    info = {"topology": topo.name, "chips": topo.chips, "chip": dataclasses.asdict(topo.chip), "mfu": mfu}
    paths.write_text_atomic(path, json.dumps({**info, "phases": dict(rows)}, indent=2))
