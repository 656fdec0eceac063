"""Small-scale reproductions of the DC-AE paper's findings (`python -m dcae_jax.reproduce`)."""
