"""Machinery both trainers share (autoencoder: `dcae_jax.train`, diffusion: `dcae_jax.diffusion.train`).

`checkpoints`: the orbax checkpoint manager, save (refusing non-finite state) and restore (exact, or across a
change of process count), the non-finite stop, and gathering parameters for an export.
"""
