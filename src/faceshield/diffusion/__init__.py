"""The diffusion core shared by the diffusion-based methods.

- :mod:`~faceshield.diffusion.adapter`: the only module that imports diffusers/transformers — loading Stable
  Diffusion (hub id or folder), the tiny test model, self-attention recording through the processor API.
- :mod:`~faceshield.diffusion.schedule`: noise schedule and the DDIM update (plain torch).
- :mod:`~faceshield.diffusion.inversion`: DDIM inversion, sampling, learned unconditional embeddings.
"""
