"""LPIPS: parity with the `lpips` package (random torchvision trunks, its shipped v0.1 heads) on real photos,
plus converter errors, the .npz roundtrip and the missing-file message.

The parity tests need torch + torchvision + lpips and skip without them; nothing is downloaded (the trunk is
randomly initialized with `pnet_rand=True`, the heads are the files inside the lpips package).
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data
from skimage.transform import resize

from dcae_jax.metrics.lpips import (
    BACKBONES,
    LPIPS,
    convert_files,
    convert_lpips_weights,
    default_lin_path,
    get_backbone,
    load_lpips,
    save_lpips_weights,
    unit_normalize,
    weight_entries,
)

ABS_TOL = 1e-5
REL_TOL = 1e-4


def _random_state_dicts(net: str, seed: int = 0) -> tuple[dict, dict]:
    """torch-format (numpy) trunk and head state dicts with the right keys and shapes."""
    rng = np.random.default_rng(seed)
    sds: dict[str, dict] = {"backbone": {}, "lin": {}}
    for source, table in weight_entries(net).items():
        for e in table:
            sds[source][e.torch[0]] = rng.standard_normal(e.torch_shape).astype(np.float32) * 0.1
    return sds["backbone"], sds["lin"]


# ----------------------------------------------------------------------------------------------
# Without torch.


def test_registry_and_unknown_net():
    assert sorted(BACKBONES) == ["alex", "vgg"]
    assert BACKBONES["vgg"].tap_channels == (64, 128, 256, 512, 512)
    assert BACKBONES["alex"].tap_channels == (64, 192, 384, 256, 256)
    with pytest.raises(ValueError, match=r"unknown LPIPS network 'squeeze'.*\['alex', 'vgg'\]"):
        get_backbone("squeeze")
    with pytest.raises(ValueError, match="valid names"):
        LPIPS("resnet").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3)))


def test_torchvision_key_layout():
    keys = [e.torch[0] for e in weight_entries("vgg")["backbone"] if e.torch[0].endswith("weight")]
    assert [int(k.split(".")[1]) for k in keys] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    keys = [e.torch[0] for e in weight_entries("alex")["backbone"] if e.torch[0].endswith("weight")]
    assert [int(k.split(".")[1]) for k in keys] == [0, 3, 6, 8, 10]
    assert weight_entries("alex")["backbone"][0].torch_shape == (64, 3, 11, 11)


def test_convert_layout_and_ignored_classifier():
    bb, lin = _random_state_dicts("alex")
    bb["classifier.1.weight"] = np.zeros((4096, 9216), np.float32)  # in the published file; dropped
    params = convert_lpips_weights(bb, lin, "alex")["params"]
    trunk = params["trunk"]
    np.testing.assert_array_equal(trunk["features_3"]["kernel"], bb["features.3.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(trunk["features_3"]["bias"], bb["features.3.bias"])
    np.testing.assert_array_equal(params["lin2"]["kernel"][0, 0, :, 0], lin["lin2.model.1.weight"][0, :, 0, 0])
    assert set(trunk) == {"features_0", "features_3", "features_6", "features_8", "features_10"}
    assert set(params) == {"trunk"} | {f"lin{i}" for i in range(5)}
    # The converted tree is exactly what the module creates.
    x = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(LPIPS("alex").init, jax.random.key(0), x, x)
    assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(np.shape, {"params": params})


def test_convert_errors():
    bb, lin = _random_state_dicts("vgg")
    del bb["features.0.bias"]
    bb["features.99.weight"] = np.zeros(1)
    lin["lin0.model.1.weight"] = np.zeros((1, 32, 1, 1))
    lin["lins.0.model.1.weight"] = lin["lin1.model.1.weight"]  # a whole lpips state dict is not a heads file
    with pytest.raises(ValueError) as err:
        convert_lpips_weights(bb, lin, "vgg")
    msg = str(err.value)
    assert "backbone state dict: missing keys (1): ['features.0.bias']" in msg
    assert "backbone state dict: unexpected keys (1): ['features.99.weight']" in msg
    assert "lin state dict: unexpected keys (1): ['lins.0.model.1.weight']" in msg
    assert "lin0.model.1.weight: shape (1, 32, 1, 1), expected (1, 64, 1, 1)" in msg

    # AlexNet weights for the VGG trunk: every mismatch listed in one message.
    bb, lin = _random_state_dicts("alex")
    with pytest.raises(ValueError) as err:
        convert_lpips_weights(bb, lin, "vgg")
    msg = str(err.value)
    assert msg.startswith("cannot convert LPIPS 'vgg' weights:")
    assert "features.0.weight: shape (64, 3, 11, 11), expected (64, 3, 3, 3)" in msg
    assert "missing keys (22):" in msg and "(+10 more)" in msg and "unexpected keys (6):" in msg
    with pytest.raises(ValueError, match="valid names"):
        convert_lpips_weights(bb, lin, "squeeze")


def test_npz_roundtrip_and_identity(tmp_path):
    net = "alex"
    bb, lin = _random_state_dicts(net)
    variables = convert_lpips_weights(bb, lin, net)
    path = tmp_path / "sub" / "lpips_alex.npz"
    save_lpips_weights(variables, path, net)
    assert path.is_file()
    module, loaded = load_lpips(path)
    assert module == LPIPS(net="alex")
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)

    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 40, 48, 3)), jnp.float32)
    d_same, d_diff = (np.asarray(module.apply(loaded, x, y)) for y in (x, x[::-1]))  # eager: exact 0 like torch
    assert d_same.shape == (2,) and np.all(d_same == 0.0)
    assert np.all(d_diff > 0)

    with pytest.raises(ValueError, match=r"not LPIPS 'vgg' variables"):
        save_lpips_weights(variables, tmp_path / "x.npz", "vgg")
    np.savez(tmp_path / "bad.npz", a=np.zeros(1))
    with pytest.raises(ValueError, match="no 'net' entry"):
        load_lpips(tmp_path / "bad.npz")


def test_missing_file_message(tmp_path):
    path = tmp_path / "lpips_vgg.npz"
    with pytest.raises(FileNotFoundError) as err:
        load_lpips(path)
    msg = str(err.value)
    assert str(path) in msg and "Nothing is downloaded" in msg and "python -m dcae_jax.fetch_weights" in msg
    assert "wget https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert f"python -m dcae_jax.convert_weights --lpips=vgg --backbone=vgg16-397923af.pth --out={path}" in msg
    assert "alexnet" not in msg
    # A name that does not say which net: both recipes.
    with pytest.raises(FileNotFoundError, match=r"(?s)--lpips=alex .*--lpips=vgg "):
        load_lpips(tmp_path / "weights.npz")


def test_too_small_and_shape_errors():
    x = jnp.zeros((1, 24, 24, 3))
    with pytest.raises(ValueError, match=r"too small for MaxPool\(kernel=3, stride=2\) of the alex trunk"):
        LPIPS("alex").init(jax.random.key(0), x, x)
    with pytest.raises(ValueError, match="image shapes differ"):
        LPIPS("alex").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 60, 3)))


def test_gradient_through_dead_features():
    """Training use: gradients w.r.t. the input stay finite where whole feature vectors are zero."""
    bb, lin = _random_state_dicts("alex")
    bb = {k: np.abs(v) * (-1 if k.endswith("bias") else 1) for k, v in bb.items()}  # negative biases: dead ReLUs
    variables = convert_lpips_weights(bb, lin, "alex")
    x0, x1 = -jnp.ones((1, 64, 64, 3)), jnp.full((1, 64, 64, 3), 0.1)
    g = jax.jit(jax.grad(lambda a: LPIPS("alex").apply(variables, a, x1).sum()))(x0)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_a_loss_against_fixed_targets_runs_no_backward_pass_for_the_targets(net):
    """The two inputs go through the trunk separately, so the gradient w.r.t. x0 alone (a training loss) costs the
    two forward passes plus x0's backward pass, not a backward pass of both batches (XLA's FLOP count, nothing run).
    """
    model = LPIPS(net=net)
    x = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, x)

    def flops(fn):
        cost = jax.jit(fn).lower(variables, x, x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]

    forward = flops(lambda v, a, b: model.apply(v, a, b).sum())
    grad = flops(jax.grad(lambda v, a, b: model.apply(v, a, b).sum(), argnums=1))
    # One pass's forward is half of `forward`; an input gradient costs about one more forward of x0 (two with the
    # targets' backward too, as a single pass of both batches did: grad / forward = 2).
    assert 1.3 < grad / forward < 1.75, grad / forward


def test_unit_normalize_finite_gradient_at_zero():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 8)), jnp.float32).at[0, 0, 0].set(0.0)
    y = unit_normalize(x)
    ref = x / (jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)) + 1e-10)
    np.testing.assert_array_equal(y, ref)
    g = jax.grad(lambda v: jnp.sum(unit_normalize(v) ** 2 * jnp.arange(8.0)))(x)
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------------------------
# Parity with the lpips package (torch + torchvision + lpips).


def _photo(name: str, hw: tuple[int, int]) -> np.ndarray:
    img = getattr(data, name)()
    return resize(img, hw, anti_aliasing=True).astype(np.float32)  # [0, 1]


def _distort(a: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "same":
        b = a
    elif kind == "noise":
        b = a + rng.normal(0, 0.05, a.shape)
    elif kind == "blur":
        b = ndimage.gaussian_filter(a, (1.0, 1.0, 0))
    elif kind == "shift":
        b = np.roll(a, (2, -3), axis=(0, 1))
    elif kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(np.rint(a * 255).astype(np.uint8)).save(buf, format="JPEG", quality=15)
        b = np.asarray(Image.open(buf), np.float32) / 255
    elif kind == "contrast":
        b = 0.5 + 0.6 * (a - 0.5)
    return np.clip(b, 0, 1).astype(np.float32)


PHOTOS = ["astronaut", "coffee", "chelsea"]
KINDS = ["same", "noise", "blur", "shift", "jpeg", "contrast"]


def _pairs(hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every photo against each distortion of itself, plus the photos against each other; in [-1, 1]."""
    rng = np.random.default_rng(0)
    photos = [_photo(n, hw) for n in PHOTOS]
    a = [p for p in photos for _ in KINDS] + photos
    b = [_distort(p, k, rng) for p in photos for k in KINDS] + photos[1:] + photos[:1]
    return np.stack(a) * 2 - 1, np.stack(b) * 2 - 1


@pytest.fixture(scope="module")
def lpips_pkg():
    pytest.importorskip("torchvision")
    return pytest.importorskip("lpips")


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips passes torchvision's deprecated `pretrained=`
@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_parity_with_lpips_package(lpips_pkg, net, tmp_path):
    import torch

    torch.manual_seed(0)
    # pnet_rand=True: random torchvision trunk (no download); pretrained=True: the package's own v0.1 heads.
    ref = lpips_pkg.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    # The trunk in torchvision's key layout (lpips stores it as net.slice{k}.{index}.*), saved like the published
    # file, then the converter (with lin defaulting to the heads inside the lpips package) and load_lpips.
    trunk = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
    torch.save(trunk, tmp_path / BACKBONES[net].torchvision_file)
    out = tmp_path / f"lpips_{net}.npz"
    lin = default_lin_path(net) if net == "vgg" else None  # explicit for one net, the default for the other
    convert_files(net, tmp_path / BACKBONES[net].torchvision_file, lin, out)
    module, variables = load_lpips(out)
    assert module.net == net
    apply = jax.jit(module.apply)

    for hw in [(64, 64), (96, 80)]:
        x0, x1 = _pairs(hw)
        with torch.no_grad():
            t0, t1 = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (x0, x1))
            want = ref(t0, t1).flatten().numpy().astype(np.float64)
        got = np.asarray(apply(variables, jnp.asarray(x0), jnp.asarray(x1)), np.float64)
        err = np.abs(got - want)
        nz = want > 0
        print(
            f"{net} {hw}: distances {want[nz].min():.4g}..{want.max():.4g}, max abs err {err.max():.3g}, "
            f"max rel err {np.max(err[nz] / want[nz]):.3g}"
        )
        np.testing.assert_allclose(got, want, atol=ABS_TOL, rtol=0)
        np.testing.assert_allclose(got[nz], want[nz], rtol=REL_TOL)
        same = np.arange(len(PHOTOS)) * len(KINDS)  # the "same" pairs: exactly 0 in torch, ~1e-17 under jit (FMA)
        assert np.all(want[same] == 0.0) and np.all(got[same] < 1e-12)
        assert np.all(nz[np.setdiff1d(np.arange(len(want)), same)])
