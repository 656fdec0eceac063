"""Entry point: `python -m dcae_jax.main --config=configs/<file>.py:<args> --workdir=<dir>`.

Flags only: the run itself is `dcae_jax.training.chain.run` (one trainer, or a config's `chain` of phases, each
in `<workdir>/<name>` and initialised from the previous phase's export; finished phases are skipped, so
re-running the command resumes where it stopped).
"""

from __future__ import annotations

import logging as std_logging
import pathlib

from dcae_jax.runtime import cli


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


def define_flags(f: cli.Flags) -> None:
    from ml_collections import config_flags

    f.string("workdir", None, "Directory for checkpoints, logs and the export.", required=True)
    config_flags.DEFINE_config_file("config", None, _configs_help(), flag_values=f.values, lock_config=True)
    f.mark_flag_as_required("config")


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter from orbax/grain (dozens of lines per checkpoint); warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            f"/{lib}/" in record.pathname for lib in ("orbax", "grain")
        )


def body(flags) -> None:
    import jax
    from absl import logging

    from dcae_jax.runtime import distributed, paths
    from dcae_jax.training import chain

    logging.get_absl_handler().addFilter(_QuietLibraries())
    workdir = paths.path(flags.workdir, "--workdir")
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir={workdir} is a file, not a folder")
    distributed.initialize_from_env()
    logging.info("JAX processes %d/%d, devices %s", jax.process_index(), jax.process_count(), jax.devices())
    chain.run(flags.config, workdir)  # failures: dcae_jax.runtime.cli's policy (one line for user mistakes, exit 2)


def main(argv: list[str] | None = None) -> int:
    return cli.run("main", __doc__, define_flags, body, argv)


if __name__ == "__main__":
    cli.exit_with(main())
