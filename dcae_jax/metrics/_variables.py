"""Validation of converted network variables (shared by the LPIPS and FID weight files)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from dcae_jax.runtime.state_dict import listing


def check_variables(
    variables: Mapping[str, Any], want: Mapping[tuple[str, ...], tuple[int, ...]], where: str, what: str
) -> dict[tuple[str, ...], np.ndarray]:
    """Flattens `variables` and checks names and shapes against `want`; one ValueError lists every problem."""
    flat = traverse_util.flatten_dict(dict(variables))
    problems = []
    if set(want) - set(flat):
        problems.append(listing("missing", {"/".join(k) for k in set(want) - set(flat)}))
    if set(flat) - set(want):
        problems.append(listing("unexpected", {"/".join(k) for k in set(flat) - set(want)}))
    for k in set(want) & set(flat):
        if tuple(np.shape(flat[k])) != want[k]:
            problems.append(f"{'/'.join(k)}: shape {tuple(np.shape(flat[k]))}, expected {want[k]}")
    if problems:
        raise ValueError(f"{where}: not {what} variables:\n  " + "\n  ".join(problems))
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}
