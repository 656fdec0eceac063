"""dcae_jax: DC-AE (Deep Compression Autoencoder) in JAX/Flax."""

from dcae_jax.models.dcae import VARIANTS, DCAEConfig, DCAEModel, get_config
from dcae_jax.pretrained import DCAE

__all__ = ["DCAE", "DCAEConfig", "DCAEModel", "VARIANTS", "get_config"]
__version__ = "0.1.0"
