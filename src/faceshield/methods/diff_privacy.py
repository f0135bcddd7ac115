"""Diff-Privacy (IEEE TCSVT 2024): anonymize faces, hide identity from people while machines still match it, and
recover the original with an encrypted key.

Paper summary: ../shared/papers/diff-privacy.txt; algorithm, defaults and the public code's defects: METHODS.md.
These commands are not ``protect`` methods (they change who the face looks like), so Diff-Privacy is not in the
protect registry; this module is its API and :mod:`faceshield.cli.privacy` its commands.

Per face (aligned to a ``image_size``² CelebA-HQ-style crop, every face of a photo, pasted back at full resolution
through a feathered face mask):

1. **MSI**: a multi-scale image inversion module is trained on the face
   (:mod:`faceshield.diffusion.image_conditioning`); its 10 bucket tokens give 10 prompt embeddings ``c_b``.
2. **Anonymization** (:meth:`DiffPrivacy.anonymize_faces`): the clean latent is noised to strength 0.6 of a 50-step
   DDIM schedule with one random draw per variant, then sampled with ``c_b`` for t > 400 and the empty prompt after
   (guidance 1). At every step the energy ``E = Σ_i max(cos(f(x̂0_i), f(x)), 0) + Σ_{i<j} max(cos(f(x̂0_i),
   f(x̂0_j)), 0)`` of the decoded prediction x̂0 (summed over the FR models) is descended: ``z_{t−1} ← z_{t−1} −
   s·∇_{z_t}E``. For t < 300 the latent outside the face mask is replaced by the clean latent at the same noise
   level (so the background ends as the clean latent exactly).
3. **Hiding** (:meth:`DiffPrivacy.hide_faces`): the clean latent is DDIM-inverted (η = 0) along the last 80 of 100
   steps with ``c_b`` at every step; that z_T and the 10 tokens are the key. The published face is sampled from
   z_T with ``c_b`` for t > 600 (guidance 1.5 against the empty prompt) and the empty prompt after (guidance 2.5,
   the learned embedding as the negative), descending ``E = Σ (1 − cos(f(x̂0), f(x)))`` so FR still matches.
4. **Recovery** (:meth:`DiffPrivacy.recover_faces`): DDIM from the key's z_T with ``c_b`` at every step (the
   inversion run backwards), decoded and pasted into the published photo.

Choices where the paper and METHODS.md are silent (docs/diff-privacy.md lists them all): the energy gradient is
taken through the VAE decoder and the FR models with the UNet's ε held fixed (x̂0 is then linear in z_t; the
UNet's Jacobian would double the cost); after the hiding switch the empty prompt is the conditional and the learned
embedding the negative of classifier-free guidance (with the empty prompt on both sides a scale of 2.5 would do
nothing); the background is replaced by the clean latent noised with the variant's own starting noise; FR crops of
x̂0 come from our differentiable alignment to the crop's template (the public code slices a fixed box).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from faceshield.diffusion.hub import SD14_ID
from faceshield.diffusion.generation import guided_noise
from faceshield.diffusion.image_conditioning import (
    DEFAULT_CLIP, BUCKETS, ClipVision, TokenPrompt, bucket_of, load_clip_vision, train_msi,
)
from faceshield.diffusion.loading import StableDiffusion, cached_stable_diffusion
from faceshield.diffusion.schedule import NoiseSchedule
from faceshield.errors import FaceshieldError, ShapeError
from faceshield.faces.align import CELEBAHQ_256, crop_transform, warp_back, warp_to_crop
from faceshield.faces.masks import face_mask_from_landmarks, paste_crops
from faceshield.methods.recovery_key import KeyFileError, RecoveryKey
from faceshield.models.ensemble import FREnsemble
from faceshield.settings import SettingError, Settings, setting

log = logging.getLogger(__name__)

SD14 = SD14_ID
KEY_FORMAT = "faceshield-diff-privacy"
Progress = Callable[[str, int, int], None]  # (stage, step, total)


@dataclass
class DiffPrivacyConfig(Settings):
    """Settings of Diff-Privacy; defaults are the public code's (METHODS.md) unless noted.

    Attributes:
        diffusion_model: Stable Diffusion 1.x hub id or diffusers folder (SD v1.4 as the paper).
        clip_model: CLIP vision tower of the MSI, hub id or folder (ViT-L/14 as the paper).
        image_size: side of the aligned face crop the diffusion model works on (512 as the paper; multiple of 8).
        msi_steps, msi_lr, msi_flip: per-face MSI training (6100 AdamW steps at 1e-4 with random flips; the
            ``fast`` preset trains 600).
        variants: anonymized versions per face (4 as the public code's batch), pushed apart by the pairwise term.
        anonymize_steps, anonymize_strength: DDIM steps and the share of them run (50, 0.6: start at step 30… of 50).
        anonymize_switch: learned conditioning for t above it, the empty prompt at and below (400).
        anonymize_guidance: classifier-free guidance scale (1: conditional ε alone).
        anonymize_energy: step size s of the energy descent (1.0).
        pairwise_weight: weight of the between-variant term of the anonymization energy (1).
        background_switch: for t below it the latent outside the face mask is the clean latent (300).
        hide_steps, hide_strength: DDIM steps and share run for hiding and recovery (100, 0.8).
        hide_switch: learned conditioning above it (600); hide_guidance_early / _late: guidance above / below (1.5 / 2.5).
        hide_energy: step size of the identity-keeping energy descent (1.0; not given for hiding: ours).
        inversion_iterations: fixed-point refinements per inversion step so that recovery retraces the key's
            inversion exactly (ours; 0 = the public code's plain η = 0 inversion).
        fr_models: FR models of the energy (pluggable; empty = every calibrated model with AUC ≥ 0.9; by-path models
            such as ``arcface-ir-se50``, the paper's, or ``facenet-vggface2`` work once their weights are supplied).
        fr_weights: ``NAME=PATH`` weights files of by-path FR models (else ``$FACESHIELD_WEIGHTS`` or a mirror).
        face_parsing: BiSeNet face parsing (``79999_iter.pth``) for the background and paste masks as the paper:
            a path, ``bisenet`` (found through ``$FACESHIELD_WEIGHTS``/mirror) or empty = our landmark ellipse.
        mask_scale: size of the face ellipse (background mask and paste-back; 1 = forehead to chin).
        seed: of the anonymization noise and the MSI training.
        device, dtype: where to run; ``auto`` = bfloat16 on CUDA, float32 on CPU.
    """

    diffusion_model: str = SD14
    clip_model: str = DEFAULT_CLIP
    image_size: int = setting(512, "[64, 2048]")
    msi_steps: int = setting(6100, "[0, inf)")
    msi_lr: float = setting(1e-4, "(0, inf)")
    msi_flip: bool = True
    variants: int = setting(4, "[1, 64]")
    anonymize_steps: int = setting(50, "[1, 1000]")
    anonymize_strength: float = setting(0.6, "(0, 1]")
    anonymize_switch: int = setting(400, "[0, 1000]")
    anonymize_guidance: float = setting(1.0, "[0, 50]")
    anonymize_energy: float = setting(1.0, "[0, inf)")
    pairwise_weight: float = setting(1.0, "[0, inf)")
    background_switch: int = setting(300, "[0, 1000]")
    hide_steps: int = setting(100, "[1, 1000]")
    hide_strength: float = setting(0.8, "(0, 1]")
    hide_switch: int = setting(600, "[0, 1000]")
    hide_guidance_early: float = setting(1.5, "[0, 50]")
    hide_guidance_late: float = setting(2.5, "[0, 50]")
    hide_energy: float = setting(1.0, "[0, inf)")
    inversion_iterations: int = setting(5, "[0, 100]")
    fr_models: tuple[str, ...] = ()
    fr_weights: tuple[str, ...] = ()
    face_parsing: str = ""
    mask_scale: float = setting(1.3, "(0, 10]")
    seed: int = setting(0, "[0, inf)")
    device: str = "cpu"
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 8:
            raise FaceshieldError(f"diff-privacy: image_size must be a multiple of 8, got {self.image_size}")
        bad = [w for w in self.fr_weights if not w.partition("=")[0].strip() or not w.partition("=")[2].strip()]
        if bad:
            raise SettingError(f"diff-privacy: fr_weights entry {bad[0]!r} is not NAME=PATH")
        unused = sorted(set(self.weights_of()) - set(self.fr_models))
        if unused:
            raise SettingError(f"diff-privacy: fr_weights gives weights for {unused[0]}, which fr_models does not list; "
                               f"add it, e.g. --fr-models {unused[0]}")

    def weights_of(self) -> dict[str, str]:
        """``fr_weights`` as ``{model: path}``."""
        return {k.strip(): p.strip() for k, _, p in (w.partition("=") for w in self.fr_weights)}


PRESETS = {"fast": {"msi_steps": 600}, "paper": {}}


def strength_path(timesteps: list[int], strength: float) -> list[int]:
    """The last ``int(len·strength)`` timesteps (diffusers' img2img rule): 50 steps at 0.6 → the last 30."""
    run = max(1, min(len(timesteps), int(len(timesteps) * strength)))
    return timesteps[len(timesteps) - run :]


def anonymization_energy(embeddings: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], variants: int,
                         pairwise_weight: float = 1.0) -> torch.Tensor:
    """``Σ_models [Σ_i max(cos(e_i, r_i), 0) + w·Σ_faces Σ_{i<j} max(cos(e_i, e_j), 0)]`` (a scalar).

    ``embeddings``/``reference``: ``{model: R×D}`` unit vectors, rows face-major (face f variant v = f·V + v);
    ``reference`` holds each row's original face. The pairwise sum runs over the variants of the same face.
    """
    total = next(iter(embeddings.values())).new_zeros(())
    for name, e in embeddings.items():
        total = total + (e * reference[name]).sum(-1).clamp_min(0).sum()
        if variants > 1 and pairwise_weight > 0:
            per_face = e.view(-1, variants, e.shape[-1])
            upper = torch.triu(torch.ones(variants, variants, dtype=torch.bool, device=e.device), diagonal=1)
            gram = per_face @ per_face.transpose(1, 2)
            total = total + pairwise_weight * gram[:, upper].clamp_min(0).sum()
    return total


def hiding_energy(embeddings: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_models Σ_rows (1 − cos(e, r))``: low while FR still matches the original (``{model: R×D}`` unit rows)."""
    return sum((1 - (e * reference[k]).sum(-1)).sum() for k, e in embeddings.items())


@dataclass
class PreparedFaces:
    """Aligned faces ready for generation.

    Attributes:
        crops: ``F×3×S×S`` RGB in [0, 1]; clean: ``F×4×h×w`` latents; tokens: ``F×10×D`` MSI bucket tokens;
        msi_loss: per face, the MSI's training loss trace; seconds: MSI training time per face;
        masks: ``F×1×S×S`` face-parsing masks of the crops (1 = face), None = the landmark ellipse.
    """

    crops: torch.Tensor
    clean: torch.Tensor
    tokens: torch.Tensor
    msi_loss: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    masks: torch.Tensor | None = None


@dataclass
class Generated:
    """Generated faces ``R×3×S×S`` (R = faces × variants, face-major), their final latents, per-step energies and
    stage seconds."""

    faces: torch.Tensor
    latents: torch.Tensor
    energy: list[float] = field(default_factory=list)
    seconds: float = 0.0


class DiffPrivacy:
    """Diff-Privacy's three operations on aligned faces and on whole photos.

    Args:
        config: settings (defaults: the paper's).
        model, clip, ensemble: already loaded models to use instead of loading ``config``'s.
    """

    def __init__(self, config: DiffPrivacyConfig | None = None, model: StableDiffusion | None = None,
                 clip: ClipVision | None = None, ensemble: FREnsemble | None = None):
        self.config = config or DiffPrivacyConfig()
        cfg = self.config
        self.model = model or cached_stable_diffusion(cfg.diffusion_model, cfg.device, cfg.dtype)
        self._clip = clip
        self._ensemble = ensemble
        self.template = torch.tensor(CELEBAHQ_256) * (cfg.image_size / 256)

    # ------------------------------------------------------------------------------------------ models

    @property
    def clip(self) -> ClipVision:
        if self._clip is None:
            self._clip = load_clip_vision(self.config.clip_model, self.model.device)
        return self._clip

    @property
    def ensemble(self) -> FREnsemble:
        if self._ensemble is None:
            from faceshield.adversarial import surrogate_ensemble
            from faceshield.models.registry import cached_fr_model

            # By-path models are built with their weights file; thresholds are never used here (the energy only
            # needs embeddings), so uncalibrated models are fine.
            weights = self.config.weights_of()
            names = [cached_fr_model(n, str(self.model.device), weights[n]) if n in weights else n
                     for n in self.config.fr_models]
            self._ensemble = (FREnsemble(names, self.model.device) if names
                              else surrogate_ensemble((), self.model.device)[0])
        return self._ensemble

    def crop_masks(self, crops: torch.Tensor, source: str | None = None) -> torch.Tensor | None:
        """Face masks ``F×1×S×S`` of aligned crops from BiSeNet parsing (1 = regenerated, the background class is
        kept as Diff-Privacy does), or None for the landmark ellipse. ``source``: weights path, ``bisenet`` (the
        asset, through ``$FACESHIELD_WEIGHTS``/mirror) or empty; None = ``config.face_parsing``."""
        source = self.config.face_parsing if source is None else source
        if not source:
            return None
        from faceshield.faces.parsing import load_face_parser

        parser = load_face_parser("" if source == "bisenet" else source, str(self.model.device))
        with torch.no_grad():
            return parser(crops.float().to(self.model.device))

    def _landmarks(self, n: int) -> torch.Tensor:
        return self.template.to(self.model.device).expand(n, 5, 2)

    def _identity(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{model: R×D}`` unit embeddings of aligned faces (differentiable)."""
        return self.ensemble(faces.float(), self._landmarks(faces.shape[0]))

    def latent_mask(self, crop_masks: torch.Tensor | None = None) -> torch.Tensor:
        """The face mask of the crop at latent resolution, ``1×1×h×w`` (ellipse) or ``F×1×h×w`` (from ``crop_masks``
        ``F×1×S×S``, the parsing masks) in [0, 1] (1 = face)."""
        size = self.config.image_size
        mask = (face_mask_from_landmarks(self.template[None], size, scale=self.config.mask_scale, softness=0.25)
                if crop_masks is None else crop_masks.float().cpu())
        f = self.model.vae_factor
        return F.avg_pool2d(mask, f).to(self.model.device)

    # ------------------------------------------------------------------------------------------ faces

    def prepare_faces(self, crops: torch.Tensor, progress: Progress | None = None) -> PreparedFaces:
        """Encode aligned faces ``F×3×S×S`` and train one MSI per face."""
        cfg, sd = self.config, self.model
        if crops.ndim != 4 or crops.shape[1:] != (3, cfg.image_size, cfg.image_size):
            raise ShapeError(f"expected faces F×3×{cfg.image_size}×{cfg.image_size}, got {tuple(crops.shape)}")
        crops = crops.to(sd.device, torch.float32)
        start = time.perf_counter()
        tokens, losses = [], []
        for i in range(crops.shape[0]):
            step = None if progress is None else (lambda k, n, i=i: progress(f"MSI face {i + 1}", k, n))
            result = train_msi(sd, self.clip, crops[i : i + 1], cfg.msi_steps, cfg.msi_lr, cfg.msi_flip,
                               seed=cfg.seed + i, progress=step)
            tokens.append(result.tokens)
            losses.append(result.loss)
        with torch.no_grad():
            clean = sd.encode_images(crops).float()
        seconds = (time.perf_counter() - start) / max(1, crops.shape[0])
        return PreparedFaces(crops, clean, torch.stack(tokens), losses, seconds, self.crop_masks(crops))

    def bucket_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """``F×10×L×D`` prompt embeddings of ``F×10×D`` bucket tokens."""
        prompt = TokenPrompt(self.model)
        with torch.no_grad():
            return torch.stack([prompt.encode(t.to(self.model.device, torch.float32)) for t in tokens])

    def _per_row(self, embeddings: torch.Tensor, t: int, repeat: int = 1) -> torch.Tensor:
        """``R×L×D``: each face's embedding of the bucket of ``t``, repeated ``repeat`` times (variants)."""
        return embeddings[:, bucket_of(t, len(self.model.schedule.alphas_cumprod))].repeat_interleave(repeat, 0)

    def _empty(self, rows: int) -> torch.Tensor:
        return self.model.encode_prompts([""]).expand(rows, -1, -1)

    def _sample(self, z: torch.Tensor, path: list[int], guidance_at: Callable[[int], tuple],
                energy: Callable[[torch.Tensor], torch.Tensor] | None, scale: float,
                background: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, list[float]]:
        """DDIM (η = 0) along ``path`` with energy descent on x̂0 and optional background replacement.

        ``guidance_at(t) -> (cond, uncond, scale)``; ``energy(decoded x̂0 R×3×S×S) -> scalar``; ``background(i, z)``
        returns the latent after step ``i`` with the background put back.
        """
        sd = self.model
        alphas = [sd.schedule.alpha(t) for t in path] + [sd.schedule.alpha(None)]
        trace = []
        for i, t in enumerate(path):
            cond, uncond, g = guidance_at(t)
            with torch.no_grad():
                eps = guided_noise(sd, z, t, cond, uncond, g).float()
                z_next = NoiseSchedule.ddim_move(z, eps, alphas[i], alphas[i + 1])
            if energy is not None and scale > 0:
                zz = z.detach().requires_grad_(True)
                x0 = (zz - (1 - alphas[i]) ** 0.5 * eps) / alphas[i] ** 0.5
                value = energy(sd.decode_latents(x0))
                (grad,) = torch.autograd.grad(value, zz)
                z_next = z_next - scale * grad
                trace.append(float(value.detach()))
            z = z_next if background is None else background(i, z_next)
            if progress is not None:
                progress(i + 1, len(path))
        return z.detach(), trace

    def anonymize_faces(self, prepared: PreparedFaces, variants: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> Generated:
        """``variants`` anonymized versions of each prepared face (rows face-major: face f variant v = f·V + v)."""
        cfg, sd = self.config, self.model
        v = cfg.variants if variants is None else variants
        n = prepared.clean.shape[0]
        rows = n * v
        start = time.perf_counter()
        path = strength_path(sd.timesteps(cfg.anonymize_steps), cfg.anonymize_strength)
        embeddings = self.bucket_embeddings(prepared.tokens)
        empty = self._empty(rows)
        clean = prepared.clean.repeat_interleave(v, 0)
        generator = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn(clean.shape, generator=generator).to(sd.device)
        a0 = sd.schedule.alpha(path[0])
        z = a0**0.5 * clean + (1 - a0) ** 0.5 * noise
        with torch.no_grad():
            reference = {k: e.repeat_interleave(v, 0) for k, e in self._identity(prepared.crops).items()}
        mask = self.latent_mask(prepared.masks)
        if prepared.masks is not None:  # one parsing mask per face, rows face-major
            mask = mask.repeat_interleave(v, 0)
        levels = [sd.schedule.alpha(t) for t in path[1:]] + [sd.schedule.alpha(None)]

        def guidance_at(t: int):
            cond = self._per_row(embeddings, t, v) if t > cfg.anonymize_switch else empty
            return cond, empty, cfg.anonymize_guidance

        def energy(images: torch.Tensor) -> torch.Tensor:
            return anonymization_energy(self._identity(images), reference, v, cfg.pairwise_weight)

        def background(i: int, z_next: torch.Tensor) -> torch.Tensor:
            if path[i] >= cfg.background_switch:
                return z_next
            if i == len(path) - 1:  # the sampler's output is taken as clean: the background is exactly z₀
                return mask * z_next + (1 - mask) * clean
            a = levels[i]
            kept = a**0.5 * clean + (1 - a) ** 0.5 * noise
            return mask * z_next + (1 - mask) * kept

        z, trace = self._sample(z, path, guidance_at, energy, cfg.anonymize_energy, background, progress)
        with torch.no_grad():
            faces = sd.decode_latents(z)
        return Generated(faces, z, trace, time.perf_counter() - start)

    def hide_path(self) -> list[int]:
        return strength_path(self.model.timesteps(self.config.hide_steps), self.config.hide_strength)

    def invert(self, clean: torch.Tensor, embeddings: torch.Tensor, path: list[int]) -> torch.Tensor:
        """η = 0 DDIM inversion of clean latents ``F×4×h×w`` to the start of ``path``, with each face's bucket
        embedding at every step (``embeddings`` ``F×10×L×D``): the key's z_T."""
        sd = self.model
        alphas = [sd.schedule.alpha(t) for t in path] + [sd.schedule.alpha(None)]
        z = clean
        with torch.no_grad():
            for i in reversed(range(len(path))):
                cond = self._per_row(embeddings, path[i])
                lower = z
                eps = sd.predict_noise(lower, path[i], cond).float()
                z = NoiseSchedule.ddim_move(lower, eps, alphas[i + 1], alphas[i])
                # Sampling step i reads ε at the noisier latent; iterate so the inversion uses that same ε and
                # sampling retraces it (plain η = 0 inversion reads ε at the less noisy one: 0 iterations).
                for _ in range(self.config.inversion_iterations):
                    eps = sd.predict_noise(z, path[i], cond).float()
                    z = NoiseSchedule.ddim_move(lower, eps, alphas[i + 1], alphas[i])
        return z

    def hide_faces(self, prepared: PreparedFaces, progress: Callable[[int, int], None] | None = None
                   ) -> tuple[Generated, torch.Tensor]:
        """Hidden faces (people do not recognise them; FR still matches) and the inverted noise z_T ``F×4×h×w``."""
        cfg, sd = self.config, self.model
        start = time.perf_counter()
        n = prepared.clean.shape[0]
        path = self.hide_path()
        embeddings = self.bucket_embeddings(prepared.tokens)
        noise = self.invert(prepared.clean, embeddings, path)
        empty = self._empty(n)
        with torch.no_grad():
            reference = self._identity(prepared.crops)

        def guidance_at(t: int):
            learned = self._per_row(embeddings, t)
            if t > cfg.hide_switch:
                return learned, empty, cfg.hide_guidance_early
            return empty, learned, cfg.hide_guidance_late

        def energy(images: torch.Tensor) -> torch.Tensor:
            return hiding_energy(self._identity(images), reference)

        z, trace = self._sample(noise, path, guidance_at, energy, cfg.hide_energy, None, progress)
        with torch.no_grad():
            faces = sd.decode_latents(z)
        return Generated(faces, z, trace, time.perf_counter() - start), noise

    def recover_faces(self, noise: torch.Tensor, tokens: torch.Tensor, path: list[int] | None = None
                      ) -> Generated:
        """DDIM from the key's z_T ``F×4×h×w`` with the bucket embeddings of ``tokens`` ``F×10×D`` at every step."""
        sd = self.model
        start = time.perf_counter()
        path = path or self.hide_path()
        embeddings = self.bucket_embeddings(tokens)
        alphas = [sd.schedule.alpha(t) for t in path] + [sd.schedule.alpha(None)]
        z = noise.to(sd.device, torch.float32)
        with torch.no_grad():
            for i, t in enumerate(path):
                eps = sd.predict_noise(z, t, self._per_row(embeddings, t)).float()
                z = NoiseSchedule.ddim_move(z, eps, alphas[i], alphas[i + 1])
            faces = sd.decode_latents(z)
        return Generated(faces, z, [], time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------ photos

    def crops_of(self, image: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned crops ``F×3×S×S`` and image→crop matrices ``F×2×3`` of the faces with ``landmarks`` ``F×5×2``."""
        if image.ndim != 4 or image.shape[:2] != (1, 3) or landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
            raise ShapeError(f"expected image 1×3×H×W and landmarks F×5×2, got {tuple(image.shape)} and "
                             f"{tuple(landmarks.shape)}")
        matrices = crop_transform(landmarks.to(image), self.template.to(image))
        crops = warp_to_crop(image, matrices, self.config.image_size, padding_mode="border", antialias=True)
        return crops, matrices

    def paste(self, image: torch.Tensor, faces: torch.Tensor, landmarks: torch.Tensor,
              matrices: torch.Tensor, crop_masks: torch.Tensor | None = None) -> torch.Tensor:
        """``image`` with ``faces`` (aligned crops) pasted back through feathered face masks (the landmark ellipse,
        or ``crop_masks`` ``F×1×S×S`` — face parsing of the crops — warped back into the photo)."""
        if crop_masks is None:
            masks = face_mask_from_landmarks(landmarks.to(image), tuple(image.shape[-2:]),
                                             scale=self.config.mask_scale, softness=0.25)
        else:
            masks = warp_back(crop_masks.to(image), matrices.to(image), tuple(image.shape[-2:])).clamp(0, 1)
        return paste_crops(image, faces.to(image), matrices.to(image), masks).clamp(0, 1)

    def anonymize(self, image: torch.Tensor, landmarks: torch.Tensor, variants: int | None = None,
                  progress: Progress | None = None) -> tuple[list[torch.Tensor], dict]:
        """Anonymize every face of a photo: ``variants`` photos ``1×3×H×W`` and a summary (seconds per stage)."""
        v = self.config.variants if variants is None else variants
        crops, matrices = self.crops_of(image, landmarks)
        prepared = self.prepare_faces(crops, progress)
        step = None if progress is None else (lambda k, n: progress("anonymize", k, n))
        generated = self.anonymize_faces(prepared, v, step)
        n = crops.shape[0]
        photos = [self.paste(image, generated.faces[k::v], landmarks, matrices, prepared.masks) for k in range(v)]
        info = {"faces": n, "variants": v, "seconds_msi": prepared.seconds * n,
                "seconds_anonymize": generated.seconds, "energy": generated.energy}
        return photos, info

    def hide(self, image: torch.Tensor, landmarks: torch.Tensor, progress: Progress | None = None
             ) -> tuple[torch.Tensor, RecoveryKey, dict]:
        """Hide every face of a photo: the published photo ``1×3×H×W`` and its (unencrypted) key, whose
        ``published_sha256`` the caller sets from the written file."""
        crops, matrices = self.crops_of(image, landmarks)
        prepared = self.prepare_faces(crops, progress)
        step = None if progress is None else (lambda k, n: progress("hide", k, n))
        generated, noise = self.hide_faces(prepared, step)
        published = self.paste(image, generated.faces, landmarks, matrices, prepared.masks)
        sd = self.model
        key = RecoveryKey(
            {"noise": noise.cpu(), "tokens": prepared.tokens.cpu(), "landmarks": landmarks.detach().cpu().double(),
             "matrices": matrices.detach().cpu().double()},
            {"format": KEY_FORMAT, "diffusion_model": str(sd.source), "scheduler": sd.scheduler_config,
             "hide_steps": self.config.hide_steps, "hide_strength": self.config.hide_strength,
             "path": self.hide_path(), "image_size": self.config.image_size, "mask_scale": self.config.mask_scale,
             "photo_size": list(image.shape[-2:]), "faces": int(landmarks.shape[0]),
             "face_parsing": prepared.masks is not None})
        info = {"faces": int(landmarks.shape[0]), "seconds_msi": prepared.seconds * crops.shape[0],
                "seconds_hide": generated.seconds, "energy": generated.energy}
        return published, key, info

    def recover(self, published: torch.Tensor, key: RecoveryKey) -> tuple[torch.Tensor, dict]:
        """The original photo regenerated from ``key`` into ``published`` (``1×3×H×W``)."""
        meta = key.meta
        if meta.get("format") != KEY_FORMAT:
            raise KeyFileError("not a Diff-Privacy recovery key")
        if list(published.shape[-2:]) != list(meta["photo_size"]):
            raise KeyFileError(f"the key is for a {meta['photo_size'][1]}×{meta['photo_size'][0]} photo, this one is "
                               f"{published.shape[-1]}×{published.shape[-2]}")
        if meta["image_size"] != self.config.image_size:
            raise KeyFileError(f"the key was made with image_size {meta['image_size']}, not {self.config.image_size}")
        generated = self.recover_faces(key.tensors["noise"], key.tensors["tokens"], [int(t) for t in meta["path"]])
        landmarks = key.tensors["landmarks"].to(published)
        matrices = key.tensors["matrices"].to(published)
        # A key made with face parsing pastes back through the parsing of the recovered (original) face, found
        # through this config's face_parsing or else the asset ($FACESHIELD_WEIGHTS / mirror).
        source = self.config.face_parsing or ("bisenet" if meta.get("face_parsing") else "")
        masks = self.crop_masks(generated.faces, source)
        return self.paste(published, generated.faces, landmarks, matrices, masks), {"seconds_recover": generated.seconds}


def check_key_model(key: RecoveryKey, model: StableDiffusion) -> None:
    """Recovery must run the model and schedule the key was made with (same id or folder, same scheduler)."""
    meta = key.meta
    same_schedule = all(meta["scheduler"].get(k) == model.scheduler_config.get(k)
                        for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"))
    if not same_schedule:
        raise KeyFileError(f"the key was made with another noise schedule ({meta['diffusion_model']}); recover with "
                           f"--diffusion-model {meta['diffusion_model']}")
    if BUCKETS != key.tensors["tokens"].shape[1]:
        raise KeyFileError("the key's MSI tokens do not have 10 timestep buckets")

