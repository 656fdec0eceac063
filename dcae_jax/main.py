"""Entry point: `python -m dcae_jax.main --config=configs/<file>.py:<args> --workdir=<dir>`.

Kept short on purpose (the logic lives in `dcae_jax.train`). A config with a `chain` field runs
its phases in order, each in `<workdir>/<name>` and initialised from the previous phase's export;
finished phases are skipped, so re-running the command resumes where it stopped.
"""

from __future__ import annotations

import json
import logging as std_logging
import pathlib
import shutil
import time

import jax
from absl import flags, logging
from ml_collections import config_flags

from dcae_jax import cli, distributed, paths

FLAGS = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the export.", required=True)


def _configs_help() -> str:
    """The repository's configs (first docstring line and `Args:` paragraph of each), for `--help`."""
    import ast

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    lines = ["Training configuration: FILE.py[:arg=value,...], then --config.key=value overrides."]
    if not root.is_dir():
        return lines[0] + " See the repository's configs/ folder."
    lines.append("Configs in this checkout:")
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree) or ""
        if not doc or not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
            continue
        summary = doc.strip().splitlines()[0]
        args = " ".join(doc.split("Args:", 1)[1].split("\n\n")[0].split()) if "Args:" in doc else ""
        lines.append(f"  configs/{path.name}: {summary}" + (f" Args: {args}" if args else ""))
    return "\n".join(lines)


config_flags.DEFINE_config_file("config", None, _configs_help(), lock_config=True)


def _train_fn(config):
    """The trainer a config names (`config.trainer`, default the autoencoder's)."""
    from dcae_jax import train
    from dcae_jax.diffusion import train as diffusion_train

    trainers = {"dcae": train.train_and_evaluate, "diffusion": diffusion_train.train_and_evaluate}
    name = config.get("trainer", "dcae")
    if name not in trainers:
        raise KeyError(f"config.trainer={name!r}; valid: {sorted(trainers)}")
    return trainers[name]


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


def run(config, workdir: pathlib.Path) -> dict:
    t0 = time.time()
    if "chain" not in config:
        result = _train_fn(config)(config, workdir)
        if jax.process_index() == 0:
            _print_summary(config, workdir, [workdir], t0)
        return result
    previous, result = None, {}
    costs = {name: _cost(config[name]) for name in config.chain}
    done_cost = 0.0
    for k, name in enumerate(config.chain, 1):
        phase = config[name]
        phase_dir = workdir / name
        done = phase_dir / "eval.json"
        if done.exists() and (phase_dir / "export").exists():
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
                        phase[field] = str((previous / "export").absolute())
            result = _train_fn(phase)(phase, phase_dir)
            done_cost += costs[name]
        result = {**result, "phase": name}
        previous = phase_dir
    if jax.process_index() == 0:
        if (workdir / "export").exists():
            shutil.rmtree(workdir / "export")
        shutil.copytree(previous / "export", workdir / "export")
        _write_eval_table(config, workdir)
        _print_summary(config, workdir, [workdir / n for n in config.chain], t0)
    return result


def _print_summary(config, workdir: pathlib.Path, phase_dirs: list[pathlib.Path], t0: float) -> None:
    """What the run wrote and where, and the command a user runs next."""
    last = config[config.chain[-1]] if "chain" in config else config
    diffusion = last.get("trainer", "dcae") == "diffusion"
    export = (workdir / "export").absolute()
    lines = [f"Finished in {_fmt_s(time.time() - t0)}. Wrote:"]
    load = "DCAEDiffusion.from_pretrained" if diffusion else "DCAE.from_pretrained"
    lines.append(f"  model       {export}   (load with {load})")
    if (workdir / "eval.md").exists():
        lines.append(f"  evaluation  {(workdir / 'eval.md').absolute()}")
    for d in phase_dirs:
        pictures = sorted((d / "samples").glob("*.png"))[-1:] + [p for p in [d / "curves.png"] if p.exists()]
        if pictures:
            lines.append(f"  pictures    {', '.join(str(p.absolute()) for p in pictures)}")
    lines.append(f"  logs        tensorboard --logdir {workdir.absolute()}")
    if diffusion:
        lines.append(
            f"Next: python -m dcae_jax.sample --model={export} --num_samples=16 --out={workdir.absolute()}/grid"
        )
    else:
        lines.append(f"Next: python -m dcae_jax.reconstruct --model {export} --input YOUR_PHOTOS --output recon/")
    print("\n".join(lines), flush=True)


def _write_eval_table(config, workdir: pathlib.Path) -> None:
    rows = [
        "| phase | steps | train res | eval res | held-out PSNR | SSIM | LPIPS (alex) | rFID | images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in config.chain:
        r = json.loads((workdir / name / "eval.json").read_text())
        c = config[name]
        if c.get("trainer", "dcae") != "dcae":
            continue
        lp = f"{r['lpips']:.4f}" if "lpips" in r else "n/a"
        fid = f"{r['rfid']:.2f}" if "rfid" in r else "n/a"
        rows.append(
            f"| {name} | {c.num_steps} | {c.resolution} | {c.eval_resolution or c.resolution} | {r['psnr']:.2f} | "
            f"{r['ssim']:.4f} | {lp} | {fid} | {r['num_images']} |"
        )
    if any(config[n].get("eval_rfid_crop", 0) for n in config.chain):
        rows.append("\nrFID here is a patch rFID: aligned crops of the held-out images (config.eval_rfid_crop).")
    (workdir / "eval.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter from orbax/grain (dozens of lines per checkpoint); warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            f"/{lib}/" in record.pathname for lib in ("orbax", "grain")
        )


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    workdir = paths.local_dir(flags.FLAGS.workdir, "--workdir")
    distributed.initialize_from_env()
    logging.info("JAX processes %d/%d, devices %s", jax.process_index(), jax.process_count(), jax.devices())
    run(flags.FLAGS.config, workdir)  # failures: dcae_jax.cli's policy (one line for user mistakes, exit 2)


if __name__ == "__main__":
    cli.run_absl("main", main)
