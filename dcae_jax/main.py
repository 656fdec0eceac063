"""Entry point: `python -m dcae_jax.main --config=configs/<file>.py:<args> --workdir=<dir>`.

Flags only: the run itself is `dcae_jax.training.chain.run` (one trainer, or a config's `chain` of phases, each
in `<workdir>/<name>` and initialised from the previous phase's export; finished phases are skipped, so
re-running the command resumes where it stopped).
"""

from __future__ import annotations

import logging as std_logging
import pathlib

import jax
from absl import flags, logging
from ml_collections import config_flags

from dcae_jax import cli, distributed, paths
from dcae_jax.training import chain

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
    chain.run(flags.FLAGS.config, workdir)  # failures: dcae_jax.cli's policy (one line for user mistakes, exit 2)


if __name__ == "__main__":
    cli.run_absl("main", main)
