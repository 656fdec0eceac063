"""The one PyTorch-weights mechanism: reading files, key tables, layouts both ways, and one report of every problem."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from dcae_jax.runtime import state_dict as sd


def _table():
    return [
        sd.key(("params", "conv", "kernel"), "conv.weight", "conv", (4, 3, 3, 3)),
        sd.key(("params", "conv", "bias"), "conv.bias", "copy", (4,)),
        sd.key(("params", "dense", "kernel"), "fc.weight", "linear", (5, 4)),
        sd.Key(("params", "qkv", "kernel"), ("q.weight", "k.weight", "v.weight"), "linear_as_1x1"),
        sd.key(None, "pos", "copy", (2,)),
    ]


def _state(rng):
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((5, 4)).astype(np.float32),
        **{f"{n}.weight": rng.standard_normal((6, 6)).astype(np.float32) for n in "qkv"},
        "pos": np.array([1.0, 2.0], np.float32),
        "bn.num_batches_tracked": np.array(3, np.int64),
    }


def test_every_layout_converts_and_inverts_exactly():
    state = _state(np.random.default_rng(0))
    variables, dropped = sd.convert(state, _table(), "toy", ignore=lambda k: k.endswith("num_batches_tracked"))
    p = variables["params"]
    np.testing.assert_array_equal(p["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["dense"]["kernel"], state["fc.weight"].T)
    fused = np.concatenate([state[f"{n}.weight"] for n in "qkv"])  # (18, 6): q, k, v thirds
    np.testing.assert_array_equal(p["qkv"]["kernel"], fused.T[None, None])
    np.testing.assert_array_equal(dropped["pos"], state["pos"])
    assert [e.flax_shape for e in _table()[:3]] == [(3, 3, 3, 4), (4,), (4, 5)]
    back = sd.to_torch(variables, _table())
    assert set(back) == set(state) - {"pos", "bn.num_batches_tracked"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])


def test_every_problem_is_listed_in_one_error():
    state = _state(np.random.default_rng(1))
    del state["conv.bias"]
    state["extra.weight"] = np.zeros(1, np.float32)
    state["fc.weight"] = state["fc.weight"].T  # wrong shape
    state["q.weight"] = state["q.weight"].astype(np.int8)  # quantized
    state["pos"] = np.array([np.nan, 0], np.float32)
    with pytest.raises(ValueError) as err:
        sd.convert(state, _table(), "toy model")
    lines = str(err.value).splitlines()
    assert lines[0] == "toy model:" and len(lines) == 6, lines
    assert "missing keys (1): ['conv.bias']" in lines[1]
    assert "unexpected keys (2): ['bn.num_batches_tracked', 'extra.weight']" in lines[2]
    assert "fc.weight: shape (4, 5), expected (5, 4)" in lines[3]
    assert "q.weight: dtype int8 (not a floating-point weight" in lines[4]
    assert "pos: non-finite values" in lines[5]


def test_wrappers_and_prefixes_are_unwrapped_lazily():
    base = {"module.model.a": 1, "module.model.b": 2}
    view = sd.unwrap({"state_dict": base}, ("module.", "model."))
    assert dict(view) == {"a": 1, "b": 2} and "a" in view and len(view) == 2
    assert sd.unwrap({"module.a": 1, "b": 2}, ("module.",)) == {"module.a": 1, "b": 2}  # not every key: a real name
    assert sd.listing("keys", [f"k{i}" for i in range(15)], limit=3) == "keys (15): ['k0', 'k1', 'k2'] ... (+12 more)"


def test_read_safetensors_without_torch_and_pickles_with_a_clear_error(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    save_file({"w": np.arange(3, dtype=np.float32)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    lazy = sd.read(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(lazy["w"], [0, 1, 2])
    (tmp_path / "vgg.pth").write_bytes(b"not read")
    with pytest.raises(ImportError, match=r"vgg\.pth is a PyTorch pickle; reading it needs torch"):
        sd.read(tmp_path / "vgg.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        sd.read(tmp_path / "absent.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=r"w\.txt: unsupported weights file"):
        sd.read(tmp_path / "w.txt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file \(7 bytes"):
        sd.read(tmp_path / "bad.safetensors")


def test_pickles_are_read_with_weights_only(tmp_path):
    """A .pth whose pickle would run code is refused by torch's weights-only unpickler."""
    torch = pytest.importorskip("torch")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.ones(2), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global"):
        sd.read(tmp_path / "evil.pth")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert sd.to_numpy(sd.read(tmp_path / "ok.pth")["w"]).tolist() == [1.0, 1.0]
