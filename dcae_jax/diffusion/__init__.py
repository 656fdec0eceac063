"""Class-conditional latent diffusion on DC-AE latents (efficientvit `diffusioncore`).

`uvit` (the UViT backbone), `objectives` (training losses), `samplers` (DPM-Solver++ / ODE),
`pipeline` (model + autoencoder + guided sampling), `train` (the training step and loop).
"""
