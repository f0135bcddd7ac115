"""DDIM inversion, DDIM sampling, and per-timestep learned unconditional embeddings (null-text inversion).

A *path* is the list of DDIM timesteps of the sampling steps to run, noisiest first (e.g. the last 3 of 20:
``model.timesteps(20)[17:]``). Sampling step ``i`` moves a latent from the level of ``path[i]`` to the level of
``path[i + 1]`` (the clean end after the last one) with the noise estimated at ``path[i]``; inversion runs the
same steps backwards. Every function is batched: ``B`` latents ``B×4×h×w`` with ``B×L×D`` embeddings, one face
per row, and a row's result never depends on the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from faceshield.diffusion.loading import StableDiffusion
from faceshield.diffusion.schedule import NoiseSchedule


def _levels(model: StableDiffusion, path: Sequence[int]) -> list[float]:
    """ᾱ of each level along ``path``: ``len(path) + 1`` values, noisiest first, the clean end last."""
    return [model.schedule.alpha(t) for t in path] + [model.schedule.alpha(None)]


def _per_step(embeddings: torch.Tensor | Sequence[torch.Tensor], i: int) -> torch.Tensor:
    return embeddings if isinstance(embeddings, torch.Tensor) else embeddings[i]


@torch.no_grad()
def ddim_invert(model: StableDiffusion, latents: torch.Tensor, embeddings: torch.Tensor,
                path: Sequence[int]) -> list[torch.Tensor]:
    """DDIM-invert clean ``latents`` along ``path``.

    Returns:
        the trajectory ``[z at path[0], …, z at path[-1], latents]``, noisiest first (``len(path) + 1`` tensors).
    """
    alphas = _levels(model, path)
    trajectory = [latents]
    z = latents
    for i in reversed(range(len(path))):
        epsilon = model.predict_noise(z, path[i], embeddings)
        z = NoiseSchedule.ddim_move(z, epsilon, alphas[i + 1], alphas[i])
        trajectory.append(z)
    return trajectory[::-1]


def denoise(model: StableDiffusion, latents: torch.Tensor, path: Sequence[int],
            embeddings: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Run the DDIM sampling steps of ``path`` from ``latents`` (at the level of ``path[0]``) to the clean end.

    ``embeddings``: one ``B×L×D`` tensor for every step, or one per step. Differentiable (no ``no_grad`` here).
    """
    alphas = _levels(model, path)
    z = latents
    for i, t in enumerate(path):
        epsilon = model.predict_noise(z, t, _per_step(embeddings, i))
        z = NoiseSchedule.ddim_move(z, epsilon, alphas[i], alphas[i + 1])
    return z


@dataclass
class LearnedEmbeddings:
    """Result of :func:`learn_unconditional_embeddings`.

    Attributes:
        embeddings: one ``B×L×D`` tensor per step of the path.
        reconstruction: the clean latents sampled with them from the inverted start, ``B×4×h×w``.
        loss: per step, the last optimisation loss (summed over rows).
    """

    embeddings: list[torch.Tensor]
    reconstruction: torch.Tensor
    loss: list[float]


def learn_unconditional_embeddings(
    model: StableDiffusion,
    trajectory: Sequence[torch.Tensor],
    path: Sequence[int],
    initial: torch.Tensor,
    steps: int = 20,
    lr: float = 0.1,
    progress: Callable[[], None] | None = None,
) -> LearnedEmbeddings:
    """Learn one unconditional embedding per sampling step so that sampling retraces the inversion.

    Null-text inversion (Mokady et al. 2023) as the adversarial-latent paper uses it, without classifier-free
    guidance: for step ``i``, AdamW (``lr``, ``steps`` iterations) fits the embedding so that one DDIM step from
    the current latent lands on ``trajectory[i + 1]``; the latent then advances with the fitted embedding, and
    the next step starts from it (warm-started from the previous embedding, as the authors do).

    Args:
        trajectory: from :func:`ddim_invert` (noisiest first, clean last).
        path: the timesteps it was inverted along.
        initial: ``B×L×D`` starting embedding (the empty prompt's).
        progress: called after every optimisation iteration.
    """
    alphas = _levels(model, path)
    embedding = initial.detach().float().clone().requires_grad_(True)
    optimiser = torch.optim.AdamW([embedding], lr=lr)
    z = trajectory[0].detach()
    learned, losses = [], []
    for i, t in enumerate(path):
        target = trajectory[i + 1].detach()
        for _ in range(steps):
            predicted = NoiseSchedule.ddim_move(z, model.predict_noise(z, t, embedding), alphas[i], alphas[i + 1])
            # Per-row mean, summed over rows: each face gets exactly the gradient it would get alone.
            loss = (predicted.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if progress is not None:
                progress()
        losses.append(loss.item())
        with torch.no_grad():
            z = NoiseSchedule.ddim_move(z, model.predict_noise(z, t, embedding), alphas[i], alphas[i + 1])
        learned.append(embedding.detach().to(initial.dtype).clone())
    return LearnedEmbeddings(learned, z, losses)
