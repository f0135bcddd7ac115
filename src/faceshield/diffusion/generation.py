"""Text-to-image sampling: DDIM (η = 0) with classifier-free guidance, on a :class:`StableDiffusion`.

What the attack harness (DreamBooth/LoRA customization), prompt learning (APL) and Diff-Privacy's guided
sampling share. ``generate`` gives the same images as diffusers' ``StableDiffusionPipeline`` with a
``DDIMScheduler`` for the same seed (tests/test_diffusion.py checks the max abs difference).
"""

from __future__ import annotations

from typing import Sequence

import torch

from faceshield.diffusion.loading import StableDiffusion
from faceshield.diffusion.schedule import NoiseSchedule
from faceshield.errors import ShapeError


def guided_noise(sd: StableDiffusion, latents: torch.Tensor, timestep: int, cond: torch.Tensor,
                 uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guided noise ``ε_u + guidance · (ε_c − ε_u)``; guidance 1 is the conditional ε alone.

    Args:
        latents: ``B×4×h×w``; cond, uncond: ``B×L×D`` (or ``1×L×D``, broadcast) prompt embeddings.
    """
    batch = latents.shape[0]
    cond, uncond = cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)
    if guidance == 1:
        return sd.predict_noise(latents, timestep, cond)
    both = sd.predict_noise(torch.cat([latents, latents]), timestep, torch.cat([uncond, cond]))
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def initial_noise(sd: StableDiffusion, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The starting latents ``B×4×h×w`` for ``seed``: drawn on the CPU (the same on every device, as diffusers
    does with a CPU generator), then moved to the model's device."""
    f = sd.vae_factor
    channels = sd.unet.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, channels, height // f, width // f), generator=generator)
    return noise.to(sd.device, sd.dtype)


@torch.no_grad()
def generate(sd: StableDiffusion, prompts: Sequence[str] | None = None, *, embeddings: torch.Tensor | None = None,
             negative: str = "", steps: int = 50, guidance: float = 7.5, seed: int = 0, height: int | None = None,
             width: int | None = None) -> torch.Tensor:
    """Images for ``prompts`` (or precomputed prompt ``embeddings`` ``B×L×D``), DDIM η = 0 with guidance.

    Args:
        negative: the unconditional prompt of classifier-free guidance ("" = the empty prompt).
        steps: DDIM steps; guidance: classifier-free guidance scale (1 = none); seed: of the starting noise
            (one generator for the whole batch, as diffusers).
        height, width: pixels, multiples of the VAE factor; default the UNet's native size.

    Returns:
        ``B×3×H×W`` float RGB in [0, 1].
    """
    if (prompts is None) == (embeddings is None):
        raise ValueError("give either prompts or embeddings")
    cond = sd.encode_prompts(list(prompts)) if embeddings is None else embeddings.to(sd.device, sd.dtype)
    f = sd.vae_factor
    height = height or sd.unet.config.sample_size * f
    width = width or sd.unet.config.sample_size * f
    if height % f or width % f:
        raise ShapeError(f"image sides must be multiples of {f}, got {height}×{width}")
    uncond = sd.encode_prompts([negative])
    z = initial_noise(sd, cond.shape[0], height, width, seed)
    path = sd.timesteps(steps)
    alphas = [sd.schedule.alpha(t) for t in path] + [sd.schedule.alpha(None)]
    for i, t in enumerate(path):
        epsilon = guided_noise(sd, z, t, cond, uncond, guidance)
        z = NoiseSchedule.ddim_move(z, epsilon, alphas[i], alphas[i + 1])
    return sd.decode_latents(z)
