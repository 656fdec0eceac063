"""Machinery both trainers share (autoencoder: `dcae_jax.autoencoder.train`, diffusion: `dcae_jax.diffusion.train`).

`chain`: running a config (one trainer or a chain of phases), its progress, closing table and summary.
`checkpoints`: the orbax checkpoint manager, save (refusing non-finite state) and restore (exact, or across a
change of process count), the non-finite stop, and gathering parameters for an export.
`config`: the config defaults of both trainers (`base_config`, `apply_phase`, `diffusion_config`, `parse_arg`).
`optim`: optimizers, schedules and the freezing masks. `aot`: ahead-of-time compilation for TPU slices.
"""
