"""Pixel-space DDPMs (a diffusers ``UNet2DModel`` + its noise schedule): loading, DDIM inversion and sampling.

The score networks of the DiffusionCLIP / DiffAM / MAP line work on 256×256 RGB directly (no VAE). Everything
else in faceshield sees a :class:`PixelDiffusion` with plain-tensor methods; images are ``B×3×H×W`` float RGB in
[0, 1] at the interface and ``[-1, 1]`` inside the diffusion (the DDPM convention).

A *path* is a list of timesteps, noisiest first, as in :mod:`faceshield.diffusion.inversion`: sampling step ``i``
moves from the level of ``path[i]`` to that of ``path[i + 1]`` (the clean end after the last) with the noise
estimated at ``path[i]``; inversion runs the same steps backwards. The DDIM maths is
:meth:`~faceshield.diffusion.schedule.NoiseSchedule.ddim_move`.

Folders: ``unet/`` + ``scheduler/`` (what :func:`save_ddpm` writes, the diffusers pipeline layout) or the UNet at
the root with ``scheduler_config.json`` beside it (the layout of the ``google/ddpm-*`` hub repositories).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from faceshield.diffusion.hub import DDPM_CELEBAHQ_ID
from faceshield.diffusion.loading import (
    in_hub_cache, load_component, offline, quiet_libraries, require_diffusers, resolve_dtype, resolve_source,
)
from faceshield.diffusion.schedule import NoiseSchedule
from faceshield.errors import DiffusionModelError, ShapeError

log = logging.getLogger(__name__)

DEFAULT_DDPM = DDPM_CELEBAHQ_ID

# google/ddpm-ema-celebahq-256 (its config.json): the CelebA-HQ 256 DDPM of SDEdit/DiffusionCLIP/DiffAM in diffusers
# form — ch 128, channel multipliers (1, 1, 2, 2, 4, 4), 2 res-blocks per level, self-attention at 16×16.
CELEBAHQ_DDPM_ARCHITECTURE = {
    "sample_size": 256, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-6,
    "norm_num_groups": 32, "time_embedding_type": "positional",
}
# Its scheduler_config.json: DDPM's linear β from 1e-4 to 0.02 over 1000 steps.
DDPM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "clip_sample": True, "variance_type": "fixed_small", "prediction_type": "epsilon"}
# Tiny: the same block layout (plain levels, then self-attention at the lowest resolution) at ~0.3 M parameters.
TINY_DDPM_ARCHITECTURE = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": (16, 32, 32), "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), "norm_num_groups": 8, "attention_head_dim": 8,
}


def _how_to_provide(source: str) -> str:
    return (f"download it where there is internet (`hf download {DEFAULT_DDPM} --local-dir ddpm-celebahq`) and "
            f"pass the folder (a diffusers UNet2DModel: unet/ + scheduler/, or config.json + scheduler_config.json)")


@dataclass
class PixelDiffusion:
    """A loaded pixel-space DDPM: ``unet`` (a diffusers ``UNet2DModel``) and its noise schedule.

    Loaded frozen and in eval mode; :meth:`trainable_copy` gives a copy whose weights train.
    """

    unet: torch.nn.Module
    scheduler_config: dict
    schedule: NoiseSchedule
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def resolution_factor(self) -> int:
        """Image sides must be multiples of this (one halving per down block but the last)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_images(self, images: torch.Tensor) -> None:
        f = self.resolution_factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % f or images.shape[-2] % f:
            raise ShapeError(f"{self.source}: expected images B×3×H×W with sides multiple of {f}, "
                             f"got {tuple(images.shape)}")

    def predict_noise(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """ε estimated at ``timestep`` for ``x`` (``B×3×H×W`` in the diffusion's [-1, 1] space), float32."""
        t = torch.full((x.shape[0],), int(timestep), device=self.device, dtype=torch.long)
        output = self.unet(x.to(self.device, self.dtype), t).sample
        return self.schedule.to_epsilon(output, x, timestep).float()

    def trainable_copy(self, gradient_checkpointing: bool = False) -> "PixelDiffusion":
        """A deep copy whose UNet is in train mode with gradients on (the frozen original is untouched).

        ``gradient_checkpointing``: recompute each block's activations in the backward pass instead of storing them
        (diffusers' own mechanism): much less memory when backpropagating through several sampling steps, ~30 %
        more time.
        """
        unet = copy.deepcopy(self.unet).requires_grad_(True).train()
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return PixelDiffusion(unet, dict(self.scheduler_config), self.schedule, self.source, self.device, self.dtype)


def to_diffusion(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB → the DDPM's [-1, 1]."""
    return images * 2 - 1


def to_images(x: torch.Tensor) -> torch.Tensor:
    """The DDPM's [-1, 1] → [0, 1] RGB, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def ddim_path(t0: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly from ``t0`` down to 0, noisiest first (DiffAM: ``linspace(0, 1, n) · t0``).

    With ``t0 = 60``: 20 steps → 60, 57, …, 3, 0; 6 steps → 60, 48, 36, 24, 12, 0. The level after the last step
    is the clean end (ᾱ = 1).
    """
    if steps < 1 or t0 < 0:
        raise ValueError(f"need steps ≥ 1 and t0 ≥ 0, got {steps}, {t0}")
    if steps == 1:
        return [int(t0)]
    return [int(round(t0 * (steps - 1 - i) / (steps - 1))) for i in range(steps)]


def _levels(model: PixelDiffusion, path: Sequence[int]) -> list[float]:
    return [model.schedule.alpha(t) for t in path] + [model.schedule.alpha(None)]


@torch.no_grad()
def ddim_invert(model: PixelDiffusion, x: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
    """Deterministic DDIM inversion of clean ``x`` (``B×3×H×W`` in [-1, 1]) up to the level of ``path[0]``."""
    alphas = _levels(model, path)
    z = x.float()
    for i in reversed(range(len(path))):
        z = NoiseSchedule.ddim_move(z, model.predict_noise(z, path[i]), alphas[i + 1], alphas[i])
    return z


def ddim_sample(model: PixelDiffusion, z: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
    """DDIM sampling (η = 0) from ``z`` at the level of ``path[0]`` to the clean end, ``B×3×H×W`` in [-1, 1].

    Differentiable with respect to ``z`` and the UNet's weights (no ``no_grad`` here).
    """
    alphas = _levels(model, path)
    for i, t in enumerate(path):
        z = NoiseSchedule.ddim_move(z, model.predict_noise(z, t), alphas[i], alphas[i + 1])
    return z


def _layout(path: Path) -> tuple[str | None, str | None]:
    """(UNet subfolder, scheduler subfolder) of a local folder; raises when it holds no UNet2DModel."""
    if (path / "unet" / "config.json").is_file():
        return "unet", "scheduler" if (path / "scheduler").is_dir() else None
    if (path / "config.json").is_file():
        return None, "scheduler" if (path / "scheduler").is_dir() else None
    raise DiffusionModelError(f"{path}: not a diffusers DDPM folder (no unet/config.json or config.json); "
                              f"{_how_to_provide(str(path))}")


def load_ddpm(source: str | Path = DEFAULT_DDPM, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
              revision: str | None = None) -> PixelDiffusion:
    """Load a pixel-space DDPM (``UNet2DModel`` + DDPM/DDIM scheduler config) by hub id or folder, frozen, eval mode.

    Args:
        source: hub id (default ``google/ddpm-ema-celebahq-256``) or a folder (``unet/`` + ``scheduler/``, or the
            hub repositories' root layout).
        device, dtype: where and how to run (``"auto"``: bfloat16 on CUDA, float32 on CPU).
        revision: hub revision.

    Any failure (missing folder, missing weights, no network) raises one :class:`DiffusionModelError` line.
    """
    require_diffusers()
    from diffusers import DDPMScheduler, UNet2DModel

    source, local = resolve_source(source, "DDPM", _how_to_provide(str(source)))
    if local:
        unet_folder, scheduler_folder = _layout(Path(source))
    else:
        unet_folder, scheduler_folder = None, None  # google/ddpm-*: UNet and scheduler config at the root
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    cached = local or offline() or in_hub_cache(source, revision, ("config.json", "scheduler_config.json"))
    if not cached:
        log.warning("downloading the DDPM %s from the Hugging Face hub (~450 MB, once)", source)
    hub = {"local_files_only": cached, "revision": revision}
    how = _how_to_provide(source)
    unet = load_component(UNet2DModel.from_pretrained, source, unet_folder, what="DDPM", how=how,
                          torch_dtype=torch_dtype, **hub)
    config = dict(load_component(DDPMScheduler.load_config, source, scheduler_folder, what="DDPM scheduler of",
                                 how=how, **hub))
    unet.to(device).eval().requires_grad_(False)
    log.info("loaded DDPM %s (%s, %s)", source, device, torch_dtype)
    return PixelDiffusion(unet, config, NoiseSchedule.from_scheduler_config(config), source, device, torch_dtype)


def save_ddpm(model: PixelDiffusion, folder: str | Path, unet: torch.nn.Module | None = None) -> Path:
    """``save_pretrained`` ``unet`` (default ``model.unet``) into ``folder/unet`` and the schedule into
    ``folder/scheduler``: a folder :func:`load_ddpm` reads (the diffusers ``DDPMPipeline`` layout)."""
    require_diffusers()
    from diffusers import DDPMScheduler

    folder = Path(folder)
    with quiet_libraries():
        (unet or model.unet).save_pretrained(folder / "unet")
        DDPMScheduler.from_config(model.scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    return folder


def build_random_ddpm(architecture: dict = CELEBAHQ_DDPM_ARCHITECTURE, device: str | torch.device = "cpu",
                      dtype: str | torch.dtype = "auto", seed: int = 0) -> PixelDiffusion:
    """A DDPM with ``architecture`` (``UNet2DModel`` arguments) and random weights, in memory (speed benchmarks)."""
    require_diffusers()
    from diffusers import UNet2DModel

    device = torch.device(device)
    torch.manual_seed(seed)
    with quiet_libraries():
        unet = UNet2DModel(**architecture).to(device, resolve_dtype(dtype, device)).eval().requires_grad_(False)
    config = dict(DDPM_SCHEDULER)
    return PixelDiffusion(unet, config, NoiseSchedule.from_scheduler_config(config), "random weights", device,
                          resolve_dtype(dtype, device))
