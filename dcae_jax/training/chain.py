"""Running a config: one trainer, or a `chain` of phases (autoencoder phases, then diffusion), with progress, an
overall ETA, the closing evaluation table (`eval.md`) and a summary of what was written where.

Each phase of a chain runs in `<workdir>/<name>`; an autoencoder phase starts from the previous phase's export
(`init_from`), a diffusion phase encodes with it (`autoencoder`). Finished phases (their `eval.json` and `export`
exist) are skipped, so running the same command again resumes. The last phase's export is copied to
`<workdir>/export`.
"""

from __future__ import annotations

import json
import time

import jax
from absl import logging

from dcae_jax.runtime import paths


def _trainer(config):
    """The trainer module a config names (`config.trainer`, default the autoencoder's): `train_and_evaluate(config,
    workdir)` and `check(config)`."""
    from dcae_jax.autoencoder import train
    from dcae_jax.diffusion import train as diffusion_train

    trainers = {"dcae": train, "diffusion": diffusion_train}
    name = config.get("trainer", "dcae")
    if name not in trainers:
        raise KeyError(f"config.trainer={name!r}; valid: {sorted(trainers)}")
    return trainers[name]


def _check_phases(config, workdir: paths.Path) -> None:
    """Every unfinished phase's config, before the first one starts (not after an hour of phase 1); the error
    names the phase."""
    for k, name in enumerate(config.chain):
        phase = config[name]
        if _finished(workdir / name):
            continue
        inherits = k > 0 and phase.get("trainer", "dcae") == "dcae" and not phase.get("init_from")
        if inherits and not phase.model.get("variant"):  # its architecture is the previous export's: not yet known
            continue  # (checked when it starts)
        try:
            _trainer(phase).check(phase)
        except (ValueError, KeyError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise type(err)(f"config.{name}: {msg}") from None


def _finished(phase_dir: paths.Path) -> bool:
    return (phase_dir / "eval.json").exists() and (phase_dir / "export").exists()


def _fmt_s(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _cost(phase) -> float:
    """Relative work of a phase (steps x batch x pixels or latent tokens), for the chain's rough ETA."""
    res = phase.get("resolution", 0) or 1
    return float(phase.num_steps) * float(phase.global_batch_size) * float(res) ** 2


def _announce(k: int, n: int, name: str, phase, t0: float, done_cost: float, left_cost: float) -> None:
    elapsed = time.time() - t0
    eta = f", about {_fmt_s(elapsed / done_cost * left_cost)} left" if done_cost > 0 and elapsed > 1 else ""
    what = "diffusion" if phase.get("trainer", "dcae") == "diffusion" else f"phase {phase.get('phase', '?')}"
    print(f"== {k}/{n} {name} ({what}, {phase.num_steps} steps) | elapsed {_fmt_s(elapsed)}{eta}", flush=True)


def run(config, workdir: paths.PathLike) -> dict:
    t0 = time.time()
    workdir = paths.path(workdir, "workdir")
    if "chain" not in config:
        result = _trainer(config).train_and_evaluate(config, workdir)
        if jax.process_index() == 0:
            _print_summary(config, workdir, [workdir], t0)
        return result
    _check_phases(config, workdir)
    previous, result = None, {}
    costs = {name: _cost(config[name]) for name in config.chain}
    done_cost = 0.0
    for k, name in enumerate(config.chain, 1):
        phase = config[name]
        phase_dir = workdir / name
        done = phase_dir / "eval.json"
        if _finished(phase_dir):
            logging.info("%s already finished, skipping", name)
            print(f"== {k}/{len(config.chain)} {name}: already finished, skipped", flush=True)
            result = json.loads(done.read_text())
        else:
            left = sum(costs[c] for c in config.chain[k - 1 :])
            if jax.process_index() == 0:
                _announce(k, len(config.chain), name, phase, t0, done_cost, left)
            if previous is not None:
                # An autoencoder phase starts from the previous export; a diffusion phase encodes with it.
                field = "autoencoder" if phase.get("trainer", "dcae") == "diffusion" else "init_from"
                if not phase[field]:
                    with phase.unlocked():
                        phase[field] = str(previous / "export")
            result = _trainer(phase).train_and_evaluate(phase, phase_dir)
            done_cost += costs[name]
        result = {**result, "phase": name}
        previous = phase_dir
    if jax.process_index() == 0:
        paths.rmtree(workdir / "export")
        paths.copytree(previous / "export", workdir / "export")
        write_eval_table(config, workdir)
        _print_summary(config, workdir, [workdir / n for n in config.chain], t0)
    return result


def _print_summary(config, workdir: paths.Path, phase_dirs: list[paths.Path], t0: float) -> None:
    """What the run wrote and where, and the command a user runs next."""
    last = config[config.chain[-1]] if "chain" in config else config
    diffusion = last.get("trainer", "dcae") == "diffusion"
    export = workdir / "export"
    lines = [f"Finished in {_fmt_s(time.time() - t0)}. Wrote:"]
    load = "DCAEDiffusion.from_pretrained" if diffusion else "DCAE.from_pretrained"
    lines.append(f"  model       {export}   (load with {load})")
    if (workdir / "eval.md").exists():
        lines.append(f"  evaluation  {workdir / 'eval.md'}")
    for d in phase_dirs:
        pictures = sorted((d / "samples").glob("*.png"))[-1:] + [p for p in [d / "curves.png"] if p.exists()]
        if pictures:
            lines.append(f"  pictures    {', '.join(str(p) for p in pictures)}")
    lines.append(f"  logs        tensorboard --logdir {workdir}")
    if diffusion:
        lines.append(f"Next: python -m dcae_jax.sample --model={export} --num_samples=16 --out={workdir}/grid")
    else:
        lines.append(f"Next: python -m dcae_jax.reconstruct --model {export} --input YOUR_PHOTOS --output recon/")
    print("\n".join(lines), flush=True)


def write_eval_table(config, workdir: paths.Path) -> None:
    rows = [
        "| phase | steps | train res | eval res | held-out PSNR | SSIM | LPIPS (alex) | rFID | images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    diffusion_rows = []
    for name in config.chain:
        r = json.loads((workdir / name / "eval.json").read_text())
        c = config[name]
        if c.get("trainer", "dcae") != "dcae":
            samples = sorted((workdir / name / "samples").glob("*.png"))
            loss = r.get("train", {}).get("loss")
            diffusion_rows.append(
                f"| {name} | {r.get('model', '?')} ({r.get('objective', '?')}) | {c.num_steps} | "
                + (f"{loss:.4f}" if loss is not None else "n/a")
                + f" | {samples[-1].relative_to(workdir) if samples else 'none'} |"
            )
            continue
        lp = f"{r['lpips']:.4f}" if "lpips" in r else "n/a"
        fid = f"{r['rfid']:.2f}" if "rfid" in r else "n/a"
        rows.append(
            f"| {name} | {c.num_steps} | {c.resolution} | {c.eval_resolution or c.resolution} | {r['psnr']:.2f} | "
            f"{r['ssim']:.4f} | {lp} | {fid} | {r['num_images']} |"
        )
    if any(config[n].get("eval_rfid_crop", 0) for n in config.chain):
        rows.append("\nrFID here is a patch rFID: aligned crops of the held-out images (config.eval_rfid_crop).")
    if len(rows) == 2:  # no autoencoder phase in this chain (a diffusion chain on a given autoencoder)
        rows = []
    if diffusion_rows:
        rows += [
            *([""] if rows else []),
            "| diffusion phase | model | steps | final train loss | last sample grid |",
            "|---|---|---:|---:|---|",
        ]
        rows += diffusion_rows
    paths.write_text_atomic(workdir / "eval.md", "\n".join(rows) + "\n")
    print("\n".join(rows))
