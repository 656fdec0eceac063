"""Converter CLI, our export format, and the errors a bad checkpoint produces."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from dcae_jax import DCAE, convert
from dcae_jax.autoencoder import convert as convert_lib
from dcae_jax.autoencoder.model import get_config, init_variables, tiny_config


@pytest.fixture(scope="module")
def tiny_diffusers_dir(tmp_path_factory):
    from torch_reference import make_torch_model

    d = tmp_path_factory.mktemp("tiny_diffusers")
    make_torch_model(tiny_config()).save_pretrained(d)
    return d


def test_convert_cli_writes_a_loadable_export(tiny_diffusers_dir, tmp_path, capsys):
    out = tmp_path / "export"
    convert.main(["--src", str(tiny_diffusers_dir), "--out", str(out)])
    assert "parameters" in capsys.readouterr().out
    assert (out / "dcae_config.json").exists()
    src = DCAE.from_pretrained(tiny_diffusers_dir)
    ae = DCAE.from_pretrained(out)
    assert ae.config == src.config
    x = np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ae.encode(x)), np.asarray(src.encode(x)))
    np.testing.assert_array_equal(np.asarray(ae.reconstruct(x)), np.asarray(src.reconstruct(x)))


def test_export_roundtrip_keeps_custom_and_non_residual_configs(tmp_path):
    cfg = tiny_config(residual=False, name="my-ablation")
    ae = DCAE(cfg, init_variables(cfg, jax.random.key(0), 32))
    ae.save_pretrained(tmp_path / "e")
    back = DCAE.from_pretrained(tmp_path / "e")
    assert back.config == cfg
    leaves = zip(jax.tree_util.tree_leaves(ae.variables), jax.tree_util.tree_leaves(back.variables), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)


def _corrupt(src_dir, dst_dir, edit):
    from safetensors.numpy import load_file

    sd = load_file(str(src_dir / "diffusion_pytorch_model.safetensors"))
    edit(sd)
    dst_dir.mkdir()
    save_file(sd, str(dst_dir / "diffusion_pytorch_model.safetensors"))
    (dst_dir / "config.json").write_text((src_dir / "config.json").read_text())
    return dst_dir


def test_missing_and_unexpected_keys_are_listed(tiny_diffusers_dir, tmp_path):
    def edit(sd):
        sd.pop("decoder.norm_out.bias")
        sd["encoder.extra.weight"] = np.zeros(3, np.float32)

    d = _corrupt(tiny_diffusers_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['decoder.norm_out.bias'\]") as err:
        DCAE.from_pretrained(d)
    assert "encoder.extra.weight" in str(err.value)
    assert "diffusion_pytorch_model.safetensors" in str(err.value)


def test_wrong_shapes_are_reported_with_key_and_shapes(tiny_diffusers_dir, tmp_path):
    def edit(sd):
        sd["encoder.conv_out.weight"] = np.zeros((8, 32, 3, 3), np.float32)

    d = _corrupt(tiny_diffusers_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=r"encoder\.conv_out\.weight: shape \[\(8, 32, 3, 3\)\]"):
        DCAE.from_pretrained(d)


def test_unknown_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        DCAE.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DC-AE weights found"):
        DCAE.from_pretrained(tmp_path / "empty")
    save_file({"foo.weight": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        DCAE.from_pretrained(tmp_path / "x.safetensors")


def test_efficientvit_keys_detect_the_architecture_and_flag_in_mix_ambiguity():
    cfg = get_config("dc-ae-f64c128-in-1.0")
    keys = {k for e in convert_lib.entries(cfg) for k in e.efficientvit}
    assert convert_lib.detect_format(sorted(keys)) == "efficientvit"
    assert convert_lib.match_registry(keys, "efficientvit") == ["dc-ae-f64c128-in-1.0", "dc-ae-f64c128-mix-1.0"]
    sana = {k for e in convert_lib.entries(get_config("dc-ae-f32c32-sana-1.0")) for k in e.diffusers}
    assert convert_lib.match_registry(sana, "diffusers") == ["dc-ae-f32c32-sana-1.0", "dc-ae-f32c32-sana-1.1"]


def test_every_variable_has_exactly_one_source():
    for name in ("dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0"):
        table = convert_lib.entries(get_config(name))
        paths = [(e.collection, *e.path) for e in table]
        assert len(paths) == len(set(paths))
        for fmt in ("diffusers", "efficientvit"):
            keys = [k for e in table for k in getattr(e, fmt)]
            assert len(keys) == len(set(keys))
    # The diffusers config written by `to_diffusers` is what AutoencoderDC accepts.
    assert json.loads(json.dumps(get_config("dc-ae-f32c32-sana-1.0").to_diffusers()))["upsample_block_type"] == (
        "interpolate"
    )


def test_wrapper_prefixes_are_stripped():
    from dcae_jax.autoencoder.convert import strip_wrappers

    sd = {"encoder.conv_in.weight": 1, "decoder.conv_out.bias": 2}
    for wrapped in (
        {f"module.{k}": v for k, v in sd.items()},  # PyTorch DDP / DataParallel
        {"state_dict": {f"model.{k}": v for k, v in sd.items()}},  # efficientvit's trainer
        {"state_dict": {f"module.model.{k}": v for k, v in sd.items()}},
    ):
        assert strip_wrappers(wrapped) == sd
    mixed = {"module.encoder.conv_in.weight": 1, "decoder.conv_out.bias": 2}
    assert strip_wrappers(mixed) == mixed  # only a prefix every key has is a wrapper


def test_integer_and_non_finite_weights_are_refused(tiny_diffusers_dir, tmp_path, capsys):
    def to_int8(sd):
        sd["encoder.conv_out.weight"] = np.clip(sd["encoder.conv_out.weight"] * 127, -127, 127).astype(np.int8)

    def nan(sd):
        sd["decoder.conv_in.bias"][0] = np.nan

    with pytest.raises(ValueError, match=r"encoder\.conv_out\.weight: dtype int8 \(not a floating-point weight"):
        DCAE.from_pretrained(_corrupt(tiny_diffusers_dir, tmp_path / "int8", to_int8))
    with pytest.raises(ValueError, match=r"decoder\.conv_in\.bias: non-finite values"):
        DCAE.from_pretrained(_corrupt(tiny_diffusers_dir, tmp_path / "nan", nan))
    assert (
        convert.main(["--src", str(tmp_path / "nan"), "--out", str(tmp_path / "never")]) == 2
    )  # ValueError: one line, exit 2
    assert re.search("non-finite", capsys.readouterr().err)
    assert not (tmp_path / "never").exists()


def test_export_whose_config_does_not_match_its_weights(tmp_path):
    cfg = tiny_config()
    DCAE(cfg, init_variables(cfg, jax.random.key(0), 32)).save_pretrained(tmp_path / "e")
    raw = json.loads((tmp_path / "e" / "dcae_config.json").read_text())
    raw["latent_channels"] = cfg.latent_channels * 2
    (tmp_path / "e" / "dcae_config.json").write_text(json.dumps(raw))
    with pytest.raises(
        ValueError,
        match=r"(?s)does not match its config:.*encoder/project_out/kernel: shape \(3, 3, 64, 8\), the config",
    ):
        DCAE.from_pretrained(tmp_path / "e")


def test_export_with_non_finite_weights_is_refused(tmp_path):
    cfg = tiny_config()
    variables = init_variables(cfg, jax.random.key(0), 32)
    head = variables["params"]["decoder"]["head_conv"]["conv"]
    head["kernel"] = head["kernel"] * np.nan
    DCAE(cfg, variables).save_pretrained(tmp_path / "e")
    with pytest.raises(ValueError, match=r"decoder/head_conv/conv/kernel: non-finite values"):
        DCAE.from_pretrained(tmp_path / "e")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d / "diffusion_pytorch_model.safetensors",
            r"diffusion_pytorch_model\.safetensors: not a readable safetensors file \(100 bytes",
        ),
        (lambda d: d / "config.json", r"config\.json: invalid JSON"),
    ],
)
def test_truncated_files_are_named(tiny_diffusers_dir, tmp_path, edit, message):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny_diffusers_dir, d)
    target = edit(d)
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ValueError, match=message):
        DCAE.from_pretrained(d)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"latent_channels": None},
            r"config\.json: not a usable AutoencoderDC config \(missing field 'latent_channels'\)",
        ),
        (
            {"latent_channels": "16"},
            r"config\.json: not a usable AutoencoderDC config \(latent_channels='16' must be a positive integer",
        ),
    ],
)
def test_bad_config_fields_are_named(tiny_diffusers_dir, tmp_path, change, message):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny_diffusers_dir, d)
    raw = json.loads((d / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            del raw[k]
        else:
            raw[k] = v
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        DCAE.from_pretrained(d)


@pytest.mark.parametrize("fmt", ["diffusers", "efficientvit"])
def test_export_to_a_pytorch_format_inverts_the_conversion(fmt):
    """`to_state_dict` writes exactly the keys the format has and converts back to the same variables."""
    cfg = tiny_config()
    variables = init_variables(cfg, jax.random.key(3))
    sd = convert_lib.to_state_dict(variables, cfg, fmt)
    counters = {k.replace(".running_mean", ".num_batches_tracked") for k in sd if k.endswith(".running_mean")}
    assert counters and set(sd) == convert_lib.expected_keys(cfg, fmt) | counters
    back = convert_lib.convert_state_dict(sd, cfg, fmt)
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves_with_path(back), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_convert_cli_writes_the_pytorch_formats(tiny_diffusers_dir, tmp_path, capsys):
    import torch
    from diffusers import AutoencoderDC

    out = tmp_path / "back"
    assert convert.main(["--src", str(tiny_diffusers_dir), "--out", str(out), "--to", "diffusers"]) == 0
    assert "(diffusers format)" in capsys.readouterr().out
    model, info = AutoencoderDC.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # BatchNorm counters included
    src = AutoencoderDC.from_pretrained(tiny_diffusers_dir)
    assert {k: v for k, v in model.config.items() if not k.startswith("_")} == {
        k: v for k, v in src.config.items() if not k.startswith("_")
    }
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values(), strict=True))
    # The tiny architecture is not a released one: the original format cannot name it.
    assert convert.main(["--src", str(tiny_diffusers_dir), "--out", str(tmp_path / "x"), "--to", "efficientvit"]) == 2
    err = capsys.readouterr().err
    assert "only a released architecture" in err and len(err.strip().splitlines()) == 1


@pytest.mark.gcs
def test_convert_from_and_to_gcs(tiny_diffusers_dir, gcs_dir, tmp_path, monkeypatch):
    """A diffusers checkpoint in the bucket (read through a cached local copy) converts into the bucket, in our
    format (read in place) and back to diffusers (a local safetensors file uploaded in one piece)."""
    from dcae_jax.runtime import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCAE_JAX_CACHE", str(tmp_path / "cache"))
    paths.copytree(tiny_diffusers_dir, f"{gcs_dir}/diffusers")
    assert convert.main(["--src", f"{gcs_dir}/diffusers", "--out", f"{gcs_dir}/export"]) == 0
    assert convert.main(["--src", f"{gcs_dir}/export", "--out", f"{gcs_dir}/back", "--to", "diffusers"]) == 0
    src = DCAE.from_pretrained(tiny_diffusers_dir)
    x = np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    for path in (f"{gcs_dir}/export", f"{gcs_dir}/back"):
        ae = DCAE.from_pretrained(path)
        assert ae.config.to_diffusers() == src.config.to_diffusers()
        np.testing.assert_array_equal(np.asarray(ae.reconstruct(x)), np.asarray(src.reconstruct(x)))
    assert not (tmp_path / "gs:").exists()
