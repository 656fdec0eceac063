"""A training run's logged metrics on disk (`metrics.jsonl`, one line per log step) and their curves (`curves.png`).

The file is appended at each log step by process 0, so it survives a kill and a resume; steps logged again after a
resume replace the earlier lines for those steps when read back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from dcae_jax.runtime import paths

FILENAME = "metrics.jsonl"
PLOT = "curves.png"


def append(workdir: paths.PathLike, step: int, values: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    paths.append_line(paths.path(workdir) / FILENAME, json.dumps(row))


def read(workdir: paths.PathLike) -> list[dict[str, float]]:
    """Rows by step (the last line written for a step wins); a torn last line (killed mid-write) is ignored."""
    path = paths.path(workdir) / FILENAME
    if not path.exists():
        return []
    rows: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def plot(workdir: paths.PathLike, keys: Sequence[str], title: str) -> paths.Path | None:
    """One panel per key that was logged with a non-zero value; returns the PNG's path (None if nothing to plot)."""
    rows = read(workdir)
    keys = [k for k in keys if any(r.get(k) for r in rows)]  # fields that are always 0 in this phase are left out
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        values = [p[1] for p in pts]
        if values and min(values) > 0 and max(values) / min(values) > 10:  # a loss falling by decades
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = paths.save_figure(fig, paths.path(workdir) / PLOT, dpi=90)
    plt.close(fig)
    return out
