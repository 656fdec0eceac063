"""The fine-tuning recipes (configs/finetune.py) on a converted full-size released architecture.

A diffusers checkpoint of dc-ae-f32c32-sana-1.1 with random weights stands in for the released one (nothing
downloads here); each recipe runs its documented command for two steps at 32x32 and must keep what it promises.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from cpu_jobs import with_fast_compile

from dcae_jax import DCAE
from dcae_jax.autoencoder.model import init_variables, tiny_config
from dcae_jax.data import images
from dcae_jax.data import pipeline as input_pipeline
from dcae_jax.training import optim

REPO = pathlib.Path(__file__).resolve().parents[2]
RELEASED = "dc-ae-f32c32-sana-1.1"


def _load_recipe(arg: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_config", REPO / "configs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory) -> pathlib.Path:
    """A diffusers directory of the released architecture, random weights (and random norm scales)."""
    from torch_reference import make_torch_model

    from dcae_jax.autoencoder.model import get_config

    d = tmp_path_factory.mktemp("hub") / f"{RELEASED}-diffusers"
    make_torch_model(get_config(RELEASED)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def released(released_dir) -> DCAE:
    return DCAE.from_pretrained(released_dir)


def _finetune(released_dir: pathlib.Path, workdir: pathlib.Path, args: str) -> DCAE:
    config = f"configs/finetune.py:{args},model={released_dir},data=bundled,runlocal=True,resolution=32,steps=2"
    # Held-out LPIPS/rFID need the Inception and AlexNet compiles: covered by the trainer's own tests.
    cmd = [sys.executable, "-m", "dcae_jax.main", f"--config={config}", f"--workdir={workdir}"]
    cmd += ["--config.eval_rfid=False", "--config.eval_lpips=False"]
    # Compile time only (the bigmem run otherwise compiles with XLA's defaults): the recipes' training, not numerics.
    env = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": with_fast_compile(os.environ.get("XLA_FLAGS", ""))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return DCAE.from_pretrained(workdir / "export")


def _changed(before: DCAE, after: DCAE) -> dict[str, bool]:
    """{param path: whether any value differs} over every parameter."""
    flat_a = {optim.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(before.variables["params"])}
    flat_b = {optim.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(after.variables["params"])}
    assert flat_a.keys() == flat_b.keys()
    return {k: not np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k])) for k in flat_a}


def _photos(n: int = 2, size: int = 64) -> np.ndarray:
    return np.stack([images.load_image(p, size) for p in input_pipeline.bundled_photos("validation")[:n]])


@pytest.mark.bigmem
def test_decoder_recipe_keeps_every_latent_bit_identical(released_dir, released, tmp_path, genuine_weights):
    tuned = _finetune(released_dir, tmp_path / "wd", "recipe=decoder,gan=True")
    changed = _changed(released, tuned)
    assert not any(v for k, v in changed.items() if k.startswith("encoder/")), "the encoder moved"
    decoder = [v for k, v in changed.items() if k.startswith("decoder/")]
    assert sum(decoder) > 0.9 * len(decoder), f"only {sum(decoder)}/{len(decoder)} decoder parameters trained"
    x = _photos()
    np.testing.assert_array_equal(np.asarray(tuned.encode(x)), np.asarray(released.encode(x)))
    assert not np.array_equal(np.asarray(tuned.reconstruct(x)), np.asarray(released.reconstruct(x)))
    assert tuned.config.scaling_factor == released.config.scaling_factor  # same latent space, same factor
    # What our trainer wrote goes back to PyTorch: diffusers' loader takes it and decodes our latents as we do.
    import torch
    from diffusers import AutoencoderDC

    exported = AutoencoderDC.from_pretrained(tuned.save_pretrained(tmp_path / "diffusers", format="diffusers")).eval()
    z = np.asarray(tuned.encode(x))
    with torch.no_grad():
        y = exported.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    assert np.abs(y - np.asarray(tuned.decode(z))).max() <= 1e-4
    n_decoder = sum(int(a.size) for a in jax.tree_util.tree_leaves(released.variables["params"]["decoder"]))
    assert f"| **all** | **{n_decoder:,}** |" in (tmp_path / "wd" / "trainable_params.md").read_text()


@pytest.mark.bigmem
def test_full_recipe_trains_every_layer(released_dir, released, tmp_path, genuine_weights):
    changed = _changed(released, _finetune(released_dir, tmp_path / "wd", "recipe=full"))
    frozen = [k for k, v in changed.items() if not v]
    assert len(frozen) < 0.02 * len(changed), f"{len(frozen)} parameters did not move: {frozen[:10]}"


@pytest.mark.bigmem
def test_highres_recipe_trains_only_the_latent_adjacent_layers(released_dir, released, tmp_path, genuine_weights):
    changed = _changed(released, _finetune(released_dir, tmp_path / "wd", "recipe=highres"))
    adjacent = ("encoder/project_out/", "decoder/project_in/")
    assert all(v for k, v in changed.items() if k.startswith(adjacent))
    assert not any(v for k, v in changed.items() if not k.startswith(adjacent))


def test_recipe_config_defaults_and_errors(tmp_path):
    dec = _load_recipe("recipe=decoder,model=dc-ae-f64c128-in-1.0,data=folder:/data/x")
    assert dec.init_from == "mit-han-lab/dc-ae-f64c128-in-1.0-diffusers" and dec.model.variant == "dc-ae-f64c128-in-1.0"
    assert dec.trainable[0] == ("decoder/.*", "train") and not dec.train_batch_norm and not dec.disc.enabled
    assert dec.loss.lpips_weight > 0 and dec.optim.weight_decay == 0 and dec.data.train == "folder:/data/x"
    assert _load_recipe("recipe=decoder,gan=True").disc.enabled
    local = _load_recipe("model=/ckpts/my-export")
    assert local.init_from == "/ckpts/my-export" and local.model.variant == ""  # the architecture read from it
    hi = _load_recipe("recipe=highres,model=dc-ae-f32c32-in-1.0,adapt_stages=1")
    assert hi.resolution == 1024 and ("(encoder|decoder)/stage_(5)_.*", "train") in hi.trainable
    with pytest.raises(KeyError, match="valid: \\['decoder', 'full', 'highres'\\]"):
        _load_recipe("recipe=encoder")
    # A local checkpoint's stage count is read from its config (the tiny model has 4 stages).
    cfg = tiny_config()
    ckpt = DCAE(cfg, init_variables(cfg, jax.random.key(0))).save_pretrained(tmp_path / "tiny")
    local_hi = _load_recipe(f"recipe=highres,model={ckpt},adapt_stages=1")
    assert ("(encoder|decoder)/stage_(3)_.*", "train") in local_hi.trainable
    with pytest.raises(FileNotFoundError, match="/ckpts/x"):
        _load_recipe("recipe=highres,model=/ckpts/x,adapt_stages=2")
