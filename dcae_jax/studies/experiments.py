"""The DC-AE paper's three findings at small scale (the library of `python -m dcae_jax.reproduce`).


`--data` holds `train/` (training) and `val/` (held-out evaluation) image folders. Runs from anywhere (its
training configs come from `dcae_jax.training.config`). Every training run goes through the
project's trainer (`dcae_jax.autoencoder.train.train_and_evaluate`) in `<out>/runs/<name>`; finished runs are skipped,
so re-running the command resumes. Results go to `<out>/results.json`, tables to `<out>/report.md`,
figures and crops to `<out>/figures/`.

1. Residual autoencoding: the same DC-AE with and without its shortcuts (`DCAEConfig.residual`), equal
   parameters, data, steps, init and seed, at two compression factors; held-out PSNR/SSIM per seed.
2. Generalization penalty: models trained at R are evaluated at R, 2R, 4R; phase 2 (latent-adjacent layers
   only) runs at 2R and they are evaluated again, next to a low-compression contrast and a control that
   trains the same layers for the same steps at R. Compiled memory of phase 2 vs full training at 2R.
3. Phase 3: decoder-head GAN refinement vs no refinement vs full-model GAN training, with bit-identical
   latents checked for the head-only arms; judged on LPIPS and rFID (the paper's Fig. 5), with PSNR/SSIM,
   a high-frequency spectral error and crops beside them.

Training follows the paper's losses: L1 + LPIPS in every phase, plus the PatchGAN in phase 3 (`Scale`
says which LPIPS network and why). Every table has PSNR, SSIM, LPIPS (VGG16: a network other than the
training loss's) and rFID (genuine FID Inception, several crops per held-out photo; `measure.rfid_views`).

Compression factors are chosen relative to the training resolution: at R=64, f8 and f16 give the 8x8 and
4x4 latent grids that the paper's f32 and f64 give at 256 ("f32-equivalent", "f64-equivalent").
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dcae_jax.autoencoder.model import DCAEConfig, count_params, init_variables, tiny_config
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.runtime.paths import save_figure, write_text_atomic
from dcae_jax.studies import measure
from dcae_jax.training import config as common


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model sizes and budgets of one study run. `cpu` (the default) takes about 1 h 20 min on 2 shared CPU cores."""

    resolution: int  # R: phase 1 and phase 3 train here
    batch: int
    factors: tuple[tuple[int, int], ...]  # (spatial factor, latent channels) of the high-compression models
    contrast: tuple[int, int]  # the low-compression model of experiment 2
    base_width: int
    max_width: int
    head_dim: int
    steps1: int
    steps2: int
    batch2: int
    steps3: int
    seeds: int  # experiment 1 (and 3) repeats with seeds 0..seeds-1
    seeds3: int
    eval_images: int  # 0: the whole held-out split
    phase2_control: bool = True
    head_l1_arm: bool = True
    crops: int = 4
    # Training loss: L1 + lpips_weight * LPIPS(lpips_net) in every phase (phase 3 adds the GAN), as the paper's
    # recipe; weight 1.0 is the LDM/taming default. AlexNet, not VGG16: its LPIPS gradient costs 0.018 s per
    # 64x64 batch of 8 on 2 CPU cores vs 0.39 s for VGG16, which would more than double the study's time.
    lpips_weight: float = 1.0
    lpips_net: str = "alex"
    # rFID views: `rfid_views` crops per held-out photo at the evaluation resolution (measure.rfid_views).
    rfid_views: int = 3
    rfid_zoom: float = 1.5


SCALES: dict[str, Scale] = {
    # Seconds: CI smoke test (exercises every experiment, numbers meaningless).
    "smoke": Scale(
        resolution=32,
        batch=2,
        factors=((4, 4),),
        contrast=(2, 4),
        base_width=8,
        max_width=16,
        head_dim=8,
        steps1=2,
        steps2=2,
        batch2=2,
        steps3=2,
        seeds=1,
        seeds3=1,
        eval_images=3,
        phase2_control=False,
        head_l1_arm=False,
        crops=2,
        rfid_views=1,
    ),
    # About an hour on a 2-core CPU: the quickstart-sized DC-AE at 64 px.
    "cpu": Scale(
        resolution=64,
        batch=8,
        factors=((8, 4), (16, 16)),
        contrast=(4, 4),
        base_width=16,
        max_width=128,
        head_dim=16,
        steps1=400,
        steps2=200,
        batch2=4,
        steps3=200,
        seeds=2,
        seeds3=2,
        eval_images=0,
    ),
    # One accelerator, a few hours: the paper's factors at 256 px with wider stages. Not run by us yet.
    "gpu": Scale(
        resolution=256,
        batch=32,
        factors=((32, 32), (64, 128)),
        contrast=(8, 4),
        base_width=64,
        max_width=512,
        head_dim=32,
        steps1=20_000,
        steps2=5_000,
        batch2=8,
        steps3=5_000,
        seeds=3,
        seeds3=3,
        eval_images=0,
    ),
}

# Penalties below this are within seed-to-seed noise (experiment 1's spread); no recovery ratio is given.
MIN_PENALTY_DB = 0.1

# Quickstart learning rates (weight decay 0): the reference's 6.4e-5 needs far more steps than we have.
LEARNING_RATES = {1: 1e-3, 2: 3e-4, 3: 3e-4}


def model_config(scale: Scale, factor: int, latent_channels: int, residual: bool = True) -> DCAEConfig:
    """The quickstart family at any factor: ResBlock stages up to stage 2, EfficientViT stages after."""
    n = int(math.log2(factor)) + 1
    widths = tuple(min(scale.base_width * 2**i, scale.max_width) for i in range(n))
    evit = tuple(i >= 3 for i in range(n))
    return tiny_config(
        latent_channels=latent_channels,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=(0,) + (1,) * (n - 1),
        decoder_layers_per_block=(0,) + (1,) * (n - 1),
        encoder_block_types=tuple("EfficientViTBlock" if e else "ResBlock" for e in evit),
        decoder_block_types=tuple("EfficientViTBlock" if e else "ResBlock" for e in evit),
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        decoder_norm_types=tuple("rms_norm" if e else "batch_norm" for e in evit),
        decoder_act_fns=tuple("silu" if e else "relu" for e in evit),
        attention_head_dim=scale.head_dim,
        residual=residual,
        name=f"f{factor}c{latent_channels}" + ("" if residual else "-plain"),
    )


def train_config(
    scale: Scale,
    cfg: DCAEConfig,
    data: str,
    *,
    phase: int,
    steps: int,
    seed: int,
    init_from: str | pathlib.Path,
    resolution: int | None = None,
    batch: int | None = None,
    full_model: bool = False,
    gan: bool | None = None,
) -> ml_collections.ConfigDict:
    """A trainer config from `dcae_jax.training.config`: phase layer sets, then the study's budget and data.

    `full_model` trains every layer (the paper's full-model GAN baseline); `gan=False` turns phase 3's
    discriminator off (the head-only L1 control).
    """
    from dcae_jax.metrics import weights

    c = common.base_config()
    c.eval_lpips = c.eval_rfid = False  # the study measures LPIPS / rFID itself (studies.measure), on its own crops
    c.loss.lpips_weight = scale.lpips_weight
    c.loss.lpips_weights = weights.resolve(f"lpips_{scale.lpips_net}") if scale.lpips_weight else ""
    c.model.variant = "tiny"
    c.model.overrides = {k: _listify(v) for k, v in cfg.to_dict().items()}
    common.apply_phase(c, phase, num_stages=cfg.num_stages)
    if full_model:
        c.trainable = common.trainable_rules(1, cfg.num_stages)
    c.optim.learning_rate, c.optim.weight_decay = LEARNING_RATES[phase], 0.0
    if phase == 3:
        c.disc.base_features, c.disc.num_layers, c.disc.learning_rate = 16, 2, 2e-4
        if gan is False:
            c.disc.enabled, c.loss.gan_weight = False, 0.0
    c.seed = seed
    c.init_from = str(pathlib.Path(init_from).absolute()) if init_from else ""
    c.resolution = c.eval_resolution = resolution or scale.resolution
    c.global_batch_size = batch or scale.batch
    c.eval_batch_size = 10
    c.num_steps = steps
    c.log_every = max(1, min(50, steps))
    c.checkpoint_every = steps  # one checkpoint at the end: the study resumes per run, not mid-run
    c.keep_checkpoints = 1
    root = str(pathlib.Path(data).absolute())
    c.data.train, c.data.train_split = f"folder:{root}", "train"
    c.data.eval, c.data.eval_split = f"folder:{root}", "val"
    return c


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, tuple | list) else v


class Study:
    """Runs (or reuses) trainings under `<out>/runs` and evaluates their exports on the held-out split."""

    def __init__(self, data: str, out: pathlib.Path, scale: Scale, perceptual: measure.Perceptual):
        self.data, self.out, self.scale, self.perceptual = data, out, scale, perceptual
        self.timings: dict[str, float] = {}
        self._view_stats: dict[int, Any] = {}
        self.rfid_floor: dict[int, float] = {}

    def images(self, resolution: int) -> np.ndarray:
        return measure.eval_images(self.data, resolution, self.scale.eval_images)

    def views(self, resolution: int) -> np.ndarray:
        s = self.scale
        return measure.rfid_views(self.data, resolution, s.rfid_views, s.rfid_zoom, s.eval_images)

    def view_stats(self, resolution: int):
        """Inception statistics of the real rFID views at `resolution`, computed once (with the sampling floor)."""
        if resolution not in self._view_stats:
            self._view_stats[resolution] = self.perceptual.features(self.views(resolution))
            self.rfid_floor[resolution] = self.perceptual.rfid_floor(self.views(resolution), self.scale.rfid_views)
        return self._view_stats[resolution]

    def init_export(self, cfg: DCAEConfig, seed: int) -> pathlib.Path:
        """Random weights written as an export: the same init for residual and plain models (equal shapes),
        and no compiled init graph per run (that costs longer than the training of a small model on CPU)."""
        path = self.out / "runs" / "init" / f"{cfg.name.removesuffix('-plain')}_s{seed}"
        if not (path / "dcae_config.json").exists():
            DCAE(cfg, init_variables(cfg, seed)).save_pretrained(path)
        return path

    def train(self, name: str, config: ml_collections.ConfigDict) -> pathlib.Path:
        """One trainer run; skipped when its export exists. Returns the export directory."""
        from dcae_jax.autoencoder import train

        workdir = self.out / "runs" / name
        if not ((workdir / "eval.json").exists() and (workdir / "export").exists()):
            t0 = time.time()
            train.train_and_evaluate(config, workdir)
            self.timings[name] = time.time() - t0
            print(f"[reproduce] {name}: {config.num_steps} steps in {self.timings[name]:.0f} s", flush=True)
        return workdir / "export"

    def evaluate(self, export: pathlib.Path, resolution: int, ae=None) -> dict[str, Any]:
        """Every held-out metric of one export at `resolution`."""
        images, views, stats = self.images(resolution), None, None
        if self.perceptual.fid_weights:
            views, stats = self.views(resolution), self.view_stats(resolution)
        return measure.evaluate(ae or measure.load(export), images, self.perceptual, views, stats)

    def phase1(self, factor: int, channels: int, residual: bool, seed: int) -> pathlib.Path:
        s = self.scale
        cfg = model_config(s, factor, channels, residual)
        c = train_config(s, cfg, self.data, phase=1, steps=s.steps1, seed=seed, init_from=self.init_export(cfg, seed))
        return self.train(f"{cfg.name}_s{seed}", c)


# ----------------------------------------------------------------------------------------------
# The three experiments.


def experiment1(study: Study) -> dict[str, Any]:
    """Residual vs plain at equal parameters, for each factor and seed."""
    s = study.scale
    rows = []
    for factor, channels in s.factors:
        params = {r: count_params(init_variables(model_config(s, factor, channels, r), 0)["params"]) for r in (1, 0)}
        assert params[1] == params[0], params  # the ablation is meaningful only at equal parameter count
        for seed in range(s.seeds):
            for residual in (True, False):
                export = study.phase1(factor, channels, residual, seed)
                m = study.evaluate(export, s.resolution)
                rows.append(
                    {"factor": factor, "latent_channels": channels, "residual": residual, "seed": seed}
                    | {"params": params[1]}
                    | m
                )
    summary = []
    for factor, channels in s.factors:
        gaps = [
            _pick(rows, factor=factor, residual=True, seed=seed)["psnr"]
            - _pick(rows, factor=factor, residual=False, seed=seed)["psnr"]
            for seed in range(s.seeds)
        ]
        summary.append({"factor": factor, "latent_channels": channels, "psnr_gain_per_seed": gaps})
    return {"runs": rows, "summary": summary}


def experiment2(study: Study) -> dict[str, Any]:
    """Generalization across resolutions before/after phase 2, a low-compression contrast, and memory."""
    s = study.scale
    res = s.resolution
    eval_res = [res, 2 * res, 4 * res]
    high = 2 * res  # phase 2 resolution
    models = []
    factor, channels = s.contrast
    models.append(("contrast", factor, channels, study.phase1(factor, channels, True, 0)))
    for factor, channels in s.factors:
        models.append(("phase1", factor, channels, study.phase1(factor, channels, True, 0)))
    for factor, channels in s.factors:
        cfg = model_config(s, factor, channels)
        base = study.phase1(factor, channels, True, 0)
        c = train_config(
            s, cfg, study.data, phase=2, steps=s.steps2, seed=0, init_from=base, resolution=high, batch=s.batch2
        )
        models.append(("phase2", factor, channels, study.train(f"{cfg.name}_s0_phase2_at{high}", c)))
        if s.phase2_control:
            c = train_config(
                s, cfg, study.data, phase=2, steps=s.steps2, seed=0, init_from=base, resolution=res, batch=s.batch2
            )
            models.append(("control", factor, channels, study.train(f"{cfg.name}_s0_phase2_at{res}", c)))
    rows = []
    for kind, factor, channels, export in models:
        for r in eval_res:
            m = study.evaluate(export, r)
            m.pop("psnr_per_image")
            rows.append({"model": kind, "factor": factor, "latent_channels": channels, "eval_resolution": r} | m)
    penalties = []
    contrast_psnr = {r: _pick(rows, model="contrast", eval_resolution=r)["psnr"] for r in eval_res}
    for factor, _ in s.factors:
        for r in eval_res[1:]:
            before = {q: _pick(rows, model="phase1", factor=factor, eval_resolution=q)["psnr"] for q in (res, r)}
            after = _pick(rows, model="phase2", factor=factor, eval_resolution=r)["psnr"]
            # PSNR is not comparable across resolutions (a crop at 4R is smoother per pixel than at R), so the
            # penalty is measured against the low-compression contrast's own change from R to r.
            penalty = (contrast_psnr[r] - contrast_psnr[res]) - (before[r] - before[res])
            entry = {"factor": factor, "eval_resolution": r, "penalty_db": penalty, "phase2_gain_db": after - before[r]}
            if s.phase2_control:
                entry["control_gain_db"] = (
                    _pick(rows, model="control", factor=factor, eval_resolution=r)["psnr"] - (before[r])
                )
            penalties.append(entry)
    factor, channels = s.factors[-1]
    memory = phase_memory(s, model_config(s, factor, channels), study.data, high)
    return {"rows": rows, "penalty": penalties, "memory": memory, "phase2_resolution": high}


def phase_memory(scale: Scale, cfg: DCAEConfig, data: str, resolution: int) -> dict[str, Any]:
    """XLA's compiled memory of the full-model (phase 1) vs the phase-2 train step at `resolution`."""
    from dcae_jax.autoencoder import train

    out: dict[str, Any] = {"factor": cfg.spatial_compression_ratio, "resolution": resolution, "batch": scale.batch2}
    for phase in (1, 2):
        c = train_config(scale, cfg, data, phase=phase, steps=1, seed=0, init_from="", resolution=resolution)
        c.global_batch_size = scale.batch2
        m = train.lower_train_step(c).compile().memory_analysis()
        # Outputs alias the donated arguments, so arguments + temporaries is the step's footprint.
        out[f"phase{phase}_mib"] = (m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20
        out[f"phase{phase}_temp_mib"] = m.temp_size_in_bytes / 2**20
    out["ratio"] = out["phase2_mib"] / out["phase1_mib"]
    return out


def experiment3(study: Study) -> dict[str, Any]:
    """Head-only GAN refinement vs none vs full-model GAN, from the most compressed residual model."""
    s = study.scale
    factor, channels = s.factors[-1]
    cfg = model_config(s, factor, channels)
    base = study.phase1(factor, channels, True, 0)
    arms: dict[str, list[pathlib.Path]] = {"none": [base]}
    for seed in range(s.seeds3):
        kw = dict(phase=3, steps=s.steps3, seed=seed, init_from=base)
        if s.head_l1_arm:
            c = train_config(s, cfg, study.data, gan=False, **kw)
            arms.setdefault("head_l1", []).append(study.train(f"{cfg.name}_phase3_head_l1_s{seed}", c))
        c = train_config(s, cfg, study.data, **kw)
        arms.setdefault("head_gan", []).append(study.train(f"{cfg.name}_phase3_head_gan_s{seed}", c))
        c = train_config(s, cfg, study.data, full_model=True, **kw)
        arms.setdefault("full_gan", []).append(study.train(f"{cfg.name}_phase3_full_gan_s{seed}", c))

    images = study.images(s.resolution)
    z0 = measure.encode(measure.load(base), images)
    rows, latents, recons = [], {}, {}
    for arm, exports in arms.items():
        for seed, export in enumerate(exports):
            ae = measure.load(export)
            m = study.evaluate(export, s.resolution, ae)
            rows.append({"arm": arm, "seed": seed} | m)
            z = measure.encode(ae, images)
            latents[f"{arm}_s{seed}"] = {
                "bit_identical": bool(np.array_equal(z, z0)),
                "max_abs_diff": float(np.max(np.abs(z - z0))),
            }
            if seed == 0:
                recons[arm] = measure.reconstruct(ae, images[: s.crops])
    for key, check in latents.items():
        if key.startswith("head") and not check["bit_identical"]:
            raise AssertionError(f"phase-3 head refinement changed the latents ({key}: {check})")
    crops = _save_crops(images[: s.crops], recons, study.out / "figures" / "exp3_crops.png")
    return {"factor": factor, "latent_channels": channels, "rows": rows, "latents": latents, "crops": str(crops)}


def _pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows match {match}")
    return found[0]


def _save_crops(originals: np.ndarray, recons: dict[str, np.ndarray], path: pathlib.Path) -> pathlib.Path:
    """One row per image: original, then each arm; upscaled 2x (nearest) so 64 px crops stay readable."""
    from dcae_jax.data import images as image_io

    rows = [np.concatenate([originals[i], *(recons[a][i] for a in recons)], axis=1) for i in range(len(originals))]
    grid = np.clip(np.concatenate(rows, axis=0), -1, 1)
    grid = grid.repeat(2, axis=0).repeat(2, axis=1)
    return image_io.save_image(grid, path)


# ----------------------------------------------------------------------------------------------
# Report: tables (markdown) and figures.


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def report(results: dict[str, Any]) -> str:
    """Markdown tables of every experiment (pasted into docs/reproduction.md)."""
    out = []
    e1 = results["experiment1"]
    extra = _perceptual_columns(e1["runs"])
    out += [
        "### Experiment 1: residual autoencoding",
        "",
        "| factor | latent | params | shortcuts | seed | PSNR | SSIM |" + "".join(f" {h} |" for h, _, _ in extra),
        "|---|---|---:|---|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for r in e1["runs"]:
        out.append(
            f"| f{r['factor']} | {r['resolution'] // r['factor']}²×{r['latent_channels']} | {r['params']:,} | "
            f"{'residual' if r['residual'] else 'plain'} | {r['seed']} | {r['psnr']:.2f} | {r['ssim']:.4f} |"
            + "".join(f" {r[k]:.{d}f} |" for _, k, d in extra)
        )
    out += ["", "| factor | metric | residual minus plain, per seed | mean ± std |", "|---|---|---|---:|"]
    for factor in dict.fromkeys(r["factor"] for r in e1["runs"]):
        for label, key, digits in (("PSNR (dB)", "psnr", 2), *extra):
            gaps = _paired_gaps(e1["runs"], factor, key)
            cells = ", ".join(f"{g:+.{digits}f}" for g in gaps)
            out.append(f"| f{factor} | {label} | {cells} | {_mean_std_fmt(gaps, digits)} |")
    e2 = results["experiment2"]
    out += [
        "",
        "### Experiment 2: generalization penalty and phase 2",
        "",
        "| model | factor | eval res | PSNR | SSIM |"
        + "".join(f" {h} |" for h, _, _ in _perceptual_columns(e2["rows"])),
        "|---|---|---:|---:|---:|" + "---:|" * len(_perceptual_columns(e2["rows"])),
    ]
    for r in e2["rows"]:
        out.append(
            f"| {r['model']} | f{r['factor']}c{r['latent_channels']} | {r['eval_resolution']} | "
            f"{r['psnr']:.2f} | {r['ssim']:.4f} |"
            + "".join(f" {r[k]:.{d}f} |" for _, k, d in _perceptual_columns(e2["rows"]))
        )
    has_control = any("control_gain_db" in p for p in e2["penalty"])
    out += [
        "",
        "| factor | eval res | penalty vs contrast (dB) | phase-2 gain (dB) | "
        + ("control gain (dB) | phase 2 beyond control (dB) | " if has_control else "")
        + "penalty recovered |",
        "|---|---:|---:|---:|" + ("---:|---:|" if has_control else "") + "---:|",
    ]
    for p in e2["penalty"]:
        gain = p["phase2_gain_db"] - p.get("control_gain_db", 0.0)  # the part due to the high resolution
        # A ratio over a penalty inside run-to-run noise means nothing: report it only from 0.1 dB on.
        rec = f"{100 * gain / p['penalty_db']:.0f}%" if p["penalty_db"] >= MIN_PENALTY_DB else "no penalty"
        row = f"| f{p['factor']} | {p['eval_resolution']} | {p['penalty_db']:+.2f} | {p['phase2_gain_db']:+.2f} |"
        if has_control:
            row += f" {p['control_gain_db']:+.2f} | {gain:+.2f} |"
        out.append(row + f" {rec} |")
    m = e2["memory"]
    out += [
        "",
        f"Compiled train-step memory at {m['resolution']}², batch {m['batch']}, f{m['factor']} "
        f"(arguments + temporaries): full model {m['phase1_mib']:.1f} MiB, phase 2 {m['phase2_mib']:.1f} MiB "
        f"({m['ratio']:.2f}x); temporaries alone {m['phase1_temp_mib']:.1f} → {m['phase2_temp_mib']:.1f} MiB.",
    ]
    e3 = results["experiment3"]
    has_lpips = any("lpips" in r for r in e3["rows"])
    has_fid = any("rfid" in r for r in e3["rows"])
    out += [
        "",
        "### Experiment 3: phase 3 (decoder-head GAN refinement)",
        "",
        "| arm | seeds | PSNR | SSIM | HF spectral error (dB) | HF bias (dB) |"
        + (" LPIPS (VGG) |" if has_lpips else "")
        + (" rFID |" if has_fid else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if has_lpips else "") + ("---:|" if has_fid else ""),
    ]
    for arm in dict.fromkeys(r["arm"] for r in e3["rows"]):
        rs = [r for r in e3["rows"] if r["arm"] == arm]
        cells = [_mean_std([r[k] for r in rs]) for k in ("psnr",)]
        cells.append(_mean_std_fmt([r["ssim"] for r in rs], 4))
        cells += [_mean_std([r[k] for r in rs]) for k in ("hf_error_db", "hf_bias_db")]
        if has_lpips:
            cells.append(_mean_std_fmt([r["lpips"] for r in rs], 4))
        if has_fid:
            cells.append(_mean_std([r["rfid"] for r in rs]))
        out.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + " |")
    checks = [
        f"{k}: " + ("bit-identical" if v["bit_identical"] else f"max |Δz| {v['max_abs_diff']:.3g}")
        for k, v in e3["latents"].items()
    ]
    out += ["", "Latents vs the phase-1 model: " + ", ".join(checks)]
    settings, floor = results.get("scale_settings", {}), results.get("rfid_floor", {})
    if floor:
        out += [
            "",
            f"rFID: {settings.get('rfid_views')} crops per held-out photo (short side resized to "
            f"{settings.get('rfid_zoom')}x the evaluation resolution, crops spread along the long side), the same "
            "views for every model. Sampling floor (FID between the real views of the two halves of the photos): "
            + ", ".join(f"{v:.2f} at {k}²" for k, v in floor.items())
            + ".",
        ]
    return "\n".join(out) + "\n"


def _perceptual_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(header, key, digits) of the weight-based metrics present in every row (older results may lack them)."""
    cols = [("LPIPS (VGG)", "lpips", 4), ("rFID", "rfid", 2)]
    return [c for c in cols if rows and all(c[1] in r for r in rows)]


def _paired_gaps(runs: list[dict[str, Any]], factor: int, key: str) -> list[float]:
    """Per seed: the residual model's metric minus the plain model's (same init, data order and steps)."""
    seeds = sorted({r["seed"] for r in runs if r["factor"] == factor})
    return [
        _pick(runs, factor=factor, residual=True, seed=seed)[key]
        - _pick(runs, factor=factor, residual=False, seed=seed)[key]
        for seed in seeds
    ]


def _mean_std_fmt(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def figures(results: dict[str, Any], folder: pathlib.Path) -> list[pathlib.Path]:
    """Small PNGs, one per experiment (crops are saved by experiment 3 itself)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    e1 = results["experiment1"]
    panels = [("psnr", "held-out PSNR (dB)")] + [(k, h) for h, k, _ in _perceptual_columns(e1["runs"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    factors = [f for f, _ in dict.fromkeys((r["factor"], r["latent_channels"]) for r in e1["runs"])]
    for ax, (key, label) in zip(axes[0], panels):
        for k, residual in enumerate((True, False)):
            for i, f in enumerate(factors):
                vals = [r[key] for r in e1["runs"] if r["factor"] == f and r["residual"] == residual]
                x = i + (k - 0.5) * 0.35
                ax.bar(
                    x,
                    np.mean(vals),
                    0.35,
                    color="C0" if residual else "C3",
                    label=None if i else ("residual" if residual else "plain"),
                )
                ax.scatter([x] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(factors)), [f"f{f}" for f in factors])
        ax.set_ylabel(label)
        if key == "psnr":
            ax.set_ylim(bottom=min(r["psnr"] for r in e1["runs"]) - 2)
        ax.legend(fontsize=7)
    fig.suptitle("Exp. 1: residual shortcuts (dots: seeds)", fontsize=10)
    paths.append(_save(fig, folder / "exp1_residual.png"))

    e2 = results["experiment2"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    series = dict.fromkeys((r["model"], r["factor"]) for r in e2["rows"])
    styles = {"contrast": "--", "phase1": "o-", "phase2": "s-", "control": "x:"}
    colors = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(f for m, f in series if m != "contrast"))}
    for model, f in series:
        rs = [r for r in e2["rows"] if r["model"] == model and r["factor"] == f]
        res = [r["eval_resolution"] for r in rs]
        color = "k" if model == "contrast" else colors[f]
        ax.plot(res, [r["psnr"] for r in rs], styles[model], color=color, label=f"{model} f{f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(res, [str(r) for r in res])
    ax.set_xlabel("evaluation resolution")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(
        f"Exp. 2: trained at {min(r['eval_resolution'] for r in e2['rows'])}, phase 2 at {e2['phase2_resolution']}"
    )
    ax.legend(fontsize=7)
    paths.append(_save(fig, folder / "exp2_generalization.png"))

    e3 = results["experiment3"]
    arms = list(dict.fromkeys(r["arm"] for r in e3["rows"]))
    panels = [("psnr", "PSNR (dB, higher better)"), ("hf_error_db", "HF spectral error (dB, lower better)")]
    panels += [(k, f"{h} (lower better)") for h, k, _ in _perceptual_columns(e3["rows"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.25 * len(panels), 3))
    for ax, (key, label) in zip(axes, panels):
        for i, arm in enumerate(arms):
            vals = [r[key] for r in e3["rows"] if r["arm"] == arm]
            ax.bar(i, np.mean(vals), 0.6, color=f"C{i}")
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(arms)), arms, fontsize=7)
        ax.set_title(label, fontsize=9)
        lo = min(r[key] for r in e3["rows"])
        ax.set_ylim(bottom=lo - abs(lo) * 0.1)
    fig.suptitle(f"Exp. 3: phase-3 refinement, f{e3['factor']}", fontsize=10)
    paths.append(_save(fig, folder / "exp3_refinement.png"))
    return paths


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The whole study.


def check_data_folder(data: str | pathlib.Path) -> None:
    """The study trains on `train/` and scores on held-out `val/` (or `validation/`): a flat folder would train and
    score on the same photos, so it is refused."""
    from dcae_jax.data.pipeline import SPLIT_DIRS

    missing = [
        " or ".join(f"{d}/" for d in SPLIT_DIRS[split])
        for split in ("train", "val")
        if not any((pathlib.Path(data) / d).is_dir() for d in SPLIT_DIRS[split])
    ]
    if missing:
        raise FileNotFoundError(
            f"{data}: the study trains on train/ and scores on held-out val/ image folders; missing {missing}"
        )


def run(
    data: str,
    out: str | pathlib.Path,
    scale: str = "cpu",
    lpips_weights: str = "",
    fid_weights: str = "",
    seeds: int = 0,
) -> dict:
    """All three experiments; returns (and writes) the results. Runs already in `out` are reused."""
    check_data_folder(data)
    out = pathlib.Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    s = SCALES[scale]
    if seeds:
        s = dataclasses.replace(s, seeds=seeds, seeds3=seeds)
    _check_same_budget(out, s)
    from dcae_jax.metrics import weights

    perceptual = measure.Perceptual(
        weights.resolve("lpips_vgg", lpips_weights), weights.resolve("fid_inception", fid_weights)
    )
    study = Study(str(pathlib.Path(data).absolute()), out, s, perceptual)
    t0 = time.time()
    results: dict[str, Any] = {"data": str(data), "scale": scale, "scale_settings": dataclasses.asdict(s)}
    results["devices"] = [str(d) for d in jax.devices()]
    for name, fn in (("experiment1", experiment1), ("experiment2", experiment2), ("experiment3", experiment3)):
        t = time.time()
        results[name] = fn(study)
        results[name]["wall_s"] = time.time() - t
        print(f"[reproduce] {name} done in {results[name]['wall_s']:.0f} s", flush=True)
    results["rfid_floor"] = {str(k): v for k, v in study.rfid_floor.items()}
    results["train_wall_s"] = study.timings
    results["wall_s"] = time.time() - t0
    results["figures"] = [str(p) for p in figures(results, out / "figures")]
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    write_text_atomic(out / "report.md", report(results))
    print(report(results))
    print(f"[reproduce] total {results['wall_s']:.0f} s; results in {out / 'results.json'}")
    return results


def _check_same_budget(out: pathlib.Path, scale: Scale) -> None:
    """Finished runs are reused by name, so an `--out` must keep one budget (only the seed count may grow)."""
    path = out / "scale.json"
    settings = {
        k: v for k, v in json.loads(json.dumps(dataclasses.asdict(scale))).items() if k not in ("seeds", "seeds3")
    }
    if path.exists() and json.loads(path.read_text()) != settings:
        raise ValueError(f"{out} holds runs of another scale ({path}); use a fresh --out for this one")
    write_text_atomic(path, json.dumps(settings, indent=2))


def rewrite_report(out: str | pathlib.Path) -> pathlib.Path:
    """Redoes `report.md` and the figures from `out/results.json` (after a change to the report's code)."""
    out = pathlib.Path(out)
    source = out / "results.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no results to report (run the study into {out} first)")
    results = json.loads(source.read_text())
    figures(results, out / "figures")
    write_text_atomic(out / "report.md", report(results))
    return out / "report.md"
