"""Optimizers with config-declared freezing: ordered (regex, "train"|"freeze") rules over param paths.

Each phase of DC-AE training differs only in which parameters it updates. The rules are data in
the config; `optax.multi_transform` gives frozen parameters `optax.set_to_zero()`, so they carry
no optimizer state, and the train step wraps them in `stop_gradient` so XLA never back-propagates
into layers that have nothing trainable upstream (phase 2's memory saving).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

TRAIN, FREEZE = "train", "freeze"


def param_path(path) -> str:
    """'/'-joined names of a pytree key path, e.g. 'decoder/stage_5_block_0/attn/qkv/kernel'."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def label_params(params: Any, rules: Sequence[tuple[str, str]]) -> Any:
    """A pytree of "train"/"freeze" labels: the first rule whose regex fully matches the path wins.

    Raises ValueError naming every parameter no rule matches, and any rule with a bad label.
    """
    compiled = []
    for pattern, label in rules:
        if label not in (TRAIN, FREEZE):
            raise ValueError(f"rule ({pattern!r}, {label!r}): label must be {TRAIN!r} or {FREEZE!r}")
        compiled.append((re.compile(pattern), label))
    unmatched = []

    def label(path, _):
        name = param_path(path)
        for regex, lab in compiled:
            if regex.fullmatch(name):
                return lab
        unmatched.append(name)
        return FREEZE

    labels = jax.tree_util.tree_map_with_path(label, params)
    if unmatched:
        shown = unmatched[:10] + (["..."] if len(unmatched) > 10 else [])
        raise ValueError(
            f"{len(unmatched)} parameters match no rule in config.trainable {list(rules)}: {shown}. "
            "End the list with ('.*', 'freeze') or ('.*', 'train') to cover the rest."
        )
    return labels


def masked(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """`tx` on "train" parameters, zero updates and no state on "freeze" parameters."""
    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)


def warmup_schedule(learning_rate: float, warmup_steps: int = 0, decay_steps: int = 0) -> optax.Schedule:
    """Linear warm-up from 0, then constant (decay_steps=0) or cosine decay to 0 at `decay_steps`.

    Indexed by optax's update count: training step k (1-based) applies `schedule(k - 1)`.
    """
    if decay_steps > 0:
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), decay_steps)
    if warmup_steps > 0:
        return optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.constant_schedule(learning_rate)


def adamw_with_warmup(
    learning_rate: float,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW with `warmup_schedule`'s learning rate."""
    schedule = warmup_schedule(learning_rate, warmup_steps, decay_steps)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def stop_frozen_gradients(params: Any, labels: Any) -> Any:
    """Frozen leaves wrapped in stop_gradient: their backward pass is never built."""
    return jax.tree_util.tree_map(lambda p, lab: p if lab == TRAIN else jax.lax.stop_gradient(p), params, labels)


def _module_of(path: str) -> str:
    # 'encoder/stage_3_block_1/attn/qkv/kernel' -> 'encoder/stage_3'
    top, _, rest = path.partition("/")
    module = rest.split("/", 1)[0]
    module = re.sub(r"_(block_\d+|down|up)$", "", module)
    return f"{top}/{module}"


def trainable_table(params: Any, labels: Any) -> str:
    """Markdown table of trainable / total parameter counts per module (logged at start)."""
    total: dict[str, int] = collections.OrderedDict()
    trainable: dict[str, int] = collections.defaultdict(int)
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_l = jax.tree_util.tree_leaves(labels)
    for (path, leaf), lab in zip(flat_p, flat_l, strict=True):
        m = _module_of(param_path(path))
        total[m] = total.get(m, 0) + int(leaf.size)
        if lab == TRAIN:
            trainable[m] += int(leaf.size)
    lines = ["| module | trainable | total |", "|---|---:|---:|"]
    for m, n in total.items():
        lines.append(f"| {m} | {trainable[m]:,} | {n:,} |")
    lines.append(f"| **all** | **{sum(trainable.values()):,}** | **{sum(total.values()):,}** |")
    return "\n".join(lines)
