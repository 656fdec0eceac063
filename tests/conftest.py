import os
import sys

# The suite is designed for CPU (fake devices via XLA_FLAGS); keep an installed libtpu from probing for TPUs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests import helpers such as `torch_reference` from this folder.
sys.path.insert(0, os.path.dirname(__file__))
