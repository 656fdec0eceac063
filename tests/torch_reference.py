"""Helpers that build the PyTorch oracle (diffusers `AutoencoderDC`) with fully random weights."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderDC

from dcae_jax.autoencoder import convert
from dcae_jax.autoencoder.model import DCAEConfig


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Random norm scales/biases and BatchNorm running statistics, so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)
            if isinstance(mod, torch.nn.BatchNorm2d) or type(mod).__name__ == "RMSNorm":
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))


def make_torch_model(cfg: DCAEConfig, seed: int = 0) -> AutoencoderDC:
    torch.manual_seed(seed)
    model = AutoencoderDC(**cfg.to_diffusers()).eval()
    randomize_norms(model, seed)
    return model


@torch.no_grad()
def torch_encode_decode(model: AutoencoderDC, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latent and image (NHWC numpy) from the torch model; the image decodes the torch latent."""
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
    z = model.encode(x).latent
    y = model.decode(z).sample
    return z.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy()


def to_efficientvit_state_dict(diffusers_sd: dict[str, torch.Tensor], cfg: DCAEConfig) -> dict[str, torch.Tensor]:
    """The original efficientvit-format state dict holding the same weights.

    Built from our key table; callers must validate it with diffusers' own single-file converter
    (`convert_autoencoder_dc_checkpoint_to_diffusers`), which is independent of our code.
    """
    out = {}
    for e in convert.entries(cfg):
        (ev_key,) = e.efficientvit
        ts = [diffusers_sd[k] for k in e.diffusers]
        if e.kind == "qkv":
            out[ev_key] = torch.cat(ts, 0)[:, :, None, None].clone()
        elif e.kind == "pointwise":
            out[ev_key] = ts[0][:, :, None, None].clone()
        else:
            out[ev_key] = ts[0].clone()
    for k, v in diffusers_sd.items():  # keep BatchNorm counters as the original checkpoints do
        if k.endswith(".num_batches_tracked"):
            for e in convert.entries(cfg):
                if e.diffusers[0] == k.replace("num_batches_tracked", "running_mean"):
                    out[e.efficientvit[0].replace("running_mean", "num_batches_tracked")] = v.clone()
    return out


def make_diffusers_dit(cfg, seed: int = 0, *, dit_time_embedding: bool = True):
    """A diffusers DiT with cfg's architecture and random weights everywhere (adaLN and head included).

    diffusers keeps a copy of the t/y embedders in every block: all copies get block 0's weights (as in
    converted DiT checkpoints). `dit_time_embedding` sets its sinusoid to DiT's (downscale_freq_shift 0).
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
        emb0 = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks:
            block.norm1.emb.load_state_dict(emb0.state_dict())
            if dit_time_embedding:
                block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model
