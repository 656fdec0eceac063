"""Reproduce the DC-AE paper's three findings at small scale on any folder of real photos.

    python -m dcae_jax.reproduce --data=PHOTOS --out=/tmp/repro [--scale=cpu] [--compilation_cache=DIR]

`--data` holds `train/` (training) and `val/` (held-out evaluation) image folders. Every training run goes
through the project's trainer in `<out>/runs/<name>`; finished runs are skipped, so re-running the command
resumes. Results go to `<out>/results.json`, tables to `<out>/report.md`, figures and crops to `<out>/figures/`.
The experiments, their losses and metrics: `dcae_jax.studies.experiments`; measured results: docs/reproduction.md.
"""

from __future__ import annotations

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    from dcae_jax.studies.experiments import SCALES

    f.string("data", None, "Folder with train/ and val/ image subfolders.", required=True)
    f.string("out", None, "Output folder (runs, results.json, report.md, figures).", required=True)
    f.enum("scale", "cpu", sorted(SCALES), "Budget preset (cpu: about 1 h 20 min on a 2-core CPU).")
    f.string("lpips_weights", "", "LPIPS weights for the evaluation (default: the genuine VGG16 file).")
    f.string("fid_weights", "", "FID Inception weights (default: the genuine file).")
    f.string("compilation_cache", "", "JAX persistent compilation cache folder.")
    f.integer("seeds", 0, "Override the scale's seed count (experiments 1 and 3).", lower_bound=0)
    f.bool("report_only", False, "Redo report.md and the figures from results.json.")


def body(flags) -> None:
    import jax

    from dcae_jax.runtime import paths
    from dcae_jax.studies import experiments

    why = "the study reads and writes a local folder"
    for name in ("data", "out", "compilation_cache"):
        if flags[name].value:
            paths.local_only(flags[name].value, f"--{name}", why)
    if flags.report_only:
        print(f"wrote {experiments.rewrite_report(flags.out)} and the figures beside it")
        return
    if flags.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", flags.compilation_cache)
    experiments.run(flags.data, flags.out, flags.scale, flags.lpips_weights, flags.fid_weights, seeds=flags.seeds)


def main(argv: list[str] | None = None) -> int:
    return cli.run("reproduce", __doc__, define_flags, body, argv)


if __name__ == "__main__":
    cli.exit_with(main())
