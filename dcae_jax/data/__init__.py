"""Data loading helpers for dcae_jax."""
