"""Anti-customization set methods ``aspl`` (Anti-DreamBooth) and ``haa`` (Hierarchical Anti-Aesthetics).

Papers: ../shared/papers/hierarchical-anti-aesthetics.txt; algorithms and defaults: METHODS.md ("Hierarchical
Anti-Aesthetics", "ASPL"). Threat: someone fine-tunes Stable Diffusion (DreamBooth / LoRA) on a person's photos.
Both methods protect the photos of one person *as a set* (``set_method``: ``protect`` hands them all over in one
``protect_many`` call) under an L∞ budget.

ASPL (alternating surrogate and perturbation learning), per outer step (50):
copy the surrogate → train the copy ``surrogate_steps`` (3) steps on the clean reference set A → ``pgd_steps`` (6)
steps ``δ ← Proj(δ + α·sign ∇_δ L_denoise)`` against the copy → train the surrogate 3 steps on the current
protected set. ``L_denoise`` is DreamBooth's ε-MSE at a random timestep with the instance prompt. The copy is a
snapshot of the trainable weights restored afterwards, not a second model in memory.

HAA = ASPL's alternation with the update (ascent on all terms)
``g ← μ·g + ∇/‖∇‖₁``, ``∇ = ∇_δ(L_denoise + λ_g·L_global) + λ_l·m ⊙ ∇_δ L_local``, ``δ ← Proj(δ + α·sign g)``:
L_global is the anti-aesthetic reward loss (:func:`faceshield.diffusion.rewards.anti_aesthetic_loss`) of the
reward model on the surrogate's one-step prediction x̂₀ of the whole image (from the same ``z_t`` and ε̂ as
L_denoise, so one UNet call serves both); L_local the same on the face region of x̂₀ (a square crop around our
landmark face mask, resized to ``local_size``), and its gradient is restricted to the face mask ``m``.

Working image: DreamBooth's view of a photo — the centred square of side min(H, W), resized to ``resolution``.
The perturbation found there is upsampled bilinearly (a convex combination: the L∞ bound is kept) onto that square
of the full-resolution photo; the rest of the photo is untouched.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from faceshield.diffusion.loading import DEFAULT_MODEL, StableDiffusion
from faceshield.errors import FaceshieldError
from faceshield.faces.masks import face_mask_from_landmarks
from faceshield.methods.base import ProtectionMethod, ProtectionResult, check_photo, register_method
from faceshield.settings import Settings, setting

log = logging.getLogger(__name__)


@dataclass
class ASPLConfig(Settings):
    """Settings of ``aspl``; defaults are ASPL's (METHODS.md) except the surrogate's memory mode.

    Attributes:
        diffusion_model: Stable Diffusion 1.x/2.x hub id or local diffusers folder (ASPL: SD 2.1-base).
        epsilon: L∞ budget in [0, 1] pixels (ASPL: 0.05 in [-1, 1] = 0.025 ≈ 6.4/255).
        step_size: α (ASPL: 0.005 in [-1, 1] = 0.0025).
        outer_steps, surrogate_steps, pgd_steps: the alternation (50 × (3 + 6 + 3)).
        resolution: side of the working image (512).
        reference_dir: folder of clean photos of the same person that train the surrogate's copy (ASPL's set A);
            empty = the clean photos being protected.
        surrogate: ``lora`` (default: fits a 24 GB GPU) or ``full`` (ASPL's exact surrogate: the whole UNet and
            the text encoder, lr 5e-7; needs ≥ 32 GB).
        surrogate_lr (full, 5e-7, ASPL), lora_lr (1e-4), lora_rank (4), weight_decay (1e-2, ASPL).
        prior_weight: prior preservation in the surrogate's training (ASPL uses it with 200 class images; 0 = off,
            our default: it costs 200 generations).
        instance_prompt: "a photo of sks person".
        gradient_checkpointing, mixed_precision, eight_bit_adam: memory modes (diffusion/finetune.py).
        surrogates: FR models of the per-photo record (informational; see docs/anti-customization.md).
        seed: of every random draw (timesteps, noise, batch order); device, dtype.
    """

    diffusion_model: str = DEFAULT_MODEL
    epsilon: float = setting(0.05 / 2, "(0, 1]")
    step_size: float = setting(0.005 / 2, "(0, 1]")
    outer_steps: int = setting(50, "[1, 10000]")
    surrogate_steps: int = setting(3, "[0, 1000]")
    pgd_steps: int = setting(6, "[1, 1000]")
    resolution: int = setting(512, "[64, 2048]")
    reference_dir: str = ""
    surrogate: str = setting("lora", choices=("lora", "full"))
    surrogate_lr: float = setting(5e-7, "(0, 1]")
    lora_lr: float = setting(1e-4, "(0, 1]")
    lora_rank: int = setting(4, "[1, 1024]")
    weight_decay: float = setting(1e-2, "[0, 1]")
    prior_weight: float = setting(0.0, "[0, inf)")
    instance_prompt: str = "a photo of sks person"
    gradient_checkpointing: bool = True
    mixed_precision: str = setting("auto", choices=("auto", "bf16", "no"))
    eight_bit_adam: bool = True
    surrogates: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution % 8:
            raise FaceshieldError(f"resolution must be a multiple of 8, got {self.resolution}")


@dataclass
class HAAConfig(ASPLConfig):
    """Settings of ``haa``: ASPL's, plus the reward terms (the paper gives none of these values).

    Attributes:
        momentum: μ of the update (1.0, MI-FGSM's).
        denoise_weight: weight of L_denoise (1.0); global_weight: λ_g (1.0); local_weight: λ_l (1.0).
        reward_model: ``brisque`` (weight-free, default), ``laion`` (reward_path = the MLP file, reward_clip =
            CLIP ViT-L/14 hub id or folder) or ``imagereward`` (reward_path = ImageReward.pt, med_config.json
            beside it; reward_tokenizer = bert-base-uncased folder, hub id or vocab.txt).
        reward_prompt: ImageReward's prompt ("a photo of person").
        mask_scale: size of the landmark face ellipse of the local term (1 = forehead to chin).
        local_size: side the face crop is resized to for the local reward (128).
    """

    momentum: float = setting(1.0, "[0, 10]")
    denoise_weight: float = setting(1.0, "[0, inf)")
    global_weight: float = setting(1.0, "[0, inf)")
    local_weight: float = setting(1.0, "[0, inf)")
    reward_model: str = setting("brisque", choices=("brisque", "laion", "imagereward"))
    reward_path: str = ""
    reward_clip: str = "openai/clip-vit-large-patch14"
    reward_prompt: str = "a photo of person"
    reward_tokenizer: str = "bert-base-uncased"
    mask_scale: float = setting(1.0, "(0, 10]")
    local_size: int = setting(128, "[32, 1024]")


def momentum_update(g: torch.Tensor, grad: torch.Tensor, mu: float) -> torch.Tensor:
    """``μ·g + grad/‖grad‖₁`` with the L1 norm per image (``B×…``); a zero gradient adds nothing."""
    norm = grad.abs().flatten(1).sum(1).clamp_min(1e-30).view(-1, *([1] * (grad.ndim - 1)))
    return mu * g + grad / norm


def project(delta: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """δ clipped to ``[−ε, ε]`` and so that ``clean + δ`` stays in [0, 1]."""
    delta = delta.clamp(-epsilon, epsilon)
    return (clean + delta).clamp(0, 1) - clean


def square_crop(shape: tuple[int, int]) -> tuple[int, int, int]:
    """``(top, left, side)`` of the centred square of an ``H×W`` photo (what DreamBooth trains on)."""
    h, w = shape
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side


def face_boxes(masks: torch.Tensor, minimum: int = 16) -> list[tuple[int, int, int]]:
    """Per mask ``B×1×H×W``, the square ``(top, left, side)`` around its pixels > 0.5 (the whole image if none)."""
    boxes = []
    h, w = masks.shape[-2:]
    for m in masks[:, 0] > 0.5:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys) == 0:
            boxes.append((0, 0, min(h, w)))
            continue
        side = min(max(int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1, minimum), h, w)
        cy, cx = (int(ys.min()) + int(ys.max())) // 2, (int(xs.min()) + int(xs.max())) // 2
        top, left = min(max(cy - side // 2, 0), h - side), min(max(cx - side // 2, 0), w - side)
        boxes.append((top, left, side))
    return boxes


def crops(images: torch.Tensor, boxes: list[tuple[int, int, int]], size: int) -> torch.Tensor:
    """Square crops of ``images`` at ``boxes`` resized to ``size`` (bilinear, antialiased), differentiable."""
    out = [F.interpolate(img[None, :, t:t + s, l:l + s], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True) for img, (t, l, s) in zip(images, boxes)]
    return torch.cat(out)


@register_method
class ASPL(ProtectionMethod):
    """Anti-DreamBooth's ASPL (see the module docstring)."""

    name = "aspl"
    Config = ASPLConfig
    goals = ("anti-customization",)
    set_method = True  # protect_many receives every photo of the person at once

    def __init__(self, config: ASPLConfig | None = None, model: StableDiffusion | None = None):
        """``model``: a loaded Stable Diffusion to train in place instead of loading ``config.diffusion_model``
        (the surrogate's weights are changed: pass a model of its own)."""
        super().__init__(config)
        self._model = model
        self.last: dict = {}  # after a run: the finetuner (surrogate), for inspection and tests

    @property
    def model(self) -> StableDiffusion:
        if self._model is None:
            from faceshield.diffusion.loading import load_stable_diffusion

            # a model of its own: the surrogate is trained in place
            self._model = load_stable_diffusion(self.config.diffusion_model, self.config.device, self.config.dtype)
        return self._model

    @functools.cached_property
    def ensemble(self):
        """The FR models of the per-photo record (loaded on first use: the protection itself needs none)."""
        from faceshield.adversarial import surrogate_ensemble

        return surrogate_ensemble(self.config.surrogates, self.config.device)[0]

    def finetune_config(self):
        from faceshield.diffusion.finetune import FinetuneConfig

        cfg = self.config
        return FinetuneConfig(mode=cfg.surrogate, lr=cfg.surrogate_lr, lora_lr=cfg.lora_lr, lora_rank=cfg.lora_rank,
                              weight_decay=cfg.weight_decay, train_text_encoder=True,
                              instance_prompt=cfg.instance_prompt, prior_weight=cfg.prior_weight,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              mixed_precision=cfg.mixed_precision, eight_bit_adam=cfg.eight_bit_adam)

    def protect(self, image, landmarks, target=None, progress=None) -> ProtectionResult:
        return self.protect_many([(image, landmarks)], target, progress)[0]

    def protect_many(self, photos, target=None, progress=None) -> list[ProtectionResult]:
        """Protect the photos ``[(image 1×3×H×W, landmarks F×5×2)]`` of one person together, as one set."""
        if target is not None:
            raise FaceshieldError(f"{self.name} protects against customization; it has no impersonation target")
        r = self.config.resolution
        work, marks, boxes = [], [], []
        for image, landmarks in photos:
            check_photo(image, landmarks)
            top, left, side = square_crop(tuple(image.shape[-2:]))
            boxes.append((top, left, side))
            work.append(F.interpolate(image[..., top:top + side, left:left + side].float(), size=(r, r),
                                      mode="bilinear", align_corners=False, antialias=True).clamp(0, 1))
            marks.append((landmarks.float() - torch.tensor([left, top])) * (r / side))
        reference = self._reference() if self.config.reference_dir else None
        protected, history = self.protect_set(torch.cat(work), marks, reference, progress)
        results = []
        for (image, _), (top, left, side), clean, prot in zip(photos, boxes, work, protected):
            delta = F.interpolate(prot[None] - clean, size=(side, side), mode="bilinear", align_corners=False)
            delta = delta.clamp(-self.config.epsilon, self.config.epsilon).to(image)
            out = image.clone()
            region = out[..., top:top + side, left:left + side]
            out[..., top:top + side, left:left + side] = (region + delta).clamp(0, 1)
            results.append(ProtectionResult(out, self.config.outer_steps * self.config.pgd_steps, history))
        return results

    def _reference(self) -> torch.Tensor:
        from faceshield.images import is_supported, load_image, to_tensor

        folder = Path(self.config.reference_dir).expanduser()
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_supported(p)) if folder.is_dir() else []
        if not files:
            raise FaceshieldError(f"{self.name}: reference_dir {str(folder)!r} has no photos; give a folder of clean "
                                  "photos of the same person, or leave it empty to use the photos being protected")
        r = self.config.resolution
        out = []
        for f in files:
            image = to_tensor(load_image(f).rgb)
            top, left, side = square_crop(tuple(image.shape[-2:]))
            out.append(F.interpolate(image[..., top:top + side, left:left + side], size=(r, r), mode="bilinear",
                                     align_corners=False, antialias=True).clamp(0, 1))
        return torch.cat(out)

    # --- the alternation ---------------------------------------------------------------------------------------
    def protect_set(self, clean: torch.Tensor, landmarks: list[torch.Tensor], reference: torch.Tensor | None = None,
                    progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict]:
        """Protect working images ``N×3×S×S`` (RGB [0, 1], S = ``resolution``) with faces at ``landmarks`` (one
        ``F×5×2`` per image, in working pixels); ``reference``: set A (default: ``clean``).

        Returns ``(protected N×3×S×S, history)``; history: per outer step the surrogate's losses on set A and on
        the protected set, the PGD objective terms, and at the end ``denoise_clean``/``denoise_protected``, the
        final surrogate's ε-MSE on the clean and protected set for the same timesteps and noise.
        """
        from faceshield.diffusion.finetune import Finetuner, denoising_loss, draw_noise, encode_for_training, \
            memory_guard

        cfg, sd = self.config, self.model
        clean = clean.to(sd.device, torch.float32)
        generator = torch.Generator().manual_seed(cfg.seed)
        tuner = Finetuner(sd, self.finetune_config())
        self.last = {"finetuner": tuner}
        tuner.prepare_prior(clean.shape[-1], cfg.seed)
        ref_latents = encode_for_training(sd, clean if reference is None else reference.to(sd.device))
        masks = torch.stack([face_mask_from_landmarks(lm.to(clean), clean.shape[-2:], scale=getattr(
            cfg, "mask_scale", 1.0)).amax(0) for lm in landmarks])  # N×1×S×S, union of the faces
        state = self.start(clean, masks)
        delta = torch.zeros_like(clean)
        history: dict[str, list[float]] = {}
        total, done = cfg.outer_steps * (2 * cfg.surrogate_steps + cfg.pgd_steps), 0

        def tick(n: int = 1) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        for _ in range(cfg.outer_steps):
            saved = tuner.snapshot()  # the copy f′ of ASPL
            history.setdefault("surrogate_loss_reference", []).extend(tuner.train(ref_latents, cfg.surrogate_steps,
                                                                                  generator))
            tick(cfg.surrogate_steps)
            for _ in range(cfg.pgd_steps):
                with memory_guard("computing the protective perturbation", sd.device):
                    delta, terms = self.pgd_step(tuner, clean, delta, state, generator)
                for key, value in terms.items():
                    history.setdefault(key, []).append(value)
                tick()
            tuner.restore(saved)
            protected = encode_for_training(sd, (clean + delta).detach())
            history.setdefault("surrogate_loss_protected", []).extend(tuner.train(protected, cfg.surrogate_steps,
                                                                                  generator))
            tick(cfg.surrogate_steps)
        with torch.no_grad():  # the final surrogate, same draws on both sets
            emb = tuner.embeddings([cfg.instance_prompt]).expand(len(clean), -1, -1)
            z_clean, z_prot = encode_for_training(sd, clean), encode_for_training(sd, clean + delta)
            t, noise = draw_noise(sd, z_clean, torch.Generator().manual_seed(cfg.seed + 1))
            history["denoise_clean"] = [float(denoising_loss(sd, z_clean, emb, t, noise, tuner.autocast)[0].mean())]
            history["denoise_protected"] = [float(denoising_loss(sd, z_prot, emb, t, noise,
                                                                 tuner.autocast)[0].mean())]
        return (clean + delta).detach(), history

    def start(self, clean: torch.Tensor, masks: torch.Tensor) -> dict:
        """Per-run state of the PGD steps (HAA: rewards of the clean set, masks, momentum)."""
        return {}

    def objective(self, tuner, clean: torch.Tensor, delta: torch.Tensor, state: dict,
                  generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """ASPL's ascent direction: ``∇_δ L_denoise`` (mean ε-MSE at a random t) and the terms' values."""
        from faceshield.diffusion.finetune import denoising_loss, draw_noise

        sd = self.model
        delta = delta.detach().requires_grad_(True)
        latents = sd.encode_images(clean + delta).float()
        t, noise = draw_noise(sd, latents, generator)
        with torch.no_grad():
            emb = tuner.embeddings([self.config.instance_prompt]).expand(len(clean), -1, -1)
        loss = denoising_loss(sd, latents, emb, t, noise, tuner.autocast)[0].mean()
        (grad,) = torch.autograd.grad(loss, delta)
        return grad, {"denoise": float(loss.detach())}

    def pgd_step(self, tuner, clean, delta, state, generator) -> tuple[torch.Tensor, dict]:
        grad, terms = self.objective(tuner, clean, delta, state, generator)
        return project(delta + self.config.step_size * grad.sign(), clean, self.config.epsilon), terms


@register_method
class HAA(ASPL):
    """Hierarchical Anti-Aesthetics (see the module docstring)."""

    name = "haa"
    Config = HAAConfig

    @functools.cached_property
    def reward(self):
        from faceshield.diffusion.rewards import create_reward_model

        cfg = self.config
        return create_reward_model(cfg.reward_model, cfg.reward_path, cfg.reward_clip, cfg.reward_prompt,
                                   self.model.device, tokenizer=cfg.reward_tokenizer)

    def start(self, clean, masks) -> dict:
        boxes = face_boxes(masks)
        with torch.no_grad():
            global_clean = self.reward(clean)
            local_clean = self.reward(crops(clean, boxes, self.config.local_size))
        return {"masks": masks, "boxes": boxes, "global_clean": global_clean, "local_clean": local_clean,
                "momentum": torch.zeros_like(clean)}

    def one_step_prediction(self, tuner, images: torch.Tensor,
                            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The surrogate's mean ε-MSE on ``images`` (``N×3×S×S``) at a random t, and its one-step prediction x̂₀
        (``N×3×S×S``, RGB, not clamped) from the same ``z_t`` and ε̂, both differentiable w.r.t. ``images``."""
        from faceshield.diffusion.finetune import clean_prediction, denoising_loss, draw_noise, noisy_latents

        sd = self.model
        latents = sd.encode_images(images).float()
        t, noise = draw_noise(sd, latents, generator)
        with torch.no_grad():
            emb = tuner.embeddings([self.config.instance_prompt]).expand(len(images), -1, -1)
        per_image, epsilon = denoising_loss(sd, latents, emb, t, noise, tuner.autocast)
        z0 = clean_prediction(sd, noisy_latents(sd, latents, noise, t), epsilon, t)
        # decoded without StableDiffusion.decode_latents' clamp to [0, 1]: at large t most pixels of x̂₀ saturate,
        # and a clamp would give the rewards no gradient there
        x0 = (sd.vae.decode(z0.to(sd.dtype) / sd.latent_scale).sample.float() + 1) / 2
        return per_image.mean(), x0

    def objective(self, tuner, clean, delta, state, generator):
        from faceshield.diffusion.rewards import anti_aesthetic_loss

        cfg = self.config
        delta = delta.detach().requires_grad_(True)
        denoise, x0 = self.one_step_prediction(tuner, clean + delta, generator)
        reward_global = self.reward(x0)
        reward_local = self.reward(crops(x0, state["boxes"], cfg.local_size))
        global_loss = anti_aesthetic_loss(state["global_clean"], reward_global)
        local_loss = anti_aesthetic_loss(state["local_clean"], reward_local)
        main = cfg.denoise_weight * denoise + cfg.global_weight * global_loss
        (grad,) = torch.autograd.grad(main, delta, retain_graph=True)
        (grad_local,) = torch.autograd.grad(local_loss, delta)
        grad = grad + cfg.local_weight * state["masks"] * grad_local  # the local branch acts on the face only
        values = {"denoise": denoise, "reward_global": reward_global.mean(), "reward_local": reward_local.mean(),
                  "loss_global": global_loss, "loss_local": local_loss}
        return grad, {key: float(value.detach()) for key, value in values.items()}

    def pgd_step(self, tuner, clean, delta, state, generator):
        grad, terms = self.objective(tuner, clean, delta, state, generator)
        state["momentum"] = momentum_update(state["momentum"], grad, self.config.momentum)
        return project(delta + self.config.step_size * state["momentum"].sign(), clean, self.config.epsilon), terms
