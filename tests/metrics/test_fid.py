"""FID: pool3 parity with pytorch-fid (random weights, real photos), Fréchet distance parity, streaming statistics,
stats-file interchange with pytorch-fid, the converter, the .npz weights file and its missing-file message.

Parity tests need torch + torchvision + pytorch-fid and skip without them. Nothing is downloaded: pytorch-fid's
`load_state_dict_from_url` is patched to return random weights in the published file's key layout, which its
strict `load_state_dict` then checks against the real network.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data

from dcae_jax.metrics import fid
from dcae_jax.metrics.fid import (
    FeatureStats,
    FIDInception,
    allreduce_stats,
    convert_fid_inception,
    frechet_distance,
    init_fid_variables,
    load_fid_inception,
    load_stats,
    resize_bilinear,
    save_fid_weights,
    save_stats,
    weight_entries,
)

FEATURE_REL_TOL = 1e-4  # max |ours - pytorch-fid| / max |pytorch-fid| over the pool3 features
FRECHET_REL_TOL = 1e-6


def random_torch_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """pytorch-fid's key layout (incl. the unused 1008-way `fc`) with He-scaled convs and random BatchNorm stats."""
    rng = np.random.default_rng(seed)
    sd = {}
    for e in weight_entries():
        k, shape = e.torch[0], e.torch_shape
        if k.endswith("conv.weight"):
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif k.endswith("bn.weight"):
            v = rng.uniform(0.5, 1.5, shape)
        elif k.endswith(("bn.bias", "running_mean")):
            v = rng.normal(0.0, 0.1, shape)
        else:  # running_var
            v = rng.uniform(0.5, 2.0, shape)
        sd[k] = v.astype(np.float32)
    sd["fc.weight"] = rng.normal(0.0, 0.01, (1008, 2048)).astype(np.float32)
    sd["fc.bias"] = np.zeros(1008, np.float32)
    return sd


def _photos(hw: tuple[int, int], names=("astronaut", "coffee")) -> np.ndarray:
    """Real photos resized (BOX) to hw: (N, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.fromarray(getattr(data, n)()).resize(hw[::-1], Image.BOX)) for n in names])


def _random_stats(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------------------------
# Without torch.


def test_weight_layout():
    entries = {e.torch[0]: e for e in weight_entries()}
    assert len(entries) == 94 * 5  # 94 BasicConv2d: conv weight + BN weight, bias, running mean, running var
    assert entries["Conv2d_1a_3x3.conv.weight"].torch_shape == (32, 3, 3, 3)
    assert entries["Mixed_6b.branch7x7_2.conv.weight"].torch_shape == (128, 128, 1, 7)
    assert entries["Mixed_6b.branch7x7_3.conv.weight"].torch_shape == (192, 128, 7, 1)
    assert entries["Mixed_7c.branch_pool.conv.weight"].torch_shape == (192, 2048, 1, 1)
    assert entries["Mixed_5b.branch_pool.bn.running_var"].path == (
        "batch_stats",
        "Mixed_5b",
        "branch_pool",
        "bn",
        "var",
    )
    assert entries["Mixed_7b.branch3x3dbl_3a.bn.weight"].path[-2:] == ("bn", "scale")
    n = sum(int(np.prod(e.torch_shape)) for e in entries.values() if e.path[0] == "params")
    assert n == 21_785_568  # torchvision's Inception3 without fc and AuxLogits


def test_convert_layout_and_ignored_keys():
    sd = random_torch_state_dict()
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # newer torch saves: accepted, dropped
    v = convert_fid_inception(sd)
    assert set(v) == {"params", "batch_stats"}
    p = v["params"]["Mixed_6b"]["branch7x7_2"]
    np.testing.assert_array_equal(p["conv"]["kernel"], sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    assert p["conv"]["kernel"].shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(p["bn"]["scale"], sd["Mixed_6b.branch7x7_2.bn.weight"])
    np.testing.assert_array_equal(
        v["batch_stats"]["Mixed_6b"]["branch7x7_2"]["bn"]["mean"], sd["Mixed_6b.branch7x7_2.bn.running_mean"]
    )
    # The converted tree is exactly what the module creates.
    shapes = jax.eval_shape(FIDInception().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 80, 80, 3), jnp.uint8))
    assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(np.shape, v)


def test_convert_errors():
    sd = random_torch_state_dict()
    del sd["Mixed_7c.branch_pool.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    sd["Mixed_5b.branch_pool.conv.weight"] = np.zeros((64, 192, 1, 1), np.float32)  # Mixed_5c's pool width
    with pytest.raises(ValueError) as err:
        convert_fid_inception(sd)
    msg = str(err.value)
    assert "missing keys (1): ['Mixed_7c.branch_pool.bn.running_var']" in msg
    assert "unexpected keys (1): ['AuxLogits.fc.weight']" in msg
    assert "Mixed_5b.branch_pool.conv.weight: shape (64, 192, 1, 1), expected (32, 192, 1, 1)" in msg
    # pytorch-fid's InceptionV3 wrapper keys (blocks.*) are not the published file: everything listed, capped.
    wrapped = {f"blocks.0.{k}": v for k, v in random_torch_state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys \(470\): .*\(\+458 more\)\n  unexpected keys \(472\):"):
        convert_fid_inception(wrapped)


def test_npz_roundtrip_and_errors(tmp_path):
    variables = init_fid_variables(0)
    path = tmp_path / "sub" / "fid_inception.npz"
    save_fid_weights(variables, path)
    module, loaded = load_fid_inception(path)
    assert module == FIDInception()
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    with pytest.raises(ValueError, match="not FID Inception variables"):
        save_fid_weights({"params": variables["params"]}, tmp_path / "x.npz")
    np.savez(tmp_path / "lpips_like.npz", net=np.array("alex"))
    with pytest.raises(ValueError, match="not a dcae_jax FID Inception weights file"):
        load_fid_inception(tmp_path / "lpips_like.npz")
    # The other way round: the Inception file given as LPIPS weights is named in one short line.
    from dcae_jax.metrics.lpips import load_lpips

    with pytest.raises(ValueError, match=r"not an LPIPS weights file \(it is a 'fid_inception.*keys \(\d+\): ") as e:
        load_lpips(path)
    assert len(str(e.value).replace(str(path), "")) < 400 and "more)" in str(e.value)  # one short line (was 25,000)
    # Not an .npz at all (numpy would call it pickled data), and a truncated one: both name the file.
    (tmp_path / "notes.npz").write_text("mu, sigma")
    with pytest.raises(ValueError, match=r"notes\.npz: not a \.npz file \(9 bytes"):
        load_stats(tmp_path / "notes.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut\.npz: unreadable \.npz file"):
        load_fid_inception(tmp_path / "cut.npz")


def test_missing_file_message(tmp_path):
    path = tmp_path / "fid_inception.npz"
    with pytest.raises(FileNotFoundError) as err:
        load_fid_inception(path)
    msg = str(err.value)
    assert str(path) in msg and "Nothing is downloaded" in msg
    assert (
        "wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth" in msg
    )
    assert (
        f"python -m dcae_jax.convert_weights --fid_inception=pt_inception-2015-12-05-6726825d.pth --out={path}" in msg
    )
    with pytest.raises(
        FileNotFoundError, match=r"(?s)ref\.npz: FID reference statistics not found.*python -m dcae_jax.fid_stats"
    ):
        load_stats(tmp_path / "ref.npz")


def test_input_checks():
    v = init_fid_variables(0)
    with pytest.raises(ValueError, match="expected NHWC RGB"):
        FIDInception().apply(v, jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(ValueError, match="too small"):
        FIDInception(resize_input=False).apply(v, jnp.zeros((1, 64, 64, 3)))


def test_resize_identity_and_constant():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 299, 299, 3)), jnp.float32)
    assert resize_bilinear(x, (299, 299)) is x
    c = jnp.full((2, 37, 53, 3), 0.25, jnp.float32)
    np.testing.assert_allclose(resize_bilinear(c, (299, 299)), 0.25, rtol=1e-6)


def test_frechet_distance_closed_form():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    s1, s2 = rng.uniform(0.1, 2.0, 32), rng.uniform(0.1, 2.0, 32)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-12)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(mu1, np.diag(s1), mu2[:3], np.diag(s2))


def test_frechet_distance_eig_equals_sqrtm_route():
    """Full-rank and rank-deficient (fewer samples than dimensions, as in small rFID sets) covariances."""
    from dcae_jax.metrics.fid import frechet_distance_eig, sqrt_psd

    rng = np.random.default_rng(0)
    for n, d in ((400, 64), (40, 96)):
        a = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)
        b = 0.8 * a + rng.normal(size=(n, d)) * 0.5 + 0.1
        stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
        want = frechet_distance(*stats[0], *stats[1])
        assert frechet_distance_eig(*stats[0], *stats[1]) == pytest.approx(want, rel=1e-6)
        root = sqrt_psd(stats[0][1])
        np.testing.assert_allclose(root @ root, stats[0][1], atol=1e-9)
        assert frechet_distance_eig(*stats[0], *stats[1], sqrt_sigma1=root) == pytest.approx(want, rel=1e-6)
    scale = 2 * np.trace(stats[0][1])  # the size of the terms that cancel
    assert frechet_distance_eig(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-7 * scale)


def test_feature_stats_streaming_merge_and_mask():
    rng = np.random.default_rng(0)
    d = 24
    feats = (rng.standard_normal((70, d)) * rng.uniform(0.5, 3.0, d) + rng.normal(0, 5, d)).astype(np.float32)
    want_mu, want_sigma = feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False)
    # Two "devices", batches of 8 with padding rows (garbage, mask 0) at the end of each stream.
    parts = []
    for chunk in np.array_split(feats, 2):
        s = FeatureStats(d)
        pad = 8 - len(chunk) % 8
        padded = np.concatenate([chunk, np.full((pad, d), 1e6, np.float32)])
        mask = np.concatenate([np.ones(len(chunk)), np.zeros(pad)])
        for i in range(0, len(padded), 8):
            s.update(padded[i : i + 8], mask[i : i + 8])
        parts.append(s)
    merged = parts[0].merge(parts[1])
    assert merged.count == 70 and parts[0].count == 35
    np.testing.assert_allclose(merged.mean, want_mu, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(merged.cov, want_sigma, rtol=1e-11, atol=1e-11)
    assert merged.mean.dtype == np.float64 and merged.cov.dtype == np.float64
    # One process: the all-reduce is an exact copy.
    reduced = allreduce_stats(merged)
    assert reduced.count == 70 and reduced is not merged
    np.testing.assert_array_equal(reduced.total_outer, merged.total_outer)
    # Errors.
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(d).update(feats[:1]).cov  # noqa: B018
    with pytest.raises(ValueError, match="dimension 24, stats have 8"):
        FeatureStats(8).update(feats)
    with pytest.raises(ValueError, match="mask has 3 entries for 70"):
        FeatureStats(d).update(feats, np.ones(3))


def test_stats_file_roundtrip_and_errors(tmp_path):
    mu, sigma = _random_stats(np.random.default_rng(0), 40, 8)
    save_stats(tmp_path / "a" / "stats.npz", mu, sigma)
    m2, s2 = load_stats(tmp_path / "a" / "stats.npz")
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    with np.load(tmp_path / "a" / "stats.npz") as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == np.float64
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"needs 'mu' and 'sigma'.*\['mean'\]"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="not"):
        save_stats(tmp_path / "c.npz", mu, sigma[:3])
    assert load_stats(tmp_path / "a" / "stats.npz", dim=8)[0].shape == (8,)
    with pytest.raises(ValueError, match=r"stats\.npz: statistics of 8-dimensional features; FID compares the Incep"):
        load_stats(tmp_path / "a" / "stats.npz", dim=2048)


# ----------------------------------------------------------------------------------------------
# Parity with pytorch-fid (torch + torchvision + pytorch-fid).


@pytest.fixture(scope="module")
def pytorch_fid():
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    return pytest.importorskip("pytorch_fid")


@pytest.fixture(scope="module")
def torch_fid_model(pytorch_fid):
    """pytorch-fid's `InceptionV3([3])` (built by `fid_inception_v3()`) with random weights, and those weights."""
    import pytorch_fid.inception as pi
    import torch

    sd = {k: torch.from_numpy(v) for k, v in random_torch_state_dict(seed=1).items()}
    mp = pytest.MonkeyPatch()
    mp.setattr(pi, "load_state_dict_from_url", lambda *a, **k: sd)  # its strict load_state_dict checks our keys
    try:
        model = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        mp.undo()
    return model, sd


@pytest.fixture(scope="module")
def fid_apply():
    """One jitted `FIDInception().apply` for the module's tests (same shapes compile once)."""
    return jax.jit(FIDInception().apply)


def test_resize_matches_torch_interpolate(pytorch_fid):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for hw in [(64, 64), (96, 128), (300, 512), (299, 150), (1, 7)]:
        x = rng.uniform(-1, 1, (1, *hw, 3)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear")
        got = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(jnp.asarray(x), (299, 299)))
        err = np.abs(got - want.permute(0, 2, 3, 1).numpy()).max()
        assert err < 1e-6, (hw, err)


def test_pool3_parity_with_pytorch_fid(torch_fid_model, fid_apply, tmp_path):
    """Real photos, upsampled (float input) and downsampled (uint8 input), batch 2, through the converter CLI."""
    import torch

    model, sd = torch_fid_model
    src = tmp_path / "random_inception.pth"
    torch.save(sd, src)
    fid.convert_file(src, tmp_path / "fid_inception.npz")
    module, variables = load_fid_inception(tmp_path / "fid_inception.npz")
    assert module == FIDInception()
    for hw, as_uint8 in [((96, 128), False), ((320, 336), True)]:
        u8 = _photos(hw)
        x01 = u8.astype(np.float32) / 255  # pytorch-fid's input: ToTensor's [0, 1]
        with torch.no_grad():
            want = model(torch.from_numpy(x01).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
        got = np.asarray(fid_apply(variables, jnp.asarray(u8 if as_uint8 else x01 * 2 - 1)))
        assert got.shape == want.shape == (2, 2048)
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(f"pool3 {hw} uint8={as_uint8}: features 0..{want.max():.3g}, max rel err {rel:.2e}")
        assert rel < FEATURE_REL_TOL
        assert np.abs(want).max() > 0.1 and np.std(want) > 0.01  # non-degenerate random network


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_parity(pytorch_fid):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    cases = [(500, 64), (300, 256), (20, 48)]  # the last: rank-deficient covariances
    for n, d in cases:
        a, b = _random_stats(rng, n, d), _random_stats(rng, n, d)
        want = calculate_frechet_distance(*a, *b)
        got = frechet_distance(*a, *b)
        print(f"frechet n={n} d={d}: {want:.6f}, rel err {abs(got - want) / abs(want):.1e}")
        assert got == pytest.approx(want, rel=FRECHET_REL_TOL)


def test_stats_interchange_with_pytorch_fid(torch_fid_model, fid_apply, tmp_path, monkeypatch):
    """pytorch-fid `--save-stats` of a photo folder == our stats of the same images; our file reads in pytorch-fid."""
    import pytorch_fid.inception as pi
    from pytorch_fid import fid_score

    _, sd = torch_fid_model
    folder = tmp_path / "photos"
    folder.mkdir()
    u8 = _photos((320, 336))  # the parity test's shape: no new compile
    for i, img in enumerate(u8):
        Image.fromarray(img).save(folder / f"{i}.png")
    monkeypatch.setattr(pi, "load_state_dict_from_url", lambda *a, **k: sd)
    theirs = tmp_path / "theirs.npz"
    fid_score.save_fid_stats([str(folder), str(theirs)], batch_size=2, device="cpu", dims=2048, num_workers=0)

    variables = convert_fid_inception(sd)
    ours = FeatureStats().update(fid_apply(variables, jnp.asarray(u8)))
    mu_t, sigma_t = load_stats(theirs)  # pytorch-fid -> us
    assert ours.count == 2
    assert np.abs(ours.mean - mu_t).max() / np.abs(mu_t).max() < FEATURE_REL_TOL
    assert np.abs(ours.cov - sigma_t).max() / np.abs(sigma_t).max() < FEATURE_REL_TOL

    mine = tmp_path / "ours.npz"  # us -> pytorch-fid (its loader for .npz paths)
    ours.save(mine)
    m, s = fid_score.compute_statistics_of_path(str(mine), None, 1, 2048, "cpu")
    np.testing.assert_array_equal(m, ours.mean)
    np.testing.assert_array_equal(s, ours.cov)
