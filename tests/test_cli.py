"""Every command's --help exits 0; a user mistake is one line and exit 2 (a traceback only with DCAE_JAX_DEBUG=1)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
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
    "dcae_jax.studies.reproduce",
    "dcae_jax.studies.bicubic",
    "dcae_jax.convert_weights",
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


def test_debug_env_shows_the_traceback():
    proc = _run("dcae_jax.convert", "--src", "/no/such/ckpt.safetensors", "--out", "/tmp/x_never", DCAE_JAX_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_short_model_name_suggests_the_repo_id():
    from dcae_jax.pretrained import DCAE

    with pytest.raises(FileNotFoundError, match=r"use its repo id, e\.g\. mit-han-lab/dc-ae-f32c32-in-1\.0-diffusers"):
        DCAE.from_pretrained("dc-ae-f32c32-in-1.0")


def test_main_help_lists_the_configs_and_their_args():
    text = _run("dcae_jax.main", "--help").stdout
    for name in ("quickstart.py", "dcae.py", "uvit.py", "latent_diffusion_quickstart.py"):
        assert f"configs/{name}:" in text
    assert "variant = f32c32" in text and "configs/common.py" not in text


def test_old_hyphenated_flag_spellings_still_work_with_a_note(capsys):
    from dcae_jax import cli

    got = cli.snake_case_flags(["--batch-size", "8", "--max-images=3", "--data", "x-y", "-h", "--model=a-b"], "demo")
    assert got == ["--batch_size", "8", "--max_images=3", "--data", "x-y", "-h", "--model=a-b"]
    err = capsys.readouterr().err
    assert "demo: note: --batch-size is deprecated, use --batch_size" in err and "--max-images is deprecated" in err
    assert "--model" not in err and "--data" not in err
