"""The benchmark suite: every dcae_jax-vs-reference comparison of bench/, one table, one results.json.

    python -m bench.suite --scale smoke --out /tmp/suite            # CI: tiny models, < 1 min on 2 cores
    python -m bench.suite --scale cpu --out /tmp/suite --docs docs/performance.md   # a CPU, ~20 min
    python -m bench.suite --scale accelerator --out /tmp/suite      # one H100/H200-class GPU, ~8 min
    python -m bench.suite --scale cpu --only uvit --repeats 3 --out /tmp/suite

Each row is one comparison measured by an existing script's `measure` function (bench.autoencoder,
bench.train_step, bench.diffusion): both sides get identical weights, compile and warm-up are excluded, and the
repeats are interleaved (ours, reference, ours, ...) so load drifts hit both alike; the median is reported.
Each row of the `cpu` and `accelerator` scales runs in its own child process, so its peak memory is its own and
a crash or a time-out costs that row only (recorded as "error" / "skipped"). The `smoke` scale runs all its rows
in one child: a child per row would spend most of the minute importing jax, torch and diffusers again.
See bench/README.md for the row lists, the time plan and how results.md goes into docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

SCHEMA_VERSION = 1
ROW_MARK = "@@bench.suite row "
# Dense peak FLOP/s by accelerator kind (substring of jax's device_kind, lower case) and dtype. None: unknown.
# float32 is the TF32 tensor-core peak: XLA and cuDNN run float32 convs and dots in TF32 by default on these chips
# (an H200 ran the 4.8 TFLOP float32 f32c32 512² encode+decode at 267 TFLOP/s, 4x the 67 TFLOP/s of plain fp32).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100": {"bfloat16": 989e12, "float32": 495e12},
    "h200": {"bfloat16": 989e12, "float32": 495e12},  # same SXM compute as H100; NVIDIA's dense, no-sparsity figures
    "a100": {"bfloat16": 312e12, "float32": 156e12},
}
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One comparison: which measuring function, its arguments, and how long it may take (seconds)."""

    name: str
    kind: str  # "autoencoder encode+decode" | "train step" | "uvit train step" | "uvit sample step"
    fn: str  # "autoencoder" | "train_step" | "uvit"
    model: str
    resolution: int
    dtype: str
    batch: int
    budget_s: float
    extra: dict = dataclasses.field(default_factory=dict)


def _ae(model: str, res: int, dtype: str, budget: float, batch: int = 1, compile_: bool = False) -> Spec:
    short = model.removeprefix("dc-ae-").removesuffix("-in-1.0")
    tag = "+torch.compile" if compile_ else ""
    return Spec(
        f"ae {short} {res} {dtype}{tag}",
        "autoencoder encode+decode",
        "autoencoder",
        model,
        res,
        dtype,
        batch,
        budget,
        {"torch_compile": compile_},
    )


def _train(model: str, res: int, batch: int, phase: int, budget: float, dtype: str = "float32") -> Spec:
    short = model.removeprefix("dc-ae-").removesuffix("-in-1.0")
    return Spec(
        f"train p{phase} {short} {res}" + ("" if dtype == "float32" else f" {dtype}"),
        "train step",
        "train_step",
        model,
        res,
        dtype,
        batch,
        budget,
        {"phase": phase},
    )


def _uvit(
    model: str,
    batch: int,
    dtype: str,
    budget: float,
    resolution: int = 512,
    reference: bool = True,
    steps: int = 1,
    remat: str = "none",
) -> Spec:
    # One child measures train and sample steps; it yields two rows ("... train", "... sample"). The latents are
    # those of `resolution`² images (smoke: 128², 64 instead of 1024 SD-VAE tokens). `reference=False` measures
    # DC-AE-f64 latents only (a batch the SD-VAE step would not fit or take too long at): a utilisation row.
    # `steps`: steps timed back to back per repeat (bench.diffusion._timed), the rate a training loop sees. `remat`:
    # the blocks' recomputation policy (FLOPs stay the model's, so the row's utilisation is model FLOP utilisation).
    res = "" if resolution == 512 else f" {resolution}"
    name = f"uvit {model}{res} {dtype}" + ("" if reference else f" b{batch} f64 only")
    name += "" if remat == "none" else f" remat {remat}"
    extra = {"reference": reference, "steps": steps, "remat": remat}
    return Spec(name, "uvit", "uvit", model, resolution, dtype, batch, budget, extra)


def _hires(
    model: str, height: int, width: int, dtype: str, budget: float, tile=512, overlap=64, untiled=True, repeats=0
):
    # One child decodes one latent four ways; it yields two rows ("... tiled", "... sharded").
    short = model.removeprefix("dc-ae-").removesuffix("-1.0")
    return Spec(
        f"hires {short} {width}x{height} {dtype}",
        "high-res decode",
        "highres",
        model,
        height,
        dtype,
        1,
        budget,
        {"width": width, "tile": tile, "overlap": overlap, "untiled": untiled, "repeats": repeats},
    )


def plan(scale: str, gpu: bool) -> list[Spec]:
    """The rows of a scale in priority order: when the time budget runs short the last ones are skipped."""
    if scale == "smoke":
        return [
            _ae("tiny", 32, "float32", 30),
            _train("tiny", 32, 2, 1, 30),
            _train("tiny", 32, 2, 3, 30, "bfloat16"),
            _uvit("uvit-tiny", 2, "float32", 30, resolution=128),
            _uvit("uvit-tiny", 4, "float32", 30, resolution=128, reference=False, steps=3, remat="full"),
            _hires("tiny", 96, 136, "float32", 30, tile=64, overlap=16),
        ]
    if scale == "cpu":  # one call of the 512² encode+decode is ~26 s on 2 cores: 1 warm-up + 3 repeats per side
        return [
            # Row budgets allow a machine half as fast as the 2-core Xeon/EPYC these were planned on.
            _ae("dc-ae-f32c32-in-1.0", 512, "float32", 600),
            _train("dc-ae-f32c32-in-1.0", 256, 1, 1, 600),
            _uvit("uvit-s", 1, "float32", 240),
            _train("dc-ae-f32c32-in-1.0", 128, 1, 2, 240),
            _train("dc-ae-f32c32-in-1.0", 128, 1, 3, 300),
            _hires("dc-ae-f32c32-sana-1.0", 512, 512, "float32", 300, tile=256, overlap=32, repeats=1),
        ]
    # accelerator: planned for 8 minutes on one H200 (see bench/README.md); the order below is the drop order.
    # Row limits are generous (a row killed at its limit measures nothing) and the suite's 480 s budget caps the
    # total. Measured on an H200 (2026-12-04): rows 1-7 took 31-45 s each (torch.compile 30 s), train p1 74 s,
    # uvit-h 170 s (four UViT-H programs to compile), hires 4K 79 s: the budget ends after the hires row.
    rows = [
        _ae("dc-ae-f32c32-in-1.0", 512, "bfloat16", 120),
        _ae("dc-ae-f32c32-in-1.0", 512, "bfloat16", 180, compile_=True),  # a target of issue 17: >= 1.0x
        _ae("dc-ae-f64c128-in-1.0", 512, "bfloat16", 120),
        _ae("dc-ae-f128c512-in-1.0", 512, "bfloat16", 150),
        _train("dc-ae-f32c32-in-1.0", 512, 8, 1, 180, "bfloat16"),
        _uvit("uvit-h", 32, "bfloat16", 180, steps=10),
        _hires("dc-ae-f32c32-sana-1.0", 2160, 3840, "bfloat16", 150),
        # Issue 17's UViT-H utilisation target at a batch that fills the GPU: 2112 tokens a step (batch 32 above)
        # ran at 18% of the H200's peak.
        _uvit("uvit-h", 256, "bfloat16", 180, reference=False, steps=5),
        # The same with the trainer's default per-block remat (configs/uvit.py): what the recomputation costs.
        _uvit("uvit-h", 256, "bfloat16", 180, reference=False, steps=5, remat="full"),
        _ae("dc-ae-f32c32-in-1.0", 1024, "bfloat16", 120),
        _ae("dc-ae-f32c32-in-1.0", 512, "float32", 120),
        _train("dc-ae-f64c128-in-1.0", 512, 8, 2, 180, "bfloat16"),
        _train("dc-ae-f64c128-in-1.0", 512, 8, 3, 180, "bfloat16"),
        _ae("dc-ae-f64c128-in-1.0", 2048, "bfloat16", 150),
        _ae("dc-ae-f128c512-in-1.0", 2048, "bfloat16", 150),
        _hires("dc-ae-f32c32-sana-1.0", 2048, 2048, "bfloat16", 150),
        _hires("dc-ae-f32c32-sana-1.0", 4096, 4096, "bfloat16", 180),
        # The rest of the autoencoder grid (3 models x 512² / 1024² / 2048² x fp32 / bf16): beyond 8 minutes, run
        # with a larger --budget or --only.
        *[
            _ae(f"dc-ae-{m}-in-1.0", res, dt, 150)
            for m, res, dt in [
                ("f64c128", 1024, "bfloat16"),
                ("f128c512", 1024, "bfloat16"),
                ("f32c32", 2048, "bfloat16"),
                ("f64c128", 512, "float32"),
                ("f128c512", 512, "float32"),
                ("f32c32", 1024, "float32"),
                ("f64c128", 1024, "float32"),
                ("f128c512", 1024, "float32"),
                ("f32c32", 2048, "float32"),
                ("f64c128", 2048, "float32"),
                ("f128c512", 2048, "float32"),
            ]
        ],
    ]
    if not gpu:  # torch.compile rows only where torch has a GPU; the rest still run (slowly) for a dry run
        rows = [r for r in rows if not r.extra.get("torch_compile")]
    return rows


# ------------------------------------------------------------------------------------------------------------
# Machine description.


def machine() -> dict[str, Any]:
    """Processor model and vector extensions (every result carries them: XLA's CPU speed depends on both)."""
    from dcae_jax.runtime import compute

    info = compute.cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown"
    flags = set(info.get("flags", "").split())
    mem_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    family, model = info.get("cpu family"), info.get("model")
    return {
        "processor": name,
        # Two processors can share a model name ("Intel(R) Xeon(R) Processor"); x86's family/model numbers tell.
        "processor_id": f"family {family} model {model}" if family and model else None,
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "accelerator": None,  # filled in from the child's jax device kind
        # How our CPU conv kernel gradients ran (compute.conv_kernel_grad: x86 or not, or $DCAE_JAX_CONV_KERNEL_GRAD).
        "conv_kernel_grad": compute.conv_kernel_grad(),
        # How our wide float32 3x3 convs ran on the CPU (compute.conv3x3: $DCAE_JAX_CONV3X3, Winograd by default).
        "conv3x3": compute.conv3x3(),
    }


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "torch", "diffusers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------------------------
# Child side: runs specs, prints one marked JSON line per row.


def _peak_memory() -> dict[str, int | None]:
    """Memory of this child so far: torch's peak allocation on a GPU ("reference"), the JAX device's
    `peak_bytes_in_use` on an accelerator ("device_peak_bytes": it includes XLA's compile-time autotuning scratch
    and every program of the child, so rows report our compiled footprint instead, from the measuring function)
    and the process's peak RSS everywhere (on a CPU the only measured number: both frameworks share the heap)."""
    import resource

    import jax

    out: dict[str, int | None] = {"dcae_jax": None, "reference": None, "device_peak_bytes": None}
    if jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            out["reference"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    out["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return out


def _row(
    spec: Spec,
    kind: str,
    ours: float,
    ref: float | None,
    flops: float | None,
    ref_flops=None,
    memory: dict | None = None,
    **kw,
) -> dict:
    """One result row: medians, their ratio, FLOP rate, fraction of the device's peak where known, memory
    (`memory` overrides: our program's compiled footprint, and the reference's where it is a JAX program too)."""
    import jax

    kind_name = jax.devices()[0].device_kind
    ok = [v for v in (ours, ref) if v is not None]
    row = {
        "name": spec.name,
        "kind": kind,
        "model": spec.model,
        "resolution": spec.resolution,
        "dtype": spec.dtype,
        "batch": spec.batch,
        "status": "ok" if all(math.isfinite(v) and v > 0 for v in ok) else "error",
        "reason": None if all(math.isfinite(v) and v > 0 for v in ok) else "a time is not a positive number",
        "seconds": {"dcae_jax": ours, "reference": ref},
        "ratio": (ref / ours) if ref is not None else None,
        "flops": flops if flops and math.isfinite(flops) else None,
        "reference_flops": ref_flops,
        "device": kind_name,
        "memory_bytes": {**_peak_memory(), **{k: v for k, v in (memory or {}).items() if v is not None}},
    }
    row["flops_per_s"] = row["flops"] / ours if row["flops"] else None
    peak = next((v for k, v in PEAK_FLOPS.items() if k in kind_name.lower()), {}).get(spec.dtype)
    row["fraction_of_peak"] = row["flops_per_s"] / peak if (peak and row["flops_per_s"]) else None
    row.update(kw)
    return row


def run_spec(spec: Spec, repeats: int, warmup: int = 1) -> list[dict]:
    """Measures one spec with the owning script's `measure` and turns the result into rows. `warmup` calls per
    side come first (the first compiles); UViT always warms up once (bench.diffusion's choice)."""
    if spec.fn == "autoencoder":
        from bench import autoencoder

        r = autoencoder.measure(
            spec.model, spec.resolution, spec.batch, repeats, spec.dtype, warmup=warmup, **spec.extra
        )
        m = r["median_s"]
        ref_name = "diffusers torch.compile" if spec.extra.get("torch_compile") else "diffusers eager"
        return [
            _row(spec, spec.kind, m["dcae_jax"], m[ref_name], r["flops"], memory=r["memory_bytes"], reference=ref_name)
        ]
    if spec.fn == "train_step":
        from bench import train_step

        r = train_step.measure(
            spec.model, spec.resolution, spec.batch, repeats, warmup=warmup, dtype=spec.dtype, **spec.extra
        )
        m = r["median_s"]
        ref = train_step.REFERENCE
        return [_row(spec, spec.kind, m["dcae_jax"], m[ref], r["flops"], memory=r["memory_bytes"], reference=ref)]
    if spec.fn == "uvit":
        import statistics

        from bench import diffusion

        scale = spec.resolution / 512  # diffusion.LATENTS are those of 512² images
        lat = {name: (name, (int(h * scale), int(w * scale), c), patch) for name, (h, w, c), patch in diffusion.LATENTS}
        ours, ref = "DC-AE-f64 p1", "SD-VAE-f8 p2"
        with_ref = spec.extra.get("reference", True)
        spaces = (lat[ref], lat[ours]) if with_ref else (lat[ours],)
        steps = spec.extra.get("steps", 1)
        remat = spec.extra.get("remat", "none")
        r = diffusion.measure(spec.model, spec.batch, repeats, spaces, spec.dtype, steps, remat)
        rows = []
        for step in ("train", "sample"):
            s = dataclasses.replace(spec, name=f"{spec.name} {step}")
            theirs = r.get(ref, {})
            rows.append(
                _row(
                    s,
                    f"uvit {step} step",
                    statistics.median(r[ours][f"{step}_s"]),
                    statistics.median(theirs[f"{step}_s"]) if with_ref else None,
                    r[ours][f"{step}_flops"],
                    theirs.get(f"{step}_flops"),
                    memory={"dcae_jax": r[ours][f"{step}_bytes"], "reference": theirs.get(f"{step}_bytes")},
                    reference=f"same UViT on {ref} latents (ours: {ours})" if with_ref else None,
                    steps_per_timing={
                        "dcae_jax": r[ours]["steps"][step],
                        "reference": theirs.get("steps", {}).get(step),
                    },
                    remat=remat,
                    executed_flops=r[ours].get(f"{step}_executed_flops"),
                )
            )
        return rows
    if spec.fn == "highres":
        from bench import highres

        e = spec.extra
        r = highres.measure(
            spec.model,
            spec.resolution,
            e["width"],
            spec.dtype,
            e["tile"],
            e["overlap"],
            e.get("repeats") or repeats,  # a row may ask for fewer (a slow CPU decode)
            warmup,
            e["untiled"],
        )
        m, ref = r["median_s"], "diffusers tiled"
        rows = []
        for ours, label in (("dcae_jax tiled", "tiled"), ("dcae_jax sharded", "sharded (exact)")):
            s = dataclasses.replace(spec, name=f"{spec.name} {label}")
            if ours not in m or ref not in m:
                why = r["status"].get(ours) if ours not in m else r["status"].get(ref)
                rows.append(_error_row(s, "error", f"{why}"))
                continue
            rows.append(
                _row(
                    s,
                    spec.kind,
                    m[ours],
                    m[ref],
                    r["flops"][ours],
                    memory={"dcae_jax": r["memory_bytes"].get(ours)},
                    reference=f"{ref} (tile {e['tile']}, overlap {e['overlap']})",
                    width=e["width"],
                    highres={
                        "method": ours,
                        "seconds": m,
                        "status": r["status"],
                        "errors_vs_untiled": r["errors"],
                        "method_memory_bytes": r["memory_bytes"],
                        "devices": r["devices"],
                        "latent_shape": r["latent_shape"],
                    },
                )
            )
        return rows
    raise ValueError(f"unknown measuring function {spec.fn!r}")


def child(specs_json: str, repeats: int, warmup: int = 1) -> None:
    """Entry point of a child process: measure each spec, print one marked JSON line per row."""
    from dcae_jax.runtime import cli, compute

    cli.prepare_process()  # before jax starts: no probe for an absent TPU; the host allocator policy
    for d in json.loads(specs_json):
        spec = Spec(**d)
        t0 = time.perf_counter()
        try:
            rows = run_spec(spec, repeats, warmup)
        except Exception as err:
            rows = [_error_row(spec, "error", f"{type(err).__name__}: {err}"[:500])]
        for row in rows:
            row["spec"], row["row_wall_s"] = spec.name, time.perf_counter() - t0
            row["host_malloc"] = compute.host_malloc()  # both frameworks ran under it (one process)
            print(ROW_MARK + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------------------
# Parent side.


def _error_row(spec: Spec, status: str, reason: str) -> dict:
    return {
        "name": spec.name,
        "kind": spec.kind,
        "model": spec.model,
        "resolution": spec.resolution,
        "dtype": spec.dtype,
        "batch": spec.batch,
        "status": status,
        "reason": reason,
        "seconds": {"dcae_jax": None, "reference": None},
        "ratio": None,
        "flops": None,
        "reference_flops": None,
        "flops_per_s": None,
        "fraction_of_peak": None,
        "device": None,
        "memory_bytes": {"dcae_jax": None, "reference": None, "device_peak_bytes": None, "process_peak_rss": None},
        "reference": None,
        "spec": spec.name,
        "row_wall_s": None,
    }


def run_child(specs: list[Spec], repeats: int, timeout: float, warmup: int = 1) -> tuple[list[dict], str]:
    """Runs specs in one child process; returns its rows (missing ones as errors) and its stderr tail."""
    payload = json.dumps([dataclasses.asdict(s) for s in specs])
    code = f"import sys; from bench import suite; suite.child(sys.argv[1], {int(repeats)}, {int(warmup)})"
    # Both frameworks share the device: JAX must not grab 75% of its memory up front.
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, payload], capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {timeout:.0f} s", None
    rows = [json.loads(line[len(ROW_MARK) :]) for line in out.splitlines() if line.startswith(ROW_MARK)]
    done = {r.get("spec") for r in rows}
    for s in specs:
        if s.name not in done:
            status = "skipped" if rc is None else "error"
            why = err if rc is None else f"child exited {rc}: " + " | ".join(err.strip().splitlines()[-3:])
            rows.append(_error_row(s, status, why[-500:]))
    for r in rows:
        if r.get("row_wall_s") is None:
            r["row_wall_s"] = time.perf_counter() - t0
    return rows, err


def _fmt(v: float | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    return "–" if v is None else format(v * scale, fmt)


def markdown(result: dict) -> str:
    """A results section to paste (generated, not edited) into docs/performance.md."""
    m, v = result["machine"], result["versions"]
    lines = [
        f"### Benchmark suite, scale `{result['scale']}`, {result['date']}"
        + ("" if result.get("complete", True) else " (incomplete: written after each row, the run did not finish)"),
        "",
        f"Machine: {m['processor']}"
        + (f" [{m['processor_id']}]" if m.get("processor_id") else "")
        + f" ({', '.join(m['vector_extensions']) or 'no vector extensions listed'}), "
        f"{m['cores']} cores, {m['memory_gb']} GiB; accelerator: {m['accelerator'] or 'none'}; "
        f"CPU 3x3 convs: {m.get('conv3x3') or 'not recorded'}; "
        f"CPU conv kernel gradients: {m.get('conv_kernel_grad') or 'not recorded'}; "
        f"host allocator: {m.get('host_malloc') or 'not recorded'}. "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
        f"Command: `{shlex.join(result['command'])}`",
        "",
        "| row | kind | model | res | dtype | batch | dcae_jax ms | reference ms | ratio (ref/ours) | GFLOP | "
        "TFLOP/s | of peak | memory GiB (ours / ref / process RSS) | status |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    gib = 1 / 1024**3
    for r in result["rows"]:
        s, mem = r["seconds"], r["memory_bytes"]
        mems = " / ".join(_fmt(mem.get(k), gib, ".2f") for k in ("dcae_jax", "reference", "process_peak_rss"))
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['reason'] or '')[:80]}"
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['model']} | {r['resolution']} | {r['dtype']} | {r['batch']} | "
            f"{_fmt(s['dcae_jax'], 1e3)} | {_fmt(s['reference'], 1e3)} | {_fmt(r['ratio'], 1, '.2f')} | "
            f"{_fmt(r['flops'], 1e-9, '.2f')} | {_fmt(r['flops_per_s'], 1e-12, '.3f')} | "
            f"{_fmt(r['fraction_of_peak'], 100, '.1f') + ('%' if r['fraction_of_peak'] else '')} | {mems} | "
            f"{status.replace('|', '/')} |"
        )
    lines.append("")
    lines.append(
        "ratio = reference time / dcae_jax time (> 1: dcae_jax faster). UViT rows: reference = the same UViT on "
        "SD-VAE-f8 p2 latents, ours = DC-AE-f64 p1 latents. High-res rows: reference = diffusers with "
        "`enable_tiling()`. GFLOP: XLA's count of the lowered program (cuDNN attention counted as XLA's). Memory: "
        "ours = XLA's compiled footprint of our largest program (high-res: per tile / per device); ref = torch's "
        "peak allocation on a GPU (none on a CPU, where one process holds both sides) or, for UViT rows, the "
        "SD-VAE program's footprint; process RSS = the child's peak."
    )
    lines += _highres_markdown(result["rows"])
    return "\n".join(lines) + "\n"


def _highres_markdown(rows: list[dict]) -> list[str]:
    """Per high-res spec: each decode method's time, memory and error against the exact untiled decode."""
    seen, out = set(), []
    for r in rows:
        h = r.get("highres")
        if not h or r["spec"] in seen:
            continue
        seen.add(r["spec"])
        if not out:
            out += [
                "",
                "High-resolution decode (one latent, random weights; error vs the exact untiled decode in 8-bit "
                "levels; memory: torch's peak on a GPU, ours XLA's compiled footprint per device / per tile, "
                "untiled compiled even when not run):",
                "",
                "| spec | method | ms | memory GiB | max error | mean error | status |",
                "|---|---|---:|---:|---:|---:|---|",
            ]
        for method in ("diffusers tiled", "dcae_jax tiled", "dcae_jax sharded", "dcae_jax untiled"):
            err = h["errors_vs_untiled"].get(method) or {}
            status = h["status"].get(method, "not run")
            out.append(
                f"| {r['spec']} | {method} | {_fmt(h['seconds'].get(method), 1e3)} | "
                f"{_fmt(h['method_memory_bytes'].get(method), 1 / 1024**3, '.2f')} | "
                f"{_fmt(err.get('max_8bit'), 1, '.2f')} | {_fmt(err.get('mean_8bit'), 1, '.3f')} | "
                f"{status.replace('|', '/')[:80]} |"
            )
    return out


def machine_tag(mach: dict[str, Any]) -> str:
    """What a docs block is measured on: the accelerator kind, else the processor (its model name and id)."""
    if mach.get("accelerator"):
        return mach["accelerator"]
    return mach["processor"] + (f" ({mach['processor_id']})" if mach.get("processor_id") else "")


def docs_markers(scale: str, only: str = "", machine: str = "") -> tuple[str, str]:
    """The markers around the generated block of one command: its scale, its --only filter if any (a rerun of
    some rows gets a block of its own and leaves the full run's block as it was), and the machine it ran on (each
    processor or accelerator kind keeps its own block: speed ratios move with the processor)."""
    tag = f"scale={scale}" + (f" only={only!r}" if only else "") + (f" machine={machine!r}" if machine else "")
    return f"<!-- bench.suite {tag}: generated by `python -m bench.suite --docs`, do not edit -->", (
        f"<!-- /bench.suite {tag} -->"
    )


def update_docs(path: str, scale: str, md: str, only: str = "", machine: str = "") -> None:
    """Replaces the generated block of (`scale`, `only`, `machine`) in the markdown file at `path` (a new one goes
    after the last block of the same scale, else at the end)."""
    with open(path) as f:
        text = f.read()
    begin, end = docs_markers(scale, only, machine)
    block = f"{begin}\n{md.rstrip()}\n{end}"
    # This machine's block, else a block with no machine (a placeholder: "not yet generated") is replaced.
    for b, e in ((begin, end), docs_markers(scale, only)):
        if b in text and e in text.split(b, 1)[1]:
            head, rest = text.split(b, 1)
            text = head + block + rest.split(e, 1)[1]
            break
    else:
        text = _insert_block(text, scale, block)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _insert_block(text: str, scale: str, block: str) -> str:
    """`block` after the last generated block of `scale` (one scale's machines stay together), else at the end."""
    if (last := text.rfind(f"<!-- /bench.suite scale={scale} ")) >= 0:
        cut = text.index("-->", last) + len("-->")
        return text[:cut] + "\n\n" + block + text[cut:]
    return text.rstrip() + "\n\n" + block + "\n"


def _write(path: str, text: str) -> None:
    """Writes a file atomically (a reader never sees half a results.json)."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def _default_backend_is_gpu() -> bool:
    """Asks a throw-away child (the parent stays free of jax, so children own the device)."""
    code = "from dcae_jax.runtime import cli; cli.skip_absent_tpu(); import jax; print(jax.default_backend())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return False
    return out.stdout.strip().endswith("gpu")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", required=True, help="smoke | cpu | accelerator")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--only", default="", help="run only rows whose name contains this")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default: 2 / 3 / 5 by scale)")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default: 420 / 2400 / 480 by scale)")
    p.add_argument("--docs", default="", help="also put the table into this markdown file (docs/performance.md)")
    args = p.parse_args(argv)
    if args.docs and not os.path.isfile(args.docs):
        print(f"bench.suite: --docs {args.docs!r} is not a file", file=sys.stderr)
        return 2
    if args.scale not in ("smoke", "cpu", "accelerator"):
        print(f"bench.suite: --scale must be smoke, cpu or accelerator, not {args.scale!r}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        print(f"bench.suite: cannot write to --out {args.out!r}: {err.strerror or err}", file=sys.stderr)
        return 2
    repeats = args.repeats or {"smoke": 2, "cpu": 3, "accelerator": 5}[args.scale]
    warmup = 2 if args.scale == "accelerator" else 1  # on CPU a warm-up call of a released model costs ~25 s
    # smoke's target is < 60 s, but its limit is 420 s: a loaded CI machine (its tests run two at a time on 2 slow
    # cores) took over 180 s, and a row it cuts fails the schema test.
    budget = args.budget or {"smoke": 420.0, "cpu": 2400.0, "accelerator": 480.0}[args.scale]
    start = time.perf_counter()
    gpu = args.scale == "accelerator" and _default_backend_is_gpu()
    if args.scale == "accelerator" and not gpu:
        print("bench.suite: no GPU backend; the accelerator rows will run (slowly) on this device", file=sys.stderr)
    specs = [s for s in plan(args.scale, gpu) if args.only in s.name]
    if not specs:
        print(f"bench.suite: no row of scale {args.scale!r} contains {args.only!r}", file=sys.stderr)
        return 2

    json_path, md_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "results.md")

    def result_of(rows: list[dict], complete: bool) -> dict:
        mach = machine()
        mach["accelerator"] = next((r["device"] for r in rows if r.get("device") and r["device"] != "cpu"), None)
        mach["host_malloc"] = next((r["host_malloc"] for r in rows if r.get("host_malloc")), None)
        return {
            "schema_version": SCHEMA_VERSION,
            "command": [os.path.basename(sys.executable), "-m", "bench.suite", *argv],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "scale": args.scale,
            "repeats": repeats,
            "wall_s": round(time.perf_counter() - start, 1),
            # False while rows are still running: a run cut short (a lease that ends, a killed job) keeps the
            # rows it finished, written after each one.
            "complete": complete,
            "machine": mach,
            "versions": versions(),
            "rows": rows,
        }

    rows: list[dict] = []
    if args.scale == "smoke":  # one child for all: a child per row would spend the minute on imports
        rows, _ = run_child(specs, repeats, timeout=budget, warmup=warmup)
    else:
        for s in specs:
            left = budget - (time.perf_counter() - start)
            if left < min(s.budget_s, 30):
                rows.append(_error_row(s, "skipped", f"suite time budget spent ({budget:.0f} s)"))
                continue
            new, _ = run_child([s], repeats, timeout=min(s.budget_s, left), warmup=warmup)
            rows += new
            for r in new:
                print(f"  {r['name']}: {r['status']} ({r['row_wall_s']:.0f} s)", file=sys.stderr)
            partial = result_of(rows, complete=False)
            _write(json_path, json.dumps(partial, indent=1))
            _write(md_path, markdown(partial))

    result = result_of(rows, complete=True)
    mach = result["machine"]
    _write(json_path, json.dumps(result, indent=1))
    md = markdown(result)
    _write(md_path, md)
    print(md)
    for r in rows:
        if r["flops_per_s"]:
            peak = f", {r['fraction_of_peak']:.1%} of peak" if r["fraction_of_peak"] else ""
            print(f"{r['name']}: {r['flops_per_s'] / 1e12:.3f} TFLOP/s achieved{peak}")
    ok = sum(r["status"] == "ok" for r in rows)
    wrote = f"{json_path} and {md_path}"
    if args.docs:
        update_docs(args.docs, args.scale, md, args.only, machine_tag(mach))
        wrote = f"{json_path}, {md_path} and the scale-{args.scale} table of {args.docs}"
    print(f"bench.suite: {ok}/{len(rows)} rows ok in {result['wall_s']:.0f} s; wrote {wrote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
