"""Tiled (approximate) and spatially sharded (exact) inference, on the tiny config with random weights.

The sharded check needs 8 devices, which XLA:CPU only fakes when XLA_FLAGS is set before jax
starts, so it runs this file as a script in a subprocess (see `_sharded_check` at the bottom).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dcae_jax.autoencoder import inference
from dcae_jax.autoencoder.model import init_variables, tiny_config
from dcae_jax.autoencoder.pretrained import DCAE

REPO = pathlib.Path(__file__).resolve().parents[2]


def _random_variables() -> dict:
    """Tiny-config variables from `init_variables`, with BatchNorm running stats moved off (0, 1)."""
    variables = init_variables(tiny_config(), jax.random.key(0))
    rng = np.random.default_rng(0)

    def perturb(path, a):
        name = path[-1].key
        if name == "mean":
            return a + rng.normal(0.0, 0.1, a.shape).astype(np.float32)
        if name == "var":
            return a * rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        return a

    variables = dict(variables)
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])
    return variables


def _save_variables(variables: dict, path: pathlib.Path) -> None:
    np.savez(path, **{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()})


def _load_variables(path: str) -> dict:
    with np.load(path) as data:
        return traverse_util.unflatten_dict({tuple(k.split("/")): data[k] for k in data.files})


def _smooth_images(b: int, h: int, w: int, seed: int) -> np.ndarray:
    """Low-frequency colour waves plus a little noise, in [-1, 1] (more image-like than white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    waves = [
        np.sin(2 * np.pi * (rng.uniform(1, 3) * yy + rng.uniform(1, 3) * xx) + rng.uniform(0, 6)) for _ in range(3 * b)
    ]
    x = 0.8 * np.stack(waves, -1).reshape(h, w, b, 3).transpose(2, 0, 1, 3)
    return np.clip(x + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)


def _psnr(approx: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of approx vs ref with the reference's peak |value| as the signal peak."""
    return float(10 * np.log10(np.abs(ref).max() ** 2 / np.mean((approx - ref) ** 2)))


@pytest.fixture(scope="module")
def variables() -> dict:
    # Eager `init` compiles every op (~10-20 s on 2 busy cores): done once, shared with the subprocess.
    return _random_variables()


@pytest.fixture(scope="module")
def ae(variables) -> DCAE:
    """Tiny DC-AE (f8, EfficientViT stages at H/4 and H/8, head_dim 8) with random weights."""
    return DCAE(tiny_config(), variables)


# ----------------------------------------------------------------------------------------------
# Tiling.


def test_tile_layout_and_ramps():
    # 16 latent rows, tile 8, overlap >= 2: three evenly spread tiles (effective overlap 4).
    assert inference._tile_starts(16, 8, 2) == [0, 4, 8]
    assert inference._tile_starts(8, 8, 2) == [0]
    assert inference._tile_starts(17, 8, 0) == [0, 5, 9]
    starts, size, scale = [0, 4, 8], 8, 2
    weights = inference._ramp_weights(starts, size, scale)
    total = np.zeros(16 * scale)
    for s, w in zip(starts, weights, strict=True):
        total[s * scale : (s + size) * scale] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)  # two tiles per overlap: a partition of unity
    assert weights[0][0] == 1.0 and weights[-1][-1] == 1.0  # no ramp at the image border
    assert np.all(np.diff(weights[1][: 4 * scale]) > 0)  # linear ramp up over the overlap


class _LocalAE:
    """DCAE stand-in with purely local encode/decode (f x f mean pool / nearest upsample).

    Tiles are aligned to the f grid, so tiling such a model is exact: any difference from the
    untiled result is a bug in tile placement, weighting or cropping.
    """

    def __init__(self, config):
        self.config = config
        self.dtype = jnp.float32

    def encode(self, x):
        x = np.asarray(x)
        b, h, w, c = x.shape
        f = self.config.spatial_compression_ratio
        pooled = x.reshape(b, h // f, f, w // f, f, c).mean((2, 4))  # (B, h, w, 3)
        return np.concatenate([pooled, -pooled, pooled**2], -1)[..., : self.config.latent_channels]

    def decode(self, z):
        f = self.config.spatial_compression_ratio
        z = np.asarray(z)
        return np.repeat(np.repeat(z[..., :3] + z[..., 3:6] ** 2, f, axis=1), f, axis=2)


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "batch_tiles"),
    [((2, 128, 96, 3), 32, 8, 1), ((1, 137, 75, 3), 48, 16, 3), ((1, 64, 200, 3), 64, 0, 2)],
)
def test_tiling_is_exact_for_a_local_model(shape, tile, overlap, batch_tiles):
    stub = _LocalAE(tiny_config())
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    padded = inference._pad_to_multiple(x, 8)
    z = inference.tiled_encode(stub, x, tile, overlap, batch_tiles)
    np.testing.assert_allclose(z, stub.encode(padded), atol=1e-6)
    y = inference.tiled_decode(stub, z, tile, overlap, batch_tiles)
    np.testing.assert_allclose(y, stub.decode(z), atol=1e-6)


def test_single_tile_equals_plain(ae):
    x = _smooth_images(2, 64, 48, seed=0)
    z = np.asarray(ae.encode(x))
    for tile in (512, 64):  # larger than the image, and exactly the image height
        np.testing.assert_allclose(inference.tiled_encode(ae, x, tile=tile, overlap=16), z, rtol=0, atol=1e-6)
    y = np.asarray(ae.decode(z))
    np.testing.assert_allclose(inference.tiled_decode(ae, z, tile=512, overlap=64), y, rtol=0, atol=1e-6)


def test_multi_tile_close_to_untiled(ae):
    # 128x128 with 64-pixel tiles: 3x3 tiles of 8x8 latents, effective overlap 4 latents / 32 px.
    x = _smooth_images(1, 128, 128, seed=1)
    z = np.asarray(ae.encode(x))
    y = np.asarray(ae.decode(z))
    zt = inference.tiled_encode(ae, x, tile=64, overlap=16)
    yt = inference.tiled_decode(ae, z, tile=64, overlap=16)
    assert zt.shape == z.shape and yt.shape == y.shape
    assert np.isfinite(zt).all() and np.isfinite(yt).all()
    # Random weights make the attention very non-local, so tiles differ from the whole image a lot;
    # measured: encode 22.1 dB, decode 31.9 dB (no overlap: 17.7 dB, 22.4 dB).
    assert _psnr(zt, z) > 19.0
    assert _psnr(yt, y) > 29.0
    # Blending the overlaps must beat abutting tiles (same tile shape, so no extra compilation).
    assert _psnr(zt, z) > _psnr(inference.tiled_encode(ae, x, tile=64, overlap=0), z) + 2.0
    assert _psnr(yt, y) > _psnr(inference.tiled_decode(ae, z, tile=64, overlap=0), y) + 5.0


def test_sizes_not_multiple_of_f(ae):
    x = _smooth_images(1, 40, 56, seed=2)
    assert ae.reconstruct(x).shape == x.shape
    odd = x[:, :37, :53]  # edge-padded to 40x56 inside encode
    z = np.asarray(ae.encode(odd))
    assert z.shape == (1, 5, 7, 8)
    np.testing.assert_allclose(inference.tiled_encode(ae, odd), z, rtol=0, atol=1e-6)
    zt = inference.tiled_encode(ae, odd, tile=32, overlap=8)  # 2x2 tiles of 4x4 latents
    assert zt.shape == z.shape and np.isfinite(zt).all()
    rec = inference.tiled_reconstruct(ae, odd, tile=512, overlap=64)
    assert rec.shape == odd.shape
    np.testing.assert_allclose(rec, np.asarray(ae.reconstruct(odd)), rtol=0, atol=1e-5)


def test_tiling_argument_errors(ae):
    x = np.zeros((1, 64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="multiples of the compression factor 8"):
        inference.tiled_encode(ae, x, tile=60)
    with pytest.raises(ValueError, match="overlap < tile"):
        inference.tiled_decode(ae, np.zeros((1, 8, 8, 8), np.float32), tile=64, overlap=64)
    with pytest.raises(ValueError, match=r"3 channels, got shape \(1, 64, 64, 4\)"):
        inference.tiled_encode(ae, np.zeros((1, 64, 64, 4), np.float32))


# ----------------------------------------------------------------------------------------------
# Sharding.


def test_make_spatial_mesh_and_errors(ae):
    mesh = inference.make_spatial_mesh()
    assert mesh.shape == {"space": jax.device_count()}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    with pytest.raises(ValueError, match="devices are available"):
        inference.make_spatial_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="no axis 'rows'"):
        inference.sharded_encode(ae, np.zeros((1, 64, 64, 3), np.float32), mesh, axis="rows")


def _sharded_check(variables_file: str) -> dict:
    """Runs in a subprocess with 8 fake CPU devices: sharded vs single-device errors, as JSON."""
    assert jax.device_count() == 8, jax.devices()
    ae = DCAE(tiny_config(), _load_variables(variables_file))
    mesh = inference.make_spatial_mesh()
    # 60x7 is edge-padded to 64x8: latent 8x1, one latent row per device. The encoder's and
    # decoder's EfficientViT stages then see 16x2 = 32 tokens (linear attention) and
    # 8x1 = 8 <= head_dim tokens (quadratic attention), so both attention paths are sharded.
    x = _smooth_images(2, 60, 7, seed=3)
    z_ref = np.asarray(ae.encode(x))
    y_ref = np.asarray(ae.decode(z_ref))
    z_sh = inference.sharded_encode(ae, x, mesh)
    y_sh = inference.sharded_decode(ae, z_ref, mesh)
    inference.sharded_encode(ae, x, mesh)  # a second call must reuse the compiled function
    encode_fn = inference._sharded_fn(ae, mesh, "space", "encode")
    errors = {}
    for name, bad in (("encode", np.zeros((1, 56, 8, 3), np.float32)), ("decode", np.zeros((1, 6, 2, 8), np.float32))):
        try:
            getattr(inference, f"sharded_{name}")(ae, bad, mesh)
        except ValueError as err:
            errors[name] = str(err)
    return {
        "z_shape": list(z_sh.shape),
        "y_shape": list(y_sh.shape),
        "z_spec": str(z_sh.sharding.spec),
        "z_devices": len(z_sh.sharding.device_set),
        "z_err": float(np.abs(np.asarray(z_sh) - z_ref).max()),
        "y_err": float(np.abs(np.asarray(y_sh) - y_ref).max()),
        "z_scale": float(np.abs(z_ref).max()),
        "y_scale": float(np.abs(y_ref).max()),
        "encode_compilations": encode_fn._cache_size(),
        "errors": errors,
    }


def test_sharded_matches_single_device_on_8_cpu_devices(variables, tmp_path):
    variables_file = tmp_path / "variables.npz"
    _save_variables(variables, variables_file)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, str(variables_file)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["z_shape"] == [2, 8, 1, 8] and result["y_shape"] == [2, 64, 8, 3]
    assert result["z_spec"] == str(jax.sharding.PartitionSpec(None, "space", None, None))
    assert result["z_devices"] == 8
    # Exact up to float summation order (measured: ~4e-6 on latents of magnitude ~5).
    assert result["z_err"] <= 1e-5, result
    assert result["y_err"] <= 1e-5, result
    assert result["encode_compilations"] == 1
    assert "(1, 56, 8, 3)" in result["errors"]["encode"] and "f*n = 64" in result["errors"]["encode"]
    assert "(1, 6, 2, 8)" in result["errors"]["decode"]


if __name__ == "__main__":
    print(json.dumps(_sharded_check(sys.argv[1])))
