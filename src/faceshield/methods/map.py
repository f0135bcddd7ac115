"""Machine Pareidolia (MAP, AAAI 2026) as ``map``: identity disguise through a chosen expression, by a fine-tuned DDPM.

Paper summary: ../shared/papers/machine-pareidolia.txt; what is known and DiffAM's public defaults: METHODS.md.
No public code exists; every choice where the paper is silent is listed in docs/map.md.

Training (:func:`train_map`, ``faceshield map train``): a copy of a pretrained pixel-space DDPM
(``google/ddpm-ema-celebahq-256`` by default) is fine-tuned on aligned faces. Each face is DDIM-inverted once with
the frozen pretrained network to ``t0`` (20 steps to t0 = 60, DiffAM's defaults), then sampled back with the
network being trained in ``generative_steps`` (6) DDIM steps, differentiably. Per step, on the sampled faces:

- ``L_A`` (identity): mean over the surrogate FR models of ``1 − cos(FR(x̂), FR(target))`` (impersonation), or of
  ``cos(FR(x̂), FR(x))`` (dodging, no target);
- ``L_E`` (expression): cross-entropy of the ``emotion`` model (Human's mini-Xception) toward the chosen class,
  ``−log p_c(x̂)``, on the face re-aligned to Human's own crop (``HUMAN_FACE_224``);
- the gradients of ``L_A`` and ``L_E`` with respect to the weights are reconciled PCGrad-style: when their dot
  product is negative each is projected onto the normal plane of the other (:func:`project_conflicting`);
- ``L_lap``: mean squared discrete Laplacian of x̂ (:func:`laplacian_energy`), penalising high-frequency artefacts;
- ``L_SM``: the DDPM denoising score-matching loss ``‖ε̂(√ᾱ_t x + √(1−ᾱ_t) ε, t) − ε‖²`` on the clean faces at
  ``t`` uniform in ``[0, t0]`` (the levels the network is used at), keeping it on the face manifold;
- Adam on ``w_A·g_A' + w_E·g_E' + w_lap·∇L_lap + w_SM·∇L_SM``, then an EMA of the weights; the EMA is what is saved.

Protection (``faceshield protect --method map --set model=MODEL_DIR``): align each face to a CelebA-HQ-style crop,
invert it with the pretrained network, sample with the fine-tuned one, paste back through a feathered face mask.
The target identity is in the network; ``model`` may also be a folder of trained networks (one per target, and per
held-out judge for a leave-one-out evaluation), of which the one trained for the requested target is used.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from faceshield.diffusion.hub import DDPM_CELEBAHQ_ID
from faceshield.errors import FaceshieldError, InputError
from faceshield.faces.align import CELEBAHQ_256, crop_transform, warp_to_crop
from faceshield.faces.masks import crop_faces, paste_faces
from faceshield.methods.base import FRAttackMethod, ProtectionResult, check_photo, register_method
from faceshield.models.human_aux import EMOTION_LABELS
from faceshield.settings import Settings, SettingError, setting

log = logging.getLogger(__name__)

SETTINGS_FILE = "map.json"
CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_PRETRAINED = DDPM_CELEBAHQ_ID
# The 5-point laplacian stencil; replicate padding so that a constant image has exactly zero energy at its borders.
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


# ------------------------------------------------------------------------------------------------- the mechanisms


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared discrete Laplacian per image: ``B×C×H×W`` → ``B`` (0 for a constant or linear-ramp image).

    ``Δx[i, j] = x[i−1, j] + x[i+1, j] + x[i, j−1] + x[i, j+1] − 4·x[i, j]`` with replicate padding.
    """
    c = images.shape[1]
    kernel = _LAPLACIAN.to(images).expand(c, 1, 3, 3)
    lap = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    return lap.pow(2).mean(dim=(1, 2, 3))


def project_conflicting(g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """PCGrad between two gradients, each a list of tensors (one per parameter), treated as one flat vector.

    When ``⟨g1, g2⟩ < 0``: ``g1' = g1 − ⟨g1, g2⟩/‖g2‖² · g2`` and ``g2' = g2 − ⟨g1, g2⟩/‖g1‖² · g1`` (both from the
    original gradients); otherwise both are returned unchanged. Returns ``(g1', g2', ⟨g1, g2⟩)``.
    """
    dot = sum((a.double() * b.double()).sum() for a, b in zip(g1, g2))
    if float(dot) >= 0:
        return list(g1), list(g2), float(dot)
    n1 = sum(a.double().pow(2).sum() for a in g1)
    n2 = sum(b.double().pow(2).sum() for b in g2)
    c1 = float(dot / n2) if float(n2) > 0 else 0.0
    c2 = float(dot / n1) if float(n1) > 0 else 0.0
    return [a - c1 * b for a, b in zip(g1, g2)], [b - c2 * a for a, b in zip(g1, g2)], float(dot)


@torch.no_grad()
def ema_update(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·θ``, in place."""
    for e, p in zip(ema, params):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


def expression_index(expression: str) -> int:
    if expression not in EMOTION_LABELS:
        raise SettingError(f"map: unknown expression {expression!r}; choose from {', '.join(EMOTION_LABELS)}")
    return EMOTION_LABELS.index(expression)


def face_template(image_size: int) -> torch.Tensor:
    """The CelebA-HQ 5-point template scaled to ``image_size`` (the crop the DDPM works on), ``5×2``."""
    return torch.tensor(CELEBAHQ_256) * (image_size / 256)


class ExpressionCrop(torch.nn.Module):
    """The ``emotion`` model on faces aligned to the CelebA-HQ template: re-aligns to Human's face crop
    (``HUMAN_FACE_224``, what the model expects) and returns ``B×7`` probabilities (order ``EMOTION_LABELS``)."""

    def __init__(self, image_size: int, device: str | torch.device = "cpu"):
        from faceshield.models.fr.human import HUMAN_FACE_224
        from faceshield.models.human_aux import EmotionClassifier

        super().__init__()
        self.model = EmotionClassifier().to(device)
        self.register_buffer("matrix", crop_transform(face_template(image_size)[None], torch.tensor(HUMAN_FACE_224)))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        crops = warp_to_crop(faces, self.matrix.to(faces).expand(len(faces), 2, 3), 224, padding_mode="border")
        return self.model(crops)


def expression_loss(probabilities: torch.Tensor, index: int) -> torch.Tensor:
    """L_E per face: cross-entropy toward class ``index``, ``−log p_index`` (probabilities ``B×7``) → ``B``."""
    return -probabilities[:, index].clamp_min(1e-6).log()


def identity_loss(embeddings: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], impersonate: bool
                  ) -> torch.Tensor:
    """L_A per face → ``B``: mean over models of ``1 − cos`` to the target (impersonation) or of ``cos`` to the
    face's own original embedding (dodging). Embeddings are unit vectors ``{model: B×D}``; reference ``1×D`` or
    ``B×D``."""
    cosines = torch.stack([(e * reference[k].to(e)).sum(-1) for k, e in embeddings.items()])
    return (1 - cosines if impersonate else cosines).mean(0)


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class MAPTrainConfig(Settings):
    """Fine-tuning settings of ``faceshield map train``; every default's source is in docs/map.md.

    Attributes:
        pretrained: the score network fine-tuned (and used for inversion): hub id or local DDPM folder.
        expression: the expression the network learns to show (an ``emotion`` class).
        image_size: side of the aligned face crop (the DDPM's resolution, 256 for CelebA-HQ).
        t0, inversion_steps, generative_steps: DDIM inversion of each face to timestep ``t0`` in
            ``inversion_steps`` steps, sampled back in ``generative_steps`` (DiffAM: 60, 20, 6; η = 0).
        epochs, batch_size, lr: Adam on the whole UNet (DiffAM: 4 epochs, lr 8e-6).
        identity_weight, expression_weight, laplacian_weight, score_weight: w_A, w_E, w_lap, w_SM.
        projection: ``pcgrad`` (the paper) or ``none`` (plain sum of the weighted gradients).
        ema_decay: decay of the EMA of the weights (the saved network).
        gradient_checkpointing: recompute UNet activations in the backward pass (far less memory through the
            6 sampling steps, ~30 % slower; same gradients).
        checkpoint_every: steps between checkpoints (for resume).
        seed: face order and score-matching noise.
        surrogates: FR models of L_A; empty = every calibrated model with AUC ≥ 0.9.
        device: where to train (float32 weights: Adam's small steps vanish in bfloat16).
    """

    pretrained: str = DEFAULT_PRETRAINED
    expression: str = setting("happy", choices=EMOTION_LABELS)
    image_size: int = setting(256, "[32, 2048]")
    t0: int = setting(60, "[1, 999]")
    inversion_steps: int = setting(20, "[1, 1000]")
    generative_steps: int = setting(6, "[1, 1000]")
    epochs: int = setting(4, "[1, inf)")
    batch_size: int = setting(1, "[1, inf)")
    lr: float = setting(8e-6, "(0, inf)")
    identity_weight: float = setting(1.0, "[0, inf)")
    expression_weight: float = setting(1.0, "[0, inf)")
    laplacian_weight: float = setting(10.0, "[0, inf)")
    score_weight: float = setting(1.0, "[0, inf)")
    projection: str = setting("pcgrad", choices=("pcgrad", "none"))
    ema_decay: float = setting(0.99, "[0, 1)")
    gradient_checkpointing: bool = False
    checkpoint_every: int = setting(50, "[1, inf)")
    seed: int = setting(0, "[0, inf)")
    surrogates: tuple[str, ...] = ()
    device: str = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inversion_steps > self.t0 + 1 or self.generative_steps > self.t0 + 1:
            raise SettingError(f"map: at most t0 + 1 = {self.t0 + 1} inversion/generative steps, got "
                               f"{self.inversion_steps}/{self.generative_steps}")


class MAPTrainer:
    """One fine-tuning run over aligned faces ``F×3×S×S`` (RGB in [0, 1], aligned to :func:`face_template`).

    Args:
        config: the settings.
        pretrained: the frozen pretrained :class:`~faceshield.diffusion.ddpm.PixelDiffusion` (inverts the faces).
        faces: the training faces.
        ensemble: the surrogate FR ensemble (differentiable).
        target: ``{model: 1×D}`` unit embeddings of the target identity, or None (dodging).
        emotion: the expression model on the aligned faces (default :class:`ExpressionCrop`).
    """

    def __init__(self, config: MAPTrainConfig, pretrained, faces: torch.Tensor, ensemble,
                 target: dict[str, torch.Tensor] | None = None, emotion: torch.nn.Module | None = None):
        from faceshield.diffusion.ddpm import ddim_invert, ddim_path, to_diffusion

        self.config = config
        self.pretrained = pretrained
        self.device = pretrained.device
        self.model = pretrained.trainable_copy(config.gradient_checkpointing)
        self.params = [p for p in self.model.unet.parameters() if p.requires_grad]
        self.ema_unet = copy.deepcopy(pretrained.unet).float().requires_grad_(False).eval()
        self.ema = list(self.ema_unet.parameters())
        self.optimiser = torch.optim.Adam(self.params, lr=config.lr)
        self.ensemble = ensemble
        self.emotion = emotion if emotion is not None else ExpressionCrop(config.image_size, self.device)
        self.expression = expression_index(config.expression)
        self.inversion_path = ddim_path(config.t0, config.inversion_steps)
        self.generative_path = ddim_path(config.t0, config.generative_steps)
        self.landmarks = face_template(config.image_size).to(self.device)
        self.clean = to_diffusion(faces.to(self.device, torch.float32))
        with torch.no_grad():
            # inverted once with the frozen network, as the faces never change (DiffAM precomputes them too)
            self.latents = torch.cat([ddim_invert(pretrained, chunk, self.inversion_path)
                                      for chunk in self.clean.split(8)])
            if target is None:
                self.reference = self.ensemble(faces.to(self.device), self.landmarks.expand(len(faces), 5, 2))
            else:
                self.reference = {k: v.to(self.device) for k, v in target.items()}
        self.impersonate = target is not None
        self.clock = StageClock(self.device)
        self.step_count = 0
        self.history: dict[str, list[float]] = {k: [] for k in ("identity", "expression", "laplacian", "score",
                                                               "dot", "seconds")}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.clean) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Face indices, score-matching timesteps and noise of ``step``: a function of (seed, step) alone, so a
        resumed run draws exactly what an uninterrupted one would."""
        epoch, i = divmod(step, self.steps_per_epoch)
        shuffle = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        order = torch.randperm(len(self.clean), generator=shuffle)
        indices = order[i * self.config.batch_size:(i + 1) * self.config.batch_size]
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        timesteps = torch.randint(0, self.config.t0 + 1, (len(indices),), generator=g)
        noise = torch.randn((len(indices), *self.clean.shape[1:]), generator=g)
        return indices, timesteps, noise

    def losses(self, faces: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-face ``identity`` (L_A), ``expression`` (L_E) and ``laplacian`` of generated faces (``B×3×S×S``)."""
        embeddings = self.ensemble(faces, self.landmarks.expand(len(faces), 5, 2))
        reference = self.reference if self.impersonate else {k: v[indices] for k, v in self.reference.items()}
        return {"identity": identity_loss(embeddings, reference, self.impersonate),
                "expression": expression_loss(self.emotion(faces), self.expression),
                "laplacian": laplacian_energy(faces)}

    def score_matching_loss(self, indices: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_SM per face: ``mean (ε̂(x_t, t) − ε)²`` with ``x_t = √ᾱ_t x + √(1−ᾱ_t) ε``."""
        x = self.clean[indices]
        noise = noise.to(x)
        losses = []
        for row, t in enumerate(timesteps.tolist()):  # one timestep per face; UNet calls per face keep it simple
            a = self.model.schedule.alpha(t)
            noisy = a**0.5 * x[row:row + 1] + (1 - a) ** 0.5 * noise[row:row + 1]
            losses.append((self.model.predict_noise(noisy, t) - noise[row:row + 1]).pow(2).mean())
        return torch.stack(losses)

    def _grad(self, loss: torch.Tensor, retain: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def gradients(self, indices: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor
                  ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The combined gradient of one step (one tensor per trainable parameter) and the step's loss values.

        ``w_A·g_A' + w_E·g_E' + w_lap·∇L_lap + w_SM·∇L_SM``, with ``(g_A', g_E')`` = :func:`project_conflicting`
        of ``(∇L_A, ∇L_E)`` (unchanged with ``projection="none"``); losses are means over the batch's faces.
        """
        from faceshield.diffusion.ddpm import ddim_sample, to_images

        cfg = self.config
        clock = self.clock
        clock.start()
        faces = to_images(ddim_sample(self.model, self.latents[indices], self.generative_path))
        clock.lap("sampling")
        terms = {k: v.mean() for k, v in self.losses(faces, indices).items()}
        clock.lap("losses")
        g_a = self._grad(terms["identity"], retain=True)
        clock.lap("backward_identity")
        g_e = self._grad(terms["expression"], retain=True)
        clock.lap("backward_expression")
        g_l = self._grad(terms["laplacian"], retain=False)
        clock.lap("backward_laplacian")
        score = self.score_matching_loss(indices, timesteps, noise).mean()
        g_s = self._grad(score, retain=False)
        clock.lap("score_matching")
        if cfg.projection == "pcgrad":
            g_a, g_e, dot = project_conflicting(g_a, g_e)
        else:
            dot = float(sum((a * e).sum() for a, e in zip(g_a, g_e)))
        total = [cfg.identity_weight * a + cfg.expression_weight * e + cfg.laplacian_weight * lap
                 + cfg.score_weight * s for a, e, lap, s in zip(g_a, g_e, g_l, g_s)]
        clock.lap("projection")
        values = {k: float(v.detach()) for k, v in terms.items()}
        return total, {**values, "score": float(score.detach()), "dot": dot}

    def step(self) -> dict[str, float]:
        """One fine-tuning step: combined gradient, Adam, EMA. Returns the step's losses."""
        start = time.perf_counter()
        total, values = self.gradients(*self.batch(self.step_count))
        for p, g in zip(self.params, total):
            p.grad = g
        self.optimiser.step()
        self.optimiser.zero_grad(set_to_none=True)
        ema_update(self.ema, self.params, self.config.ema_decay)
        self.clock.lap("update")
        self.step_count += 1
        values["seconds"] = time.perf_counter() - start
        for k, v in values.items():
            self.history[k].append(v)
        return values

    def state_dict(self) -> dict:
        return {"step": self.step_count, "unet": self.model.unet.state_dict(), "ema": self.ema_unet.state_dict(),
                "optimiser": self.optimiser.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.model.unet.load_state_dict(state["unet"])
        self.ema_unet.load_state_dict(state["ema"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.step_count = int(state["step"])
        self.history = state["history"]


class StageClock:
    """Wall-clock seconds per stage, summed over calls (``seconds``); with ``profile`` on, CUDA is synchronised at
    every stage end so that the split is right (off by default: each sync stalls the GPU's queue)."""

    def __init__(self, device: torch.device, profile: bool = False):
        self.device = device
        self.profile = profile
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now


def _fingerprint(config: MAPTrainConfig, faces: list[str], target_sha256: str | None) -> str:
    identity = {"config": dataclasses.asdict(config), "faces": faces, "target": target_sha256}
    identity["config"].pop("checkpoint_every")
    identity["config"].pop("gradient_checkpointing")
    identity["config"].pop("device")
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def load_aligned_faces(folder: Path, image_size: int, detector=None) -> tuple[torch.Tensor, list[str]]:
    """The most confident face of every photo in ``folder``, aligned to :func:`face_template` at ``image_size``.

    Unreadable photos and photos without a face are logged and skipped. Returns ``(F×3×S×S in [0, 1], names)``.
    """
    from faceshield.faces.detect import best_face_landmarks, create_detector
    from faceshield.images import load_image, scan_folder, to_tensor

    if not Path(folder).is_dir():
        raise InputError(f"{folder}: not a folder of face photos (--faces)")
    detector = detector or create_detector()
    photos, _ = scan_folder(Path(folder))
    template = face_template(image_size)
    crops, names = [], []
    for photo in sorted(photos):
        try:
            rgb = load_image(photo).rgb
        except FaceshieldError as exc:
            log.warning("%s: skipped (%s)", photo, exc)
            continue
        landmarks = best_face_landmarks(rgb, detector)
        if landmarks is None:
            log.warning("%s: no face found, skipped", photo)
            continue
        crops.append(warp_to_crop(to_tensor(rgb), crop_transform(landmarks, template), image_size,
                                  padding_mode="border", antialias=True))
        names.append(photo.name)
    if not crops:
        raise InputError(f"{folder}: no photo with a face to train on")
    return torch.cat(crops), names


def _save_checkpoint(path: Path, state: dict) -> None:
    from faceshield.fileio import write_bytes_atomic

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def train_map(config: MAPTrainConfig, faces_dir: str | Path, target: str | Path | None, out_dir: str | Path,
              progress: Callable[[int, int, dict], None] | None = None, overwrite: bool = False,
              max_steps: int | None = None) -> dict:
    """Fine-tune a MAP network and save it to ``out_dir`` (``unet/`` + ``scheduler/`` by ``save_pretrained``, and
    ``map.json`` with the settings, the target's embeddings and the loss history).

    Resumes from ``out_dir/checkpoint.pt`` (written every ``checkpoint_every`` steps) when it belongs to the same
    settings, faces and target; ``overwrite`` starts afresh. ``max_steps`` stops early (checkpointed, resumable).
    ``progress(step, total, losses)`` is called after every step. Returns the saved settings (``map.json``).
    """
    from faceshield.adversarial import surrogate_ensemble
    from faceshield.diffusion.ddpm import load_ddpm, save_ddpm
    from faceshield.faces.detect import best_face_landmarks, create_detector
    from faceshield.fileio import check_writable_folder, sha256_file, write_text_atomic
    from faceshield.images import load_image, to_tensor

    out_dir = Path(out_dir)
    if (out_dir / SETTINGS_FILE).is_file() and not overwrite:
        raise FaceshieldError(f"{out_dir}: already holds a trained MAP network; choose another folder or --overwrite")
    check_writable_folder(out_dir, "output folder (-o)")
    start = time.perf_counter()
    detector = create_detector()
    faces, names = load_aligned_faces(Path(faces_dir), config.image_size, detector)
    ensemble, _ = surrogate_ensemble(config.surrogates, config.device)
    target_info, target_embeddings = None, None
    if target is not None:
        rgb = load_image(target).rgb
        landmarks = best_face_landmarks(rgb, detector)
        if landmarks is None:
            raise InputError(f"{target}: no face found in the target photo")
        target_embeddings = ensemble.embed(to_tensor(rgb), landmarks)
        target_info = {"photo": Path(target).name, "sha256": sha256_file(target),
                       "embeddings": {k: [round(float(x), 6) for x in v[0]] for k, v in target_embeddings.items()}}
    pretrained = load_ddpm(config.pretrained, config.device, "float32")
    if pretrained.sample_size != config.image_size:
        log.warning("%s was trained at %d px, fine-tuning at %d px", config.pretrained, pretrained.sample_size,
                    config.image_size)
    trainer = MAPTrainer(config, pretrained, faces, ensemble, target_embeddings)
    fingerprint = _fingerprint(config, names, target_info and target_info["sha256"])
    checkpoint = out_dir / CHECKPOINT_FILE
    if checkpoint.is_file() and not overwrite:
        state = torch.load(checkpoint, map_location=pretrained.device, weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise FaceshieldError(f"{checkpoint}: a checkpoint of other settings, faces or target; use the same ones "
                                  f"to resume, or --overwrite to start afresh")
        trainer.load_state_dict(state)
        log.info("resumed from %s at step %d", checkpoint, trainer.step_count)
    total = trainer.total_steps
    stop = total if max_steps is None else min(total, trainer.step_count + max_steps)
    while trainer.step_count < stop:
        values = trainer.step()
        if progress is not None:
            progress(trainer.step_count, total, values)
        if trainer.step_count % config.checkpoint_every == 0 or trainer.step_count == stop:
            _save_checkpoint(checkpoint, {**trainer.state_dict(), "fingerprint": fingerprint})
    if trainer.step_count < total:
        return {"finished": False, "step": trainer.step_count, "total_steps": total}
    save_ddpm(pretrained, out_dir, unet=trainer.ema_unet)
    settings = {
        "format": "faceshield-map/1", "finished": True, "training": dataclasses.asdict(config),
        # a local folder by its absolute path, so that protection finds it from any working directory
        "pretrained": str(Path(config.pretrained).resolve()) if Path(config.pretrained).is_dir() else config.pretrained,
        "expression": config.expression,
        "goal": "impersonation" if target is not None else "dodging", "target": target_info,
        "surrogates": ensemble.names, "faces": names, "step": trainer.step_count, "total_steps": total,
        "history": {k: [round(v, 6) for v in values] for k, values in trainer.history.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(out_dir / SETTINGS_FILE, json.dumps(settings, indent=2))
    checkpoint.unlink(missing_ok=True)
    return settings


# -------------------------------------------------------------------------------------------------- protection


@torch.no_grad()
def protect_aligned(pretrained, tuned, crops: torch.Tensor, t0: int, inversion_steps: int, generative_steps: int
                    ) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Aligned faces ``F×3×S×S`` in [0, 1] → protected faces ``F×3×S×S`` (CPU, float32): DDIM-invert with the
    ``pretrained`` network to ``t0`` in ``inversion_steps``, sample with the ``tuned`` one in ``generative_steps``.
    Also returns ``{seconds_inversion: [s], seconds_sampling: [s]}``."""
    from faceshield.diffusion.ddpm import ddim_invert, ddim_path, ddim_sample, to_diffusion, to_images

    pretrained.check_images(crops)
    clock = StageClock(pretrained.device, profile=True)
    latents = ddim_invert(pretrained, to_diffusion(crops.to(pretrained.device, torch.float32)),
                          ddim_path(t0, inversion_steps))
    clock.lap("inversion")
    faces = to_images(ddim_sample(tuned, latents, ddim_path(t0, generative_steps)))
    clock.lap("sampling")
    return faces.float().cpu(), {f"seconds_{k}": [v] for k, v in clock.seconds.items()}


@dataclass
class MAPConfig(Settings):
    """Settings of ``map`` protection.

    Attributes:
        model: a folder written by ``faceshield map train`` (``map.json``, ``unet/``, ``scheduler/``), or a folder
            of such folders (the one trained for the requested target is used; see :meth:`MAP.select`).
        pretrained: the network to invert with; empty = the one the model was fine-tuned from (``map.json``).
        mask_scale: size of the face ellipse the generated face is pasted through (1 = forehead to chin).
        surrogates: FR models for the protection report (the target is in the network); empty = calibrated ones.
        device: where to run; dtype: ``auto`` = bfloat16 on CUDA, float32 on CPU.
    """

    model: str = ""
    pretrained: str = ""
    mask_scale: float = setting(1.3, "(0, 10]")
    surrogates: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))


def _read_settings(folder: Path) -> dict:
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FaceshieldError(f"{folder / SETTINGS_FILE}: unreadable ({exc}); train again with `faceshield map train`")
    if not settings.get("finished"):
        raise FaceshieldError(f"{folder}: training did not finish; resume it with `faceshield map train`")
    return settings


def find_networks(model: str | Path) -> list[tuple[Path, dict]]:
    """The trained networks of ``model``: itself when it holds ``map.json``, else its subfolders that do."""
    folder = Path(model).expanduser()
    if (folder / SETTINGS_FILE).is_file():
        return [(folder, _read_settings(folder))]
    if folder.is_dir():
        found = [(sub, _read_settings(sub)) for sub in sorted(folder.iterdir()) if (sub / SETTINGS_FILE).is_file()]
        if found:
            return found
    raise FaceshieldError(f"map: {model} holds no network trained by `faceshield map train` (no {SETTINGS_FILE}); "
                          f"train one first: faceshield map train --faces DIR --target PHOTO -o {model}")


@register_method
class MAP(FRAttackMethod):
    name = "map"
    Config = MAPConfig
    weak_advice = ("train the network longer or with a larger identity weight (faceshield map train --set "
                   "identity_weight=2), or use a network trained for another target")

    def __init__(self, config: MAPConfig | None = None):
        config = config if config is not None else MAPConfig()
        if not config.model:
            raise SettingError("map: set model=MODEL_DIR, a network trained with `faceshield map train` "
                               "(e.g. --set model=my-map-net)")
        self.networks = find_networks(config.model)  # before any model loads
        super().__init__(config)
        self._loaded: dict[str, object] = {}
        self._emotion = None
        self._selected: tuple[Path, dict] | None = None

    def _ddpm(self, source: str):
        from faceshield.diffusion.ddpm import load_ddpm

        if source not in self._loaded:
            self._loaded[source] = load_ddpm(source, self.config.device, self.config.dtype)
        return self._loaded[source]

    def select(self, target: dict[str, torch.Tensor] | None) -> tuple[Path, dict]:
        """The network to protect with.

        Candidates: the networks trained only with models in this method's surrogates (so that a held-out judge
        stays black-box; all of them, with a warning, when none qualifies). Dodging (no target): a dodging network
        if there is one, else the first. Impersonation: the network whose stored target embeddings are closest
        (mean cosine over the models both share) to ``target``; a single network is used as it is, with a warning
        when its target looks like another identity.
        """
        names = set(self.ensemble.names)
        candidates = [n for n in self.networks if set(n[1]["surrogates"]) <= names]
        if not candidates:
            log.warning("map: every network in %s was trained with a model outside the surrogates %s (white-box "
                        "for it)", self.config.model, sorted(names))
            candidates = self.networks
        if target is None:
            return next((n for n in candidates if n[1]["goal"] == "dodging"), candidates[0])

        def closeness(settings: dict) -> float | None:
            stored = (settings.get("target") or {}).get("embeddings", {})
            shared = [k for k in stored if k in target]
            if not shared:
                return None
            return float(np.mean([float(torch.tensor(stored[k]) @ target[k].reshape(-1).float().cpu())
                                  for k in shared]))

        scored = [(closeness(s), (p, s)) for p, s in candidates]
        known = [(c, n) for c, n in scored if c is not None]
        if len(candidates) == 1:
            if known and known[0][0] < 0.5:
                log.warning("map: %s was trained for another target (cosine %.2f to the requested one); its own "
                            "target is used", candidates[0][0], known[0][0])
            return candidates[0]
        if not known:
            raise FaceshieldError(f"map: no network in {self.config.model} shares an FR model with the target's "
                                  f"embeddings ({', '.join(target)}); train with --surrogates among them")
        return max(known, key=lambda cn: cn[0])[1]

    @property
    def expression(self) -> str:
        """The expression of the network used last (the first before any protection), for the evaluation."""
        return (self._selected or self.networks[0])[1]["expression"]

    def protect(self, image, landmarks, target=None, progress=None) -> ProtectionResult:
        return self.protect_many([(image, landmarks)], target, progress)[0]

    def protect_many(self, photos, target=None, progress=None) -> list[ProtectionResult]:
        """Every face of every photo in one batch through the network :meth:`select` picks for ``target``."""
        folder, settings = self._selected = self.select(target)
        size = int(settings["training"]["image_size"])
        for image, landmarks in photos:
            check_photo(image, landmarks)
        crops, matrices = crop_faces(photos, face_template(size), size)
        faces, history = self.protect_faces(crops, folder, settings)
        if progress is not None:
            progress(1, 1)
        return [ProtectionResult(protected, 0, history)
                for protected in paste_faces(photos, faces, matrices, self.config.mask_scale)]

    def protect_faces(self, crops: torch.Tensor, folder: Path, settings: dict
                      ) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Aligned faces ``F×3×S×S`` in [0, 1] → protected faces, with the network in ``folder`` (its ``map.json``
        ``settings``) and the pretrained one it was fine-tuned from (or ``config.pretrained``)."""
        training = settings["training"]
        pretrained = self._ddpm(self.config.pretrained or settings["pretrained"])
        return protect_aligned(pretrained, self._ddpm(str(folder)), crops, training["t0"],
                               training["inversion_steps"], training["generative_steps"])

    def expression_success(self, rgb: np.ndarray, landmarks: torch.Tensor) -> bool:
        """Whether the ``emotion`` model's top-1 on the (protected) photo's face is the network's expression.

        ``rgb``: ``H×W×3`` uint8; ``landmarks``: ``1×5×2`` of the face. The face is aligned to Human's crop.
        """
        from faceshield.images import to_tensor
        from faceshield.models.fr.human import HUMAN_FACE_224

        if self._emotion is None:
            from faceshield.models.human_aux import EmotionClassifier

            self._emotion = EmotionClassifier()
        with torch.no_grad():
            crop = warp_to_crop(to_tensor(rgb), crop_transform(landmarks[:1].float(), torch.tensor(HUMAN_FACE_224)),
                                224, padding_mode="border", antialias=True)
            top = int(self._emotion(crop).argmax(-1)[0])
        return EMOTION_LABELS[top] == self.expression
