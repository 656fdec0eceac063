"""DC-AE 1.5 training: `config.latent_sampling` decodes a random channel prefix each step, and a model trained so
loses far less from keeping only a prefix of its latent than the same model trained on the whole latent."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dcae_jax import DCAE
from dcae_jax.autoencoder import train
from dcae_jax.autoencoder.model import tiny_config
from dcae_jax.data import images
from dcae_jax.data import pipeline as input_pipeline
from dcae_jax.metrics import image as image_metrics
from dcae_jax.training import config as common
from dcae_jax.training import loop

STRUCTURED = {"encoder_out_shortcut": False, "decoder_in_shortcut": False, "decoder_conv_act_fn": "silu"}


def _config(channels: tuple[int, ...], steps: int = 300, **overrides):
    c = common.base_config()
    c.model.overrides = {**STRUCTURED, **overrides}
    common.apply_phase(c, 1, num_stages=4)
    c.latent_sampling.channels = channels
    c.resolution = c.eval_resolution = 32
    c.global_batch_size, c.eval_batch_size = 8, 4
    c.num_steps, c.optim.learning_rate, c.optim.weight_decay = steps, 2e-3, 0.0
    c.optim.warmup_steps, c.optim.decay_steps = 20, steps
    c.eval_lpips = c.eval_rfid = False
    c.log_every, c.checkpoint_every, c.eval_every = 25, steps, 0
    return c


def _psnr_by_prefix(export, prefixes) -> dict[int, float]:
    ae = DCAE.from_pretrained(export)
    x = np.stack([images.load_image(p, 32) for p in input_pipeline.bundled_photos("validation")])
    z = ae.encode(x)
    out = {}
    for c in prefixes:
        y = ae.decode(z[..., :c])
        psnr, _ = image_metrics.psnr_ssim(image_metrics.quantize_uint8(x), image_metrics.quantize_uint8(y))
        out[c] = float(np.mean(psnr))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same model and data, trained on random channel prefixes and on the whole latent."""
    out = {}
    for name, channels in (("sampled", (1, 2, 4, 8)), ("whole", ())):
        workdir = tmp_path_factory.mktemp(name)
        train.train_and_evaluate(_config(channels), workdir)
        out[name] = workdir
    return out


def test_sampled_training_makes_channel_prefixes_decode(runs):
    sampled = _psnr_by_prefix(runs["sampled"] / "export", (1, 2, 4, 8))
    whole = _psnr_by_prefix(runs["whole"] / "export", (1, 2, 4, 8))
    print("PSNR by channels kept: sampled", sampled, "whole", whole)
    # Measured (300 steps, 32x32, 3 held-out photos, the test run's compile flags: tests/conftest.py), dB from 1 / 2 /
    # 4 / 8 channels, trained on prefixes vs on the whole latent. Intel Xeon (AVX-512), seed 0: 13.37 / 14.21 /
    # 14.66 / 14.65 vs 12.65 / 13.05 / 13.71 / 15.81; seed 1: 14.05 / 15.20 / 15.50 / 15.66 vs 10.71 / 14.03 / 14.55
    # / 15.59. AMD EPYC Zen 3 (AVX2), seed 0, XLA's kernel-gradient convs: 12.50 / 13.49 / 13.94 / 14.11 vs 12.70 /
    # 13.52 / 13.68 / 15.87; with the matmul kernel gradients (layers.conv_kernel_grad_dots): 12.59 / 13.98 / 14.66 /
    # 14.86 vs 12.74 / 13.44 / 13.53 / 15.80. The float rounding moves how good each 300-step model gets as a whole
    # (the prefix-trained model's 8 channels: 14.11 to 15.66 dB), so the two models' prefix PSNRs do not compare
    # reliably at this scale (Zen 3: 1 channel 12.50 vs 12.70). What every run shows is what a prefix costs its own
    # model: from 8 channels to 1 / 2 / 4, the whole-latent model loses 0.79-3.27 / 1.10-2.32 / 0.88-2.11 dB more
    # than the prefix-trained one, 1.45-2.10 dB more on average.
    # docs/training.md has the comparison at a larger scale, where the prefix PSNRs themselves differ by 2-4 dB.
    assert sampled[1] + 0.5 < min(sampled[4], sampled[8]) and whole[1] + 1.0 < whole[8]  # more channels, more detail
    cost = {c: (sampled[8] - sampled[c], whole[8] - whole[c]) for c in (1, 2, 4)}
    for c, (own, whole_cost) in cost.items():
        assert whole_cost > own + 0.4, (c, cost)
    assert np.mean([w - o for o, w in cost.values()]) > 0.9, cost
    assert sampled[8] > whole[8] - 2.5  # the full latent still decodes


def test_the_sampled_channel_count_is_logged_and_follows_the_config(runs):
    logged = [json.loads(line) for line in (runs["sampled"] / "metrics.jsonl").read_text().splitlines()]
    means = [m["latent_channels"] for m in logged if "latent_channels" in m]
    assert means and all(1 <= v <= 8 for v in means) and len(set(means)) > 1
    whole = [json.loads(line) for line in (runs["whole"] / "metrics.jsonl").read_text().splitlines()]
    assert {m["latent_channels"] for m in whole if "latent_channels" in m} == {8.0}


def test_draws_are_per_step_reproducible_and_follow_the_probabilities():
    cfg = _config((2, 8))
    cfg.latent_sampling.probs = (0.25, 0.75)
    abstract = jax.eval_shape(
        train.DCAEModel(train.model_config(cfg)).init, jax.random.key(0), np.zeros((1, 32, 32, 3))
    )
    t = train.build_trainer(cfg, train.model_config(cfg), abstract["params"])
    rng = jax.random.key_data(jax.random.key(3))
    draws = np.array([int(train.sample_latent_channels(t, rng, s)) for s in range(400)])
    assert set(draws) == {2, 8} and 0.65 < np.mean(draws == 8) < 0.85
    assert [int(train.sample_latent_channels(t, rng, s)) for s in range(20)] == list(draws[:20])  # resume: same


@pytest.mark.parametrize(
    ("channels", "probs", "overrides", "message"),
    [
        ((2, 4), (), {"encoder_out_shortcut": True, "decoder_in_shortcut": True}, "shortcuts around its latent"),
        ((0, 4), (), {}, r"must be integers in 1\.\.8"),
        ((2, 4), (0.5, 0.6), {}, "summing to 1"),
    ],
)
def test_bad_sampling_configs_are_refused(channels, probs, overrides, message, tmp_path):
    cfg = _config(channels, **overrides)
    cfg.latent_sampling.probs = probs
    with pytest.raises(loop.ConfigError, match=message):
        train.train_and_evaluate(cfg, tmp_path)
    assert tiny_config().latent_channels == 8
