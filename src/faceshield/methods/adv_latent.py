"""Weakening Diffusion Purification (CVPR 2025) as ``adv-latent``: an adversarial latent code of Stable Diffusion.

Paper summary: ../shared/papers/weakening-diffusion-purification.txt; algorithm and defaults: METHODS.md.

Each face is aligned to a 256×256 CelebA-HQ-style crop, encoded by Stable Diffusion's VAE and DDIM-inverted
along the last ``diffusion_steps − start_step`` of ``diffusion_steps`` steps. One unconditional embedding per
step is learned so that sampling retraces the inversion (more capacity, less purification). Then the inverted
latent is optimised with AdamW so that the sampled-and-decoded face moves away from its own identity (dodging)
or toward a target's (impersonation) on the surrogate FR ensemble, ``adv_weight · Σ_models(1 − cos)`` (summed
over the surrogates as the authors' code does; ``fr_reduction="mean"`` for the mean that METHODS.md writes), while
the self-attention maps of the protected generation stay those of the original's (``MSE``, summed over the
recorded layers and steps). No L∞ bound. The decoded faces go back into the photo through feathered face masks;
pixels outside the masks are untouched.

The start step follows the paper's description: with 20 steps and start step 17 the latent inverted to timestep
101 is optimised and sampled through the steps 101, 51, 1. The authors' code starts from the latent inverted one
step further (timestep 151) while still sampling through 101, 51, 1 (an off-by-one in its indexing, which the
learned embeddings absorb); we do not copy it. Each mechanism has a test that fails without it: docs/mechanisms.md.

Differences from the authors' code, all deliberate: the VAE posterior mean instead of a seeded sample
(deterministic); inversion stops at the start step instead of running to the noisiest one (the rest is unused);
the original branch's attention maps are computed once instead of at every step; FR crops come from our
differentiable alignment (their code crops an MTCNN box and resizes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from faceshield.diffusion.loading import DEFAULT_MODEL, StableDiffusion, cached_stable_diffusion
from faceshield.diffusion.inversion import ddim_invert, denoise, learn_unconditional_embeddings
from faceshield.errors import FaceshieldError
from faceshield.faces.align import CELEBAHQ_256
from faceshield.faces.masks import crop_faces, paste_faces
from faceshield.methods.base import FRAttackMethod, ProtectionResult, check_photo, register_method
from faceshield.settings import Settings, setting


@dataclass
class AdvLatentConfig(Settings):
    """Settings of ``adv-latent``; defaults are the authors' public ones (METHODS.md).

    Attributes:
        diffusion_model: Stable Diffusion 1.x/2.x hub id or local diffusers folder.
        image_size: side of the aligned face crop the diffusion model works on (multiple of 8).
        diffusion_steps: DDIM steps of the full schedule.
        start_step: the protection runs the steps after this one (20 − 17 = the last 3).
        null_steps, null_lr: AdamW iterations and learning rate per step for the unconditional embeddings.
        steps, lr: AdamW iterations and learning rate on the latent code.
        adv_weight: λ_adv, weight of the FR loss against the self-attention structure loss.
        fr_reduction: how the FR loss combines the surrogates: ``sum`` of the per-model terms (the authors'
            code, so λ_adv = 0.003 weighs as theirs per model) or ``mean``.
        attention_layers: UNet self-attention layers for the structure loss, by name prefix
            (e.g. ``up_blocks``); empty = all of them.
        attention_max_tokens: layers with more query tokens are not recorded (32² as the authors).
        mask_scale: size of the face ellipse the decoded face is pasted through (1 = forehead to chin).
        surrogates: FR models attacked; empty = every calibrated model with AUC ≥ 0.9.
        device: where to run; dtype: ``auto`` = bfloat16 on CUDA, float32 on CPU.
    """

    diffusion_model: str = DEFAULT_MODEL
    image_size: int = setting(256, "[64, 2048]")
    diffusion_steps: int = setting(20, "[1, 1000]")
    start_step: int = setting(17, "[0, 1000)")
    null_steps: int = setting(20, "[0, inf)")
    null_lr: float = setting(0.1, "(0, inf)")
    steps: int = setting(30, "[1, inf)")
    lr: float = setting(0.01, "(0, inf)")
    adv_weight: float = setting(0.003, "(0, inf)")
    fr_reduction: str = setting("sum", choices=("sum", "mean"))
    attention_layers: tuple[str, ...] = ()
    attention_max_tokens: int = setting(32 * 32, "[1, inf)")
    mask_scale: float = setting(1.3, "(0, 10]")
    surrogates: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.start_step < self.diffusion_steps:
            raise FaceshieldError(f"adv-latent: start_step must be in [0, diffusion_steps), got {self.start_step}")
        if self.image_size % 8:
            raise FaceshieldError(f"adv-latent: image_size must be a multiple of 8, got {self.image_size}")


@register_method
class AdvLatent(FRAttackMethod):
    name = "adv-latent"
    Config = AdvLatentConfig

    def __init__(self, config: AdvLatentConfig | None = None, model: StableDiffusion | None = None):
        """``model``: an already loaded Stable Diffusion to use instead of loading ``config.diffusion_model``."""
        super().__init__(config)
        cfg = self.config
        self.model = model or cached_stable_diffusion(cfg.diffusion_model, cfg.device, cfg.dtype)
        self.template = torch.tensor(CELEBAHQ_256) * (cfg.image_size / 256)

    def protect(self, image, landmarks, target=None, progress=None) -> ProtectionResult:
        return self.protect_many([(image, landmarks)], target, progress)[0]

    def protect_many(self, photos, target=None, progress=None) -> list[ProtectionResult]:
        """Every face of every photo in one batch; each result's ``history`` is the batch's (means over faces)."""
        for image, landmarks in photos:
            check_photo(image, landmarks)
        crops, matrices = crop_faces(photos, self.template, self.config.image_size)
        faces, steps, history = self.protect_faces(crops, target, progress)
        return [ProtectionResult(protected, steps, history)
                for protected in paste_faces(photos, faces, matrices, self.config.mask_scale)]

    def protect_faces(
        self,
        crops: torch.Tensor,
        target: dict[str, torch.Tensor] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, int, dict[str, list[float]]]:
        """Protect aligned faces ``F×3×S×S`` (RGB in [0, 1], aligned to ``self.template``), all in one batch.

        Returns ``(protected faces F×3×S×S, latent steps run, history)``; ``history`` holds per-step means over the
        faces of ``loss`` (``adv_weight`` × the FR term reduced by ``fr_reduction``, plus ``structure``),
        ``adversarial`` (1 − mean cosine over the surrogates toward the target, or mean cosine to the original)
        and ``structure``, the latent reconstruction error with the plain and the learned embeddings, and the
        wall-clock seconds of each stage (``seconds_inversion``, ``_embeddings``, ``_optimisation``, ``_decoding``).
        """
        cfg, sd = self.config, self.model
        n = crops.shape[0]
        crops = crops.to(sd.device, torch.float32)
        landmarks = self.template.to(crops).expand(n, 5, 2)
        path = sd.timesteps(cfg.diffusion_steps)[cfg.start_step:]
        total = cfg.null_steps * len(path) + cfg.steps
        done = 0

        clock = _StageClock(sd.device)

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        with torch.no_grad():
            reference = target or self.ensemble(crops, landmarks)
            reference = {k: v.to(crops).expand(n, -1) for k, v in reference.items()}
            clean = sd.encode_images(crops).float()
            unconditional = sd.encode_prompts([""]).expand(n, -1, -1)
            trajectory = ddim_invert(sd, clean, unconditional, path)
            plain = denoise(sd, trajectory[0], path, unconditional)
        clock.lap("inversion")
        learned = learn_unconditional_embeddings(sd, trajectory, path, unconditional, cfg.null_steps, cfg.null_lr,
                                                 progress=tick)
        clock.lap("embeddings")
        trace: list[torch.Tensor] = []
        latent = trajectory[0].detach().float().clone().requires_grad_(True)
        optimiser = torch.optim.AdamW([latent], lr=cfg.lr)
        with sd.record_self_attention(cfg.attention_layers, cfg.attention_max_tokens) as recorder:
            with torch.no_grad():
                denoise(sd, trajectory[0], path, learned.embeddings)
            original_maps = [m.detach() for m in recorder.take()]
            for _ in range(cfg.steps):
                faces = sd.decode_latents(denoise(sd, latent, path, learned.embeddings))
                maps = recorder.take()
                if len(maps) != len(original_maps):
                    raise FaceshieldError(f"adv-latent: {len(maps)} attention maps recorded, expected "
                                          f"{len(original_maps)}")
                # Per-face terms summed over faces: each face gets the gradient it would get alone.
                structure = sum((m - o).pow(2).mean(dim=(1, 2, 3)) for m, o in zip(maps, original_maps))
                embeddings = self.ensemble(faces, landmarks)
                cosines = torch.stack([(e * reference[k]).sum(-1) for k, e in embeddings.items()])  # models × faces
                per_model = 1 - cosines if target is not None else cosines
                fr = per_model.sum(0) if cfg.fr_reduction == "sum" else per_model.mean(0)
                adversarial = per_model.mean(0)
                loss = (cfg.adv_weight * fr + structure).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                # kept on the device: one host sync at the end instead of three per step
                trace.append(torch.stack([loss.detach() / n, adversarial.detach().mean(), structure.detach().mean()]))
                tick()
        clock.lap("optimisation")
        with torch.no_grad():
            faces = sd.decode_latents(denoise(sd, latent, path, learned.embeddings))
        clock.lap("decoding")
        per_step = torch.stack(trace).T.tolist() if trace else [[], [], []]
        history = {
            "loss": per_step[0], "adversarial": per_step[1], "structure": per_step[2],
            "reconstruction_mse_plain": [float((plain.float() - clean).pow(2).mean())],
            "reconstruction_mse_learned": [float((learned.reconstruction.float() - clean).pow(2).mean())],
            **{f"seconds_{stage}": [seconds] for stage, seconds in clock.laps.items()},
        }
        return faces, cfg.steps, history


class _StageClock:
    """Wall-clock seconds per stage; synchronises CUDA only at stage ends (one host sync per stage)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self.start = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[stage] = now - self.start
        self.start = now
