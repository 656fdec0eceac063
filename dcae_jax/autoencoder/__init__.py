"""The DC-AE autoencoder, shaped like `dcae_jax.diffusion`.

`model` (the linen model, its config and the variant registry), `layers` (its building blocks),
`discriminator` (the phase-3 PatchGAN), `convert` (diffusers / efficientvit weights -> ours), `pretrained`
(the `DCAE` wrapper: from_pretrained, save_pretrained, encode, decode), `inference` (reconstructing files),
`losses` (L1 + LPIPS + GAN) and `train` (the phase 1/2/3 train step and loop).
"""
