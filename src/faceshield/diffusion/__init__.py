"""The diffusion core shared by the diffusion-based methods: the only code that imports diffusers/transformers.

- :mod:`~faceshield.diffusion.loading`: loading Stable Diffusion (hub id or folder) into a
  :class:`~faceshield.diffusion.loading.StableDiffusion` with plain-tensor methods; one-line loading errors.
- :mod:`~faceshield.diffusion.attention`: self-attention maps recorded through diffusers' processor API.
- :mod:`~faceshield.diffusion.schedule`: noise schedule and the DDIM update (plain torch).
- :mod:`~faceshield.diffusion.inversion`: DDIM inversion, sampling, learned unconditional embeddings.
- :mod:`~faceshield.diffusion.testing`: models with random weights (the tiny test model, real architectures for
  speed benchmarks).
"""
