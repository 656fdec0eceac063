"""dcae_jax: DC-AE (Deep Compression Autoencoder) in JAX/Flax, and latent diffusion on its latents."""

from dcae_jax.autoencoder.model import VARIANTS, DCAEConfig, DCAEModel, get_config
from dcae_jax.autoencoder.pretrained import DCAE
from dcae_jax.diffusion.pipeline import DCAEDiffusion

__all__ = ["DCAE", "DCAEConfig", "DCAEDiffusion", "DCAEModel", "VARIANTS", "get_config"]
__version__ = "0.1.0"
