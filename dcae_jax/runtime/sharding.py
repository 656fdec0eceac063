"""Device mesh and sharding rules, declared in the config.

The mesh has a data-parallel axis and an FSDP axis (`config.mesh.axes = ("data", "fsdp")`).
Batches are split over both; every state leaf (params, optimizer moments, EMA, discriminator)
follows ordered (regex, strategy) rules over its '/'-joined path:

* "fsdp": shard the largest dimension divisible by the fsdp axis size over it (replicate small
  leaves below `min_size` elements, where the all-gather costs more than it saves);
* "replicate": keep a full copy on every device.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dcae_jax.training.optim import param_path


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over all (or the given) devices; one -1 entry in `shape` takes the remaining devices.

    Axes are `AxisType.Auto` (GSPMD propagation); jax 0.10's default would be Explicit.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh.shape {shape} and config.mesh.axes {list(axes)} differ in length")
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape {shape}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"config.mesh.shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"config.mesh.shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=auto, devices=devices)


def mesh_from_config(config, devices: Sequence[Any] | None = None) -> Mesh:
    """The trainers' mesh: `config.mesh.shape` over `config.mesh.axes`, on the first `config.mesh.num_devices`
    devices (0: all of them, or of `devices`)."""
    devices = list(jax.devices() if devices is None else devices)
    n = config.mesh.get("num_devices", 0)
    return make_mesh(config.mesh.shape, config.mesh.axes, devices[:n] if n else devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], axis: str, size: int, min_size: int) -> P:
    if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            spec = [None] * len(shape)
            spec[dim] = axis
            return P(*spec)
    return P()


def tree_shardings(
    tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str]] = ((".*", "fsdp"),),
    fsdp_axis: str = "fsdp",
    min_size: int = 2**14,
) -> Any:
    """NamedShardings for every leaf of an (abstract) pytree, from ordered (regex, strategy) rules."""
    compiled = [(re.compile(p), s) for p, s in rules]
    for _, s in compiled:
        if s not in ("fsdp", "replicate"):
            raise ValueError(f"sharding strategy {s!r}: valid are 'fsdp', 'replicate'")
    if any(s == "fsdp" for _, s in compiled) and fsdp_axis not in mesh.axis_names:
        raise ValueError(
            f"sharding rules use 'fsdp' but the mesh has no axis {fsdp_axis!r} (axes {list(mesh.axis_names)}): "
            "name the FSDP axis in config.sharding.fsdp_axis, or use 'replicate' rules"
        )
    size = mesh.shape.get(fsdp_axis, 1)

    def leaf_sharding(path, leaf):
        name = param_path(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for regex, strategy in compiled:
            if regex.search(name):
                if strategy == "fsdp":
                    return NamedSharding(mesh, _fsdp_spec(shape, fsdp_axis, size, min_size))
                return NamedSharding(mesh, P())
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def config_shardings(tree: Any, mesh: Mesh, config) -> Any:
    """`tree_shardings` with the trainers' config data: `config.sharding.rules`, `.min_size` and `.fsdp_axis`."""
    c = config.sharding
    return tree_shardings(
        tree, mesh, [tuple(r) for r in c.rules], fsdp_axis=c.get("fsdp_axis", "fsdp"), min_size=c.min_size
    )


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Per-process host batches -> global arrays sharded over the mesh (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
