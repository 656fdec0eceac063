"""The commands' one failure policy.

* A user mistake (a missing or unreadable file, a bad value, a busy workdir, a full disk, ...) prints one message
  `<command>: error: ...` to stderr and exits 2; no traceback unless `DCAE_JAX_DEBUG=1` asks for one.
* Any failure in a multi-process job ends that process at once (`os._exit`), so launchers and the coordination
  service see it and stop the peers instead of leaving them waiting in a collective.
* One flag convention: absl flags, snake_case (`--batch_size`); the old hyphenated spellings of the commands
  that once used argparse (`--batch-size`) still work, with a deprecation note (`snake_case_flags`).
* `--help` prints the command's docstring and its flags and exits 0.

Each command parses into its own `absl.flags.FlagValues` (`run`), so a command's `main(argv)` can be called in
one process with any other (tests do) and importing a command defines nothing global:

    def define_flags(f: cli.Flags) -> None:
        f.string("out", None, "Output folder.", required=True)

    def body(flags: absl.flags.FlagValues) -> int | None:
        ...  # one library call, then print what was written and where

    def main(argv: list[str] | None = None) -> int:
        return cli.run("name", __doc__, define_flags, body, argv)

    if __name__ == "__main__":
        cli.exit_with(main())
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "DCAE_JAX_DEBUG"

# Exceptions that describe the user's input or environment; their messages name the file, flag or field.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)
try:  # absl's usage errors (a bad flag value found in a command's body) are user mistakes too
    from absl.app import UsageError

    USER_ERRORS = (*USER_ERRORS, UsageError)
except ImportError:  # pragma: no cover
    pass
_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _multi_process() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # private API moved: fall back to the environment the launchers set
        return os.environ.get("JAX_NUM_PROCESSES", "1") not in ("", "1")


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if _multi_process():
        os._exit(code)  # a normal exit would wait in jax's shutdown barrier for peers that wait for this process
    sys.exit(code)


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]  # KeyError's str() adds quotes
    return str(err) or type(err).__name__


def _out_of_memory(err: BaseException) -> str | None:
    """XLA's out-of-memory sentence of a runtime error (device or host memory), if it is one."""
    if not isinstance(err, RuntimeError):
        return None
    found = re.search(r"Out of memory[^\n]*?(?:\.|$)", str(err), re.MULTILINE)
    return found.group(0) if found else None


def _one_line(name: str, err: BaseException) -> tuple[str, int] | None:
    """The line and exit status an error is reported with instead of a traceback, or None: a user mistake (2), a
    run that diverged and stopped itself, naming its last good state (1), running out of memory (1)."""
    if isinstance(err, USER_ERRORS):
        return f"{name}: error: {_message(err)}", 2
    if isinstance(err, FloatingPointError):
        return f"{name}: stopped: {err}", 1
    oom = _out_of_memory(err)
    if oom:
        advice = "Use a smaller batch, model or resolution, more devices, or remat"
        return f"{name}: out of memory: {oom} {advice} (`python -m dcae_jax.aot` checks a training config's fit)", 1
    return None


def guard(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs a command's body under the policy; returns its exit code (None -> 0; 2 after a user mistake, which
    ends a multi-process run's process at once)."""
    try:
        code = fn(*args)
    except SystemExit as err:
        if getattr(err, "message", None):  # a deliberate stop with a word for the user (training.loop.Preempted)
            print(f"{name}: {err.message}", file=sys.stderr)
            return int(err.code)
        raise
    except BaseException as err:
        report = None if os.environ.get(DEBUG_ENV) else _one_line(name, err)
        if report is not None:
            line, status = report
            print(line, file=sys.stderr)
            if _multi_process():
                _exit(status)
            return status
        if _multi_process():
            import traceback

            traceback.print_exc()
            _exit(1)
        raise
    return 0 if code is None else int(code)


def snake_case_flags(argv: list[str] | None, name: str) -> list[str]:
    """`argv` (default: the command line) with `--old-spelling[=v]` rewritten to `--old_spelling[=v]`, noting each."""
    argv = sys.argv[1:] if argv is None else list(argv)
    out = []
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and "-" in key:
            # absl negates a boolean as --noflag: --no-save-images -> --nosave_images
            new = "no" + key[3:].replace("-", "_") if key.startswith("no-") else key.replace("-", "_")
            print(f"{name}: note: --{key} is deprecated, use --{new}", file=sys.stderr)
            arg = f"--{new}{eq}{value}"
        out.append(arg)
    return out


class Flags:
    """absl's `DEFINE_*` (and `mark_*`) bound to one `FlagValues`: `f.string(...)`, `f.enum(...)`, ...

    `f.values` is the `FlagValues` itself (for `ml_collections.config_flags.DEFINE_config_file(...,
    flag_values=f.values)`).
    """

    def __init__(self, values: Any):
        self.values = values

    def __getattr__(self, kind: str) -> Callable[..., Any]:
        from absl import flags

        define = getattr(flags, kind if kind.startswith("mark_") else f"DEFINE_{kind}", None)
        if define is None:
            raise AttributeError(f"absl.flags has no DEFINE_{kind}")
        return functools.partial(define, flag_values=self.values)


def values(flags: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The command's own flags as keyword arguments (name -> value), for a library call whose parameters carry
    the flags' names."""
    return {name: flags[name].value for name in flags if name not in exclude and name not in _ABSL_FLAGS}


_ABSL_FLAGS = ("flagfile", "undefok")


def _accelerator_possible() -> bool:
    """Whether JAX may find a GPU or TPU here: JAX_PLATFORMS names one, or (unset) a TPU device or a GPU plugin
    exists."""
    import glob
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU VMs (v4/v5p: accel, v5e/v6e: vfio)
        return True
    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))


def prepare_process(argv: list[str] | None = None) -> None:
    """Process-wide settings for a command, before JAX starts a backend: no probe for an absent TPU
    (`skip_absent_tpu`) and, when the command was started from the command line (`argv` None: it owns its
    process), the host allocator policy (`compute.set_host_malloc`: freed XLA:CPU buffers kept for the next step
    instead of page-faulted in again). A command called with `argv` inside another program (a test) leaves that
    process's allocator alone: the setting is permanent. `run` calls it; the benchmarks call it first."""
    skip_absent_tpu()
    if argv is None:
        from dcae_jax.runtime import compute

        compute.set_host_malloc(cpu=not _accelerator_possible())


def skip_absent_tpu() -> bool:
    """Keeps JAX from probing for a TPU that is not there: with libtpu installed (the test requirements bring it, for
    `aot`) and no TPU device on this machine, JAX's TPU plugin asks the cloud metadata server for a TPU and logs
    alarming lines before falling back to the CPU. When JAX_PLATFORMS is unset, no TPU device exists and no GPU
    plugin is installed, the platforms become "cpu". Returns whether it changed anything."""
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _accelerator_possible():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"  # for processes this one starts
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def _usage(name: str, doc: str, values: Any) -> str:
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else name
    flags_help = values.get_help(include_special_flags=False)
    return f"usage: python -m {module} [flags]\n\n{doc.strip()}\n\nflags:\n{flags_help}\n"


def _flag_message(msg: str) -> str:
    """A flag error's message without the traceback that ml_collections embeds when a config file's `get_config`
    raised: `flag --config=...: ValueError: phase must be 1, 2 or 3, got 4`."""
    head, sep, trace = msg.partition("Traceback (most recent call last):")
    if not sep or os.environ.get(DEBUG_ENV):
        return msg.strip()
    last = [ln for ln in trace.strip().splitlines() if ln and not ln.startswith(" ")][-1]
    return f"{head.replace('Error whilst parsing config file:', '').strip()} {last.strip()}"


def _parse_error(err: BaseException, argv: list[str]) -> str:
    """One line for an exception raised while the flags were parsed: a config override naming no field
    (`--config.nosuchkey=1`: ml_collections raises AttributeError("'nosuchkey'") or a KeyError with a "Did you
    mean" line), or a config file's own check (its message names the arg)."""
    msg = str(err) if isinstance(err, AttributeError) else _message(err)
    first, *more = msg.strip().splitlines() or [""]
    if isinstance(err, (AttributeError, KeyError)) and re.fullmatch(r"""['"]+[^'"]+['"]+""", first.strip()):
        field = first.strip().strip("\"'")
        given = [a.split("=")[0] for a in argv if a.startswith("--") and field in a.split("=")[0].split(".")]
        hint = " ".join(more).strip()
        return f"{given[0] if given else 'a --config override'}: the config has no field {field!r}" + (
            f" ({hint})" if hint else ""
        )
    return " ".join(msg.split())


def run(
    name: str,
    doc: str | None,
    define_flags: Callable[[Flags], None],
    body: Callable[[Any], int | None],
    argv: list[str] | None = None,
    *,
    verbosity: str = "info",
) -> int:
    """Parses `argv` (default: the command line) into fresh flags and runs `body(flags)` under the policy.

    Returns the exit code: `body`'s (None -> 0), 0 for `--help`, 2 for a bad flag or a user mistake. absl log
    lines go to stderr at `verbosity` ("info" for the trainer; "warning" keeps orbax's INFO lines out of a
    command's report).
    """
    from absl import flags, logging

    if code := guard(name, prepare_process, argv):
        return code
    argv = snake_case_flags(argv, name)
    values = flags.FlagValues()
    define_flags(Flags(values))
    if any(a.split("=")[0] in _HELP_FLAGS for a in argv):
        print(_usage(name, doc or "", values))
        return 0
    try:
        rest = values([name, *argv])
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments: {' '.join(rest[1:])}")
    except flags.Error as err:
        print(f"{name}: error: {_flag_message(str(err))} (--help lists the flags)", file=sys.stderr)
        return 2
    except (*USER_ERRORS, AttributeError) as err:  # from a flag's parser: a config's get_config(arg), an override
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{name}: error: {_parse_error(err, argv)} (--help lists the flags)", file=sys.stderr)
        return 2
    if not flags.FLAGS.is_parsed():  # the commands use their own flags; absl's global ones are not parsed
        flags.FLAGS.mark_as_parsed()  # ... which would make absl logging warn "Logging before flag parsing"
    logging.use_absl_handler()
    logging.set_verbosity(verbosity)
    return guard(name, body, values)


def exit_with(code: int) -> None:
    """`sys.exit(code)`; a failing process of a multi-process run leaves at once (a normal exit would wait in
    jax's shutdown barrier for peers that wait for it), a successful one shuts down normally."""
    if code:
        _exit(code)
    sys.exit(0)
