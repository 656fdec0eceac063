"""Entry point: `python -m dcae_jax.main --config=configs/<file>.py:<args> --workdir=<dir>`.

Kept short on purpose (the logic lives in `dcae_jax.train`). A config with a `chain` field runs
its phases in order, each in `<workdir>/<name>` and initialised from the previous phase's export;
finished phases are skipped, so re-running the command resumes where it stopped.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import pathlib
import shutil
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dcae_jax import distributed, paths

FLAGS = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the export.", required=True)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)


def _train_fn(config):
    """The trainer a config names (`config.trainer`, default the autoencoder's)."""
    from dcae_jax import train
    from dcae_jax.diffusion import train as diffusion_train

    trainers = {"dcae": train.train_and_evaluate, "diffusion": diffusion_train.train_and_evaluate}
    name = config.get("trainer", "dcae")
    if name not in trainers:
        raise KeyError(f"config.trainer={name!r}; valid: {sorted(trainers)}")
    return trainers[name]


def run(config, workdir: pathlib.Path) -> dict:
    if "chain" not in config:
        return _train_fn(config)(config, workdir)
    previous, result = None, {}
    for name in config.chain:
        phase = config[name]
        phase_dir = workdir / name
        done = phase_dir / "eval.json"
        if done.exists() and (phase_dir / "export").exists():
            logging.info("%s already finished, skipping", name)
            result = json.loads(done.read_text())
        else:
            if previous is not None:
                # An autoencoder phase starts from the previous export; a diffusion phase encodes with it.
                field = "autoencoder" if phase.get("trainer", "dcae") == "diffusion" else "init_from"
                if not phase[field]:
                    with phase.unlocked():
                        phase[field] = str((previous / "export").absolute())
            result = _train_fn(phase)(phase, phase_dir)
        result = {**result, "phase": name}
        previous = phase_dir
    if jax.process_index() == 0:
        if (workdir / "export").exists():
            shutil.rmtree(workdir / "export")
        shutil.copytree(previous / "export", workdir / "export")
        _write_eval_table(config, workdir)
    return result


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
    try:
        workdir = paths.local_dir(flags.FLAGS.workdir, "--workdir")
    except ValueError as err:
        print(f"main: error: {err}", file=sys.stderr)
        sys.exit(2)
    distributed.initialize_from_env()
    logging.info("JAX processes %d/%d, devices %s", jax.process_index(), jax.process_count(), jax.devices())
    from dcae_jax.train import ConfigError

    try:
        run(flags.FLAGS.config, workdir)
    except (ConfigError, paths.WorkdirBusy) as err:  # user mistakes: one message, no traceback
        print(f"main: error: {err}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        if jax.process_count() == 1:
            raise
        # A normal exit would wait minutes in jax's shutdown barrier for the other processes (which wait for
        # this one): exit now, so launchers and the coordination service see the failure and stop the rest.
        logging.exception("process %d failed", jax.process_index())
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    app.run(main)
