"""The layering rule, read from the source: packages never import commands, and commands never import commands.

A command is a module that runs as `python -m ...` (it has a module-level `if __name__ == "__main__":`); it parses
flags, calls the library and prints. Everything else is library. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dcae_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_command(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and getattr(node.test.left, "id", None) == "__name__"
        for node in tree.body
    )


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dcae_jax module named by an import anywhere in the file (`from a import b` counts a and a.b)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "dcae_jax" or m.startswith("dcae_jax.")}


def _graph() -> tuple[dict[str, set[str]], set[str]]:
    imports, commands = {}, set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        name = _module_name(path)
        imports[name] = _imports(tree, name, path.name == "__init__.py")
        if _is_command(tree):
            commands.add(name)
    return imports, commands


def test_the_graph_is_read():
    imports, commands = _graph()
    assert {"dcae_jax.main", "dcae_jax.evaluate", "dcae_jax.precompute_latents"} <= commands
    assert "dcae_jax.autoencoder.train" not in commands and "dcae_jax.data.precompute" in imports
    assert "dcae_jax.data.precompute" in imports["dcae_jax.precompute_latents"]  # a command calling its library


def test_packages_never_import_commands_and_commands_never_import_commands():
    imports, commands = _graph()
    wrong = sorted(
        f"{module} imports the command {target}"
        for module, targets in imports.items()
        for target in targets & commands
        if target != module
    )
    assert not wrong, "\n".join(wrong)


def test_the_top_level_holds_only_the_api_and_commands():
    """Logic lives in the packages below; a top-level module that is not a command would be a stray library."""
    _, commands = _graph()
    top = {_module_name(p) for p in PACKAGE.glob("*.py")} - {"dcae_jax"}
    assert top, "no top-level modules found"
    assert top <= commands, f"top-level modules that are not commands: {sorted(top - commands)}"
    assert commands <= top, f"commands below the top level: {sorted(commands - top)}"


def test_commands_are_short():
    """A command is flags -> one library call -> printed result; long ones hide library code."""
    too_long = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        if _is_command(tree):
            code = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            if len(code) - len((ast.get_docstring(tree) or "").splitlines()) > 100:
                too_long[_module_name(path)] = len(code)
    assert not too_long, f"commands over 100 lines of code: {too_long}"
