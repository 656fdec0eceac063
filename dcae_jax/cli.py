"""The commands' one failure policy.

* A user mistake (a missing or unreadable file, a bad value, a busy workdir, a full disk, ...) prints one message
  `<command>: error: ...` to stderr and exits 2; no traceback unless `DCAE_JAX_DEBUG=1` asks for one.
* Any failure in a multi-process job ends that process at once (`os._exit`), so launchers and the coordination
  service see it and stop the peers instead of leaving them waiting in a collective.
* absl's `--help` exits 0 (absl itself exits 1).
* One flag spelling, snake_case (`--batch_size`); the argparse commands still accept the old hyphenated
  spellings (`--batch-size`) with a deprecation note (`snake_case_flags`).
"""

from __future__ import annotations

import os
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


def guard(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs a command's body under the policy; returns its exit code (None -> 0)."""
    try:
        code = fn(*args)
    except SystemExit:
        raise
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{name}: error: {_message(err)}", file=sys.stderr)
        _exit(2)
    except BaseException:
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
            new = key.replace("-", "_")
            print(f"{name}: note: --{key} is deprecated, use --{new}", file=sys.stderr)
            arg = f"--{new}{eq}{value}"
        out.append(arg)
    return out


def run_argparse(name: str, main: Callable[[list[str] | None], Any]) -> None:
    """`if __name__ == "__main__"` for an argparse command."""
    sys.exit(guard(name, main, None))


def run_absl(name: str, main: Callable[[list[str]], Any]) -> None:
    """`if __name__ == "__main__"` for an absl command (flags defined before)."""
    from absl import app

    try:
        app.run(lambda argv: sys.exit(guard(name, main, argv)))
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise
