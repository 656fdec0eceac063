"""Runs notebooks/reconstruction_demo.ipynb headless on a tiny random model (offline, same code path)."""

import pathlib
import shutil

import jax
import pytest

from dcae_jax.autoencoder.model import init_variables, tiny_config
from dcae_jax.autoencoder.pretrained import DCAE

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "reconstruction_demo.ipynb"


def _inject_parameters(nb, params: dict) -> None:
    """Adds a cell after the one tagged `parameters` that overrides them (what papermill does)."""
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_notebook_installs_like_colab_and_runs_offline_on_tiny_model(tmp_path, monkeypatch):
    """As on Colab: dcae_jax is not importable, so the install cell pip-installs DCAE_JAX_SOURCE (here a copy of
    this checkout, into a target folder, no dependencies: the test environment has them); then the demo runs on a
    local export (offline)."""
    config = tiny_config()
    variables = init_variables(config, jax.random.key(0))
    model_dir = str(DCAE(config, variables).save_pretrained(tmp_path / "tiny"))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dcae_jax", src / "dcae_jax", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    run_dir = tmp_path / "colab"  # not a checkout
    run_dir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    pip_args = ["--no-deps", "--no-build-isolation", "--target", str(site)]
    params = {"DCAE_JAX_SOURCE": str(src), "DCAE_JAX_PIP_ARGS": pip_args, "MODEL": model_dir, "MODELS": [model_dir]}
    _inject_parameters(nb, {**params, "RESOLUTION": 32, "IMAGE": None})
    # The kernel is a child process: no checkout on its path, JAX on CPU, matplotlib headless.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
    )
    client.execute()

    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    assert f"dcae_jax from {site / 'dcae_jax'}" in text  # the installed copy, not the checkout
    assert "input (1, 32, 32, 3)" in text
    assert "latent (1, 4, 4, 8)" in text
    assert "PSNR" in text and "SSIM" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # single-model figure + comparison figure
