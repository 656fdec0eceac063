"""Every command's --help exits 0; a user mistake is one line and exit 2 (a traceback only with DCAE_JAX_DEBUG=1)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMANDS = [
    "dcae_jax.main",
    "dcae_jax.evaluate",
    "dcae_jax.fid_stats",
    "dcae_jax.reconstruct",
    "dcae_jax.convert",
    "dcae_jax.sample",
    "dcae_jax.precompute_latents",
    "dcae_jax.aot",
    "dcae_jax.fetch_weights",
    "dcae_jax.reproduce",
    "dcae_jax.bicubic",
    "dcae_jax.convert_weights",
    "dcae_jax.pack",
]


def _run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("module", COMMANDS)
def test_help_exits_zero(module):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "usage" in text.lower() or "flags" in text.lower()
    assert not re.search(r"\S {6,}--", text), (
        "an example command in the help text is garbled (a bare backslash-newline)"
    )


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            "dcae_jax.evaluate",
            ["--model", "/no/such_dir", "--data", "bundled", "--resolution", "64", "--output", "/tmp/x.json"],
            "no/such_dir",
        ),
        ("dcae_jax.sample", ["--model=/no/such/export", "--out=/tmp/x_never_written"], "/no/such/export"),
        ("dcae_jax.convert", ["--src", "/no/such/ckpt.safetensors", "--out", "/tmp/x_never"], "/no/such/ckpt"),
    ],
)
def test_user_mistakes_are_one_line(module, args, message, tmp_path):
    proc = _run(module, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    name = module.rsplit(".", 1)[-1]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{name}: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config=configs/quickstart.py:stepz=3"], "unknown config arg 'stepz'; valid: ['lpips_steps1', "),
        (["--config=configs/tiny_test.py:phase=4"], "tiny_test.py:phase=4: ValueError: phase must be 1, 2 or 3"),
        (["--config=configs/dcae.py:variant=f99"], "variant='f99'; valid: ['f128c512', "),
        (["--config=configs/tiny_test.py", "--config.nosuchkey=1"], "--config.nosuchkey: the config has no field"),
        (["--config=configs/quickstart.py", "--config.phase1.nosuch=1"], "--config.phase1.nosuch: the config has no"),
    ],
)
def test_a_config_mistake_is_one_line(args, message, tmp_path):
    """Raised while the flags are parsed (a config's get_config(arg), an override naming no field): one line, exit
    2, nothing written."""
    proc = _run("dcae_jax.main", *args, f"--workdir={tmp_path}/w")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("main: error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "w").write_text("")
    proc = _run("dcae_jax.main", "--config=configs/tiny_test.py", f"--workdir={tmp_path}/w")
    assert proc.returncode == 2 and f"main: error: --workdir={tmp_path}/w is a file, not a folder" in proc.stderr


def test_a_diverged_run_is_one_line_naming_its_last_checkpoint(tmp_path):
    proc = _run(
        "dcae_jax.main",
        "--config=configs/tiny_test.py",
        f"--workdir={tmp_path}",
        "--config.num_steps=3",
        "--config.checkpoint_every=1",
        "--config.optim.learning_rate=1e30",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("main: stopped: "))
    assert "non-finite" in line and f"{tmp_path}/checkpoints" in line


def test_running_out_of_memory_is_one_line(capsys):
    """XLA's out-of-memory error (buried in a dispatch error repeated per device) is one line with what to change."""
    import jax

    from dcae_jax.runtime import cli

    def body():
        raise jax.errors.JaxRuntimeError(
            "INTERNAL: Error dispatching computation: " * 3 + "Out of memory allocating 254625673536 bytes.\nmore"
        )

    assert cli.guard("main", body) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "main: out of memory: Out of memory allocating 254625673536 bytes. Use a smaller batch, model or resolution, "
        "more devices, or remat (`python -m dcae_jax.aot` checks a training config's fit)"
    ]
    with pytest.raises(RuntimeError, match="something else"):  # other runtime errors keep their traceback
        cli.guard("main", lambda: (_ for _ in ()).throw(RuntimeError("something else")))


def test_debug_env_shows_the_traceback():
    proc = _run("dcae_jax.convert", "--src", "/no/such/ckpt.safetensors", "--out", "/tmp/x_never", DCAE_JAX_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_short_model_name_suggests_the_repo_id():
    from dcae_jax.autoencoder.pretrained import DCAE

    with pytest.raises(FileNotFoundError, match=r"use its repo id, mit-han-lab/dc-ae-f32c32-in-1\.0-diffusers"):
        DCAE.from_pretrained("dc-ae-f32c32-in-1.0")


def test_main_help_lists_the_configs_and_their_args():
    text = _run("dcae_jax.main", "--help").stdout
    for name in ("quickstart.py", "dcae.py", "uvit.py", "latent_diffusion_quickstart.py"):
        assert f"configs/{name}:" in text
    assert "variant = f32c32" in text and "configs/common.py" not in text


def test_old_hyphenated_flag_spellings_still_work_with_a_note(capsys):
    from dcae_jax.runtime import cli

    argv = ["--batch-size", "8", "--max-images=3", "--data", "x-y", "-h", "--model=a-b", "--no-save-images"]
    got = cli.snake_case_flags(argv, "demo")
    assert got == ["--batch_size", "8", "--max_images=3", "--data", "x-y", "-h", "--model=a-b", "--nosave_images"]
    err = capsys.readouterr().err
    assert "demo: note: --batch-size is deprecated, use --batch_size" in err and "--max-images is deprecated" in err
    assert "--model" not in err and "--data" not in err


def _demo(argv, seen):
    """A command built the way every command is (`cli.run` over a fresh FlagValues)."""
    from dcae_jax.runtime import cli

    def define_flags(f):
        f.string("out", None, "Output folder.", required=True)
        f.integer("batch_size", 4, "Batch.", lower_bound=1)

    def body(flags):
        seen.append((flags.out, flags.batch_size))
        if flags.out == "missing":
            raise FileNotFoundError("missing: no such folder")
        return 0

    return cli.run("demo", "Demo command.\n\nLonger text.", define_flags, body, argv)


def test_commands_parse_into_their_own_flags_and_map_mistakes_to_exit_2(capsys):
    seen = []
    assert _demo(["--out=a", "--batch-size=8"], seen) == 0 and seen == [("a", 8)]  # the old spelling, with a note
    assert "--batch-size is deprecated, use --batch_size" in capsys.readouterr().err
    assert _demo(["--out=b"], seen) == 0 and seen[-1] == ("b", 4)  # fresh flags: nothing left from the last call
    for argv, message in (
        (["--batch_size=8"], "--out must have a value"),
        (["--out=a", "--batch_size=0"], "--batch_size=0"),
        (["--out=a", "--nope=1"], "nope"),
        (["--out=a", "stray"], "unexpected arguments: stray"),
        (["--out=missing"], "missing: no such folder"),
    ):
        assert _demo(argv, seen) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("demo: error:") and message in err[0], (argv, err)
    assert _demo(["--help"], seen) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m") and "Longer text." in out and "--batch_size" in out


def test_every_command_uses_the_one_convention():
    """absl flags through `cli.run`; no argparse, no global absl FLAGS left in any command."""
    import ast

    package = REPO / "dcae_jax"
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        if not any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body):
            continue
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
        assert "argparse" not in names and "FLAGS" not in text, path
        assert "cli.run(" in text and "cli.exit_with(main())" in text, path


def test_benchmark_flags_are_snake_case_too():
    """bench/ keeps argparse (it runs beside torch, outside the package's CLI policy) but the one spelling."""
    import re

    flags = {
        f
        for path in (REPO / "bench").glob("*.py")
        for f in re.findall(r"add_argument\(\s*\"(--[^\"]+)\"", path.read_text())
    }
    assert len(flags) > 20 and not [f for f in flags if "-" in f[2:]], sorted(flags)


def _readme_commands(name: str = "README.md") -> list[tuple[str, set[str]]]:
    """(module, flags) for every `python -m dcae_jax...` command in a markdown file (continued lines joined)."""
    text = (REPO / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"python -m (dcae_jax(?:\.\w+)+)((?:\s+(?!python )[^\s#&|;]+)*)", line):
            out.append((m.group(1), set(re.findall(r"(?<!\S)--([a-z_0-9]+)", m.group(2)))))
    return out


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))])
def test_every_documented_command_exists_and_its_flags_are_defined(doc):
    """README's and docs' commands name real commands (whose --help test_help_exits_zero runs) and only flags
    they define."""
    import importlib

    from absl import flags

    from dcae_jax.runtime import cli

    commands = _readme_commands(doc)
    assert len(commands) >= (15 if doc == "README.md" else 0), commands
    for module, used in commands:
        assert module in COMMANDS, f"README runs {module}, which is not a command"
        values = flags.FlagValues()
        importlib.import_module(module).define_flags(cli.Flags(values))
        unknown = used - set(values) - {"help"}
        assert not unknown, f"README passes {sorted(unknown)} to {module}, which defines {sorted(values)}"


def test_no_tpu_probe_on_a_machine_without_one():
    """With libtpu installed (test requirements) but no TPU, a command starts JAX on the CPU without libtpu's
    metadata-server probe and its alarming log lines."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: nothing would probe")
    code = "from dcae_jax.runtime import cli; print(cli.skip_absent_tpu()); import jax; print(jax.devices())"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.startswith("False"):  # a TPU VM or a GPU plugin: nothing to skip
        pytest.skip(f"this machine has an accelerator or its plugin: {proc.stdout.strip()}")
    assert "CpuDevice" in proc.stdout and "libtpu" not in proc.stderr and "TPU" not in proc.stderr, proc.stderr


_POLICY = (
    "from dcae_jax.runtime import cli, compute\n"
    "def body(flags):\n"
    "    print(compute.host_malloc())\n"
    "cli.exit_with(cli.run('probe', 'A probe.', lambda f: None, body, {argv}))\n"
)


@pytest.mark.parametrize(("argv", "want"), [("None", "reuse"), ("[]", "system")])
def test_a_command_owning_its_process_sets_the_host_allocator(argv, want):
    """Started from the command line (argv None) a command applies the allocator policy before JAX starts;
    called as `main(argv)` inside another program (a test) it leaves that process's allocator alone."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the policy needs glibc's mallopt")
    env = {k: v for k, v in os.environ.items() if k not in ("DCAE_JAX_HOST_MALLOC", "GLIBC_TUNABLES")}
    proc = subprocess.run(
        [sys.executable, "-c", _POLICY.format(argv=argv)],
        cwd=REPO,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [want]


def test_a_bad_host_allocator_setting_is_one_line_and_exit_2():
    code = _POLICY.format(argv="None")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "DCAE_JAX_HOST_MALLOC": "jemalloc"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "probe: error: $DCAE_JAX_HOST_MALLOC='jemalloc': use one of auto, reuse, system"
    ]
