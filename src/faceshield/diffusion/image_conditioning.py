"""Diff-Privacy's multi-scale image inversion (MSI): one learned prompt token per timestep bucket, from CLIP vision.

The MSI turns one face into 10 time-dependent conditioning embeddings in Stable Diffusion's text-embedding format
(METHODS.md, "Diff-Privacy", both parts):

- CLIP's vision tower (ViT-L/14 for SD 1.x, ``openai/clip-vit-large-patch14``) sees the face with CLIP's own
  preprocessing on its real pixels; its hidden states :data:`TAPS` (3, 7, 11, 15 and the last) are mean-pooled over
  the tokens: 5 feature vectors, from fine to coarse.
- Timestep ``t`` falls in bucket ``b = ⌊t·10/1000⌋`` (:func:`bucket_of`); bucket ``b`` uses tap and projector
  ``b // 2``. Projector: ``Linear(V→D, no bias) → Linear(D→D, no bias) → L2-normalise``, times a learned
  per-bucket vector (``Embedding(10, D)``); then attention, dropout 0.05 and ``Linear(D, D)``. ``V`` is the vision
  tower's width and ``D`` the text encoder's (1024 and 768 for SD 1.x; taken from the loaded models' configs).
- The result is ONE token that replaces the placeholder ``*`` of the prompt ``"*"`` in the text encoder's token
  embeddings (textual-inversion style); the text encoder then runs as usual (:func:`encode_with_token`).

The public code's attention acts on the one-token sequence itself (query = key = value), which is a learned linear
map of the token; we keep that structure (``nn.MultiheadAttention`` on the token) rather than invent inputs.

Training (:func:`train_msi`) is per image: only the MSI learns, with the plain ε-MSE of the frozen UNet conditioned
on the bucket's embedding, AdamW lr 1e-4, batch 1, random horizontal flips. The public code fed CLIP a float image in
[-1, 1] cast to uint8 (an almost black picture), so its MSI degenerated to per-bucket constants; here the pixels
CLIP sees are checked to be a real picture (:func:`clip_pixels`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from faceshield.diffusion.hub import CLIP_VIT_L14_ID
from faceshield.diffusion.loading import (
    StableDiffusion, in_hub_cache, load_component, offline, require_diffusers, resolve_source,
)
from faceshield.errors import DiffusionModelError, ShapeError

log = logging.getLogger(__name__)

DEFAULT_CLIP = CLIP_VIT_L14_ID
TAPS = (3, 7, 11, 15, -1)  # indexes into the vision tower's hidden states (0 = the patch embeddings)
BUCKETS = 10
TRAIN_TIMESTEPS = 1000
PLACEHOLDER = "*"
# OpenAI CLIP's normalisation (preprocessor_config.json of openai/clip-vit-large-patch14)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def bucket_of(timestep: int | torch.Tensor, train_timesteps: int = TRAIN_TIMESTEPS):
    """The timestep bucket ``⌊t·10/T⌋`` in 0…9 (T = 1000 training timesteps)."""
    if isinstance(timestep, torch.Tensor):
        return torch.div(timestep * BUCKETS, train_timesteps, rounding_mode="floor").clamp(0, BUCKETS - 1)
    return min(int(timestep) * BUCKETS // train_timesteps, BUCKETS - 1)


@dataclass
class ClipVision:
    """A frozen CLIP vision tower and the input size its preprocessing resizes to."""

    model: nn.Module
    image_size: int
    source: str = ""

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def load_clip_vision(source: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> ClipVision:
    """Load a CLIP vision tower by hub id or folder (``save_pretrained`` of ``CLIPVisionModel`` or a full CLIP).

    Raises:
        DiffusionModelError: one line naming the model and how to provide it (missing weights, too few layers
            for the taps, no network…).
    """
    require_diffusers()
    from transformers import CLIPVisionModel

    how = (f"download it where there is internet (`hf download {DEFAULT_CLIP} --local-dir clip-vit-l14`) and pass "
           f"--clip-model /path/to/folder")
    source, local = resolve_source(source, "CLIP vision model", how)
    cached = local or offline() or in_hub_cache(source, None, ("config.json",))
    model = load_component(CLIPVisionModel.from_pretrained, source, None,
                           what="CLIP vision model", how=how, local_files_only=cached, dtype=dtype)
    needed = max(t for t in TAPS if t >= 0)
    if model.config.num_hidden_layers < needed:
        raise DiffusionModelError(f"CLIP vision model {source!r} has {model.config.num_hidden_layers} layers; the MSI "
                                  f"taps hidden states {TAPS[:-1]} and the last, so it needs ≥ {needed}; {how}")
    model.to(device).eval().requires_grad_(False)
    return ClipVision(model, int(model.config.image_size), source)


def clip_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """CLIP's preprocessing of ``images`` (``B×3×H×W`` float RGB in [0, 1]): bicubic resize of the short side to
    ``image_size`` (antialiased, as CLIPImageProcessor), centre crop, then OpenAI's mean/std.

    Raises:
        ShapeError: not float RGB in [0, 1] (e.g. uint8, or [-1, 1] — the public code's bug), or a blank picture.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ShapeError(f"CLIP input must be float RGB B×3×H×W in [0, 1], got {tuple(images.shape)} {images.dtype}")
    if float(images.min()) < -1e-4 or float(images.max()) > 1 + 1e-4:
        raise ShapeError(f"CLIP input must be in [0, 1], got [{float(images.min()):.3f}, {float(images.max()):.3f}]")
    if bool((images.flatten(1).std(dim=1) < 1e-3).any()):
        raise ShapeError("CLIP input is a blank (constant) picture; the MSI must see the face's real pixels")
    h, w = images.shape[-2:]
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    x = x[..., top : top + image_size, left : left + image_size]
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_features(clip: ClipVision, images: torch.Tensor) -> torch.Tensor:
    """The 5 mean-pooled taps of the vision tower: ``B×5×V`` (V = its hidden size), images as :func:`clip_pixels`."""
    device = next(clip.model.parameters()).device
    pixels = clip_pixels(images.to(device), clip.image_size).to(next(clip.model.parameters()).dtype)
    hidden = clip.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    return torch.stack([hidden[t].float().mean(dim=1) for t in TAPS], dim=1)


class MultiScaleInversion(nn.Module):
    """The MSI: CLIP taps ``B×5×V`` and a timestep bucket → one prompt token ``B×D`` (sizes from the models).

    Args:
        vision_size: V, the CLIP vision tower's hidden size (1024 for ViT-L/14).
        token_size: D, the text encoder's hidden size (768 for SD 1.x).
        dropout: after the attention (0.05 as the public code).
    """

    def __init__(self, vision_size: int, token_size: int, dropout: float = 0.05):
        super().__init__()
        scales = len(TAPS)
        self.projectors = nn.ModuleList(
            nn.Sequential(nn.Linear(vision_size, token_size, bias=False), nn.Linear(token_size, token_size, bias=False))
            for _ in range(scales))
        self.bucket_scale = nn.Embedding(BUCKETS, token_size)
        heads = 8 if token_size % 8 == 0 else 1
        self.attention = nn.MultiheadAttention(token_size, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(token_size, token_size)

    def forward(self, features: torch.Tensor, buckets: torch.Tensor | int) -> torch.Tensor:
        """``features``: ``B×5×V`` (:func:`clip_features`); ``buckets``: ``B`` ints in 0…9 (or one int).

        Returns ``B×D`` tokens.
        """
        if features.ndim != 3 or features.shape[1] != len(TAPS):
            raise ShapeError(f"MSI features must be B×{len(TAPS)}×V, got {tuple(features.shape)}")
        b = features.shape[0]
        buckets = torch.as_tensor(buckets, device=features.device).long().reshape(-1).expand(b)
        scale_index = buckets // 2  # bucket b → tap and projector b // 2
        tokens = torch.stack([self.projectors[int(s)](features[i, int(s)]) for i, s in enumerate(scale_index)])
        tokens = F.normalize(tokens, dim=-1) * self.bucket_scale(buckets)
        seq = tokens.unsqueeze(1)
        attended, _ = self.attention(seq, seq, seq, need_weights=False)
        return self.out(self.dropout(attended.squeeze(1)))


class TokenPrompt:
    """The prompt ``"*"`` whose placeholder token embedding is replaced by a given vector before the text encoder.

    ``encode(tokens B×D) -> B×L×D`` text-encoder hidden states, differentiable w.r.t. ``tokens``.
    """

    def __init__(self, sd: StableDiffusion, placeholder: str = PLACEHOLDER):
        ids = sd.tokenizer([placeholder], padding="max_length", truncation=True,
                           max_length=sd.tokenizer.model_max_length, return_tensors="pt").input_ids
        pieces = sd.tokenizer(placeholder, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise DiffusionModelError(f"the placeholder {placeholder!r} is {len(pieces)} tokens for this tokenizer; "
                                      f"it must be one")
        self.sd = sd
        self.input_ids = ids.to(sd.device)
        self.position = int((ids[0] == pieces[0]).nonzero()[0])
        self.embedding_layer = sd.text_encoder.get_input_embeddings()

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.embedding_layer.embedding_dim:
            raise ShapeError(f"tokens must be B×{self.embedding_layer.embedding_dim}, got {tuple(tokens.shape)}")
        position = self.position

        def replace(module, inputs, output):
            output = output.clone()
            output[:, position] = tokens.to(output.dtype)
            return output

        handle = self.embedding_layer.register_forward_hook(replace)
        try:
            ids = self.input_ids.expand(tokens.shape[0], -1)
            return self.sd.text_encoder(ids)[0].to(self.sd.dtype)
        finally:
            handle.remove()


def encode_with_token(sd: StableDiffusion, tokens: torch.Tensor, placeholder: str = PLACEHOLDER) -> torch.Tensor:
    """Text-encoder states ``B×L×D`` of the prompt ``"*"`` with the placeholder's embedding replaced by ``tokens``."""
    return TokenPrompt(sd, placeholder).encode(tokens)


@dataclass
class MSIResult:
    """A trained MSI for one face: its 10 bucket tokens and the training trace.

    Attributes:
        tokens: ``10×D`` (bucket order), the MSI's output for the unflipped face, eval mode.
        loss: ε-MSE per training step.
        seconds: training wall time.
    """

    tokens: torch.Tensor
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_msi(sd: StableDiffusion, clip: ClipVision, face: torch.Tensor, steps: int, lr: float = 1e-4,
              flip: bool = True, seed: int = 0, progress: Callable[[int, int], None] | None = None,
              msi: MultiScaleInversion | None = None) -> MSIResult:
    """Train an MSI on one aligned face ``1×3×S×S`` (RGB in [0, 1]) and return its 10 bucket tokens.

    Each step: a random horizontal flip (p = 0.5), ``t`` uniform in 0…999, ``z_t = √ᾱ z₀ + √(1−ᾱ) ε``, loss
    ``‖ε − ε_θ(z_t, t, text(MSI(CLIP(face), bucket(t))))‖²``; AdamW on the MSI only.
    """
    if face.ndim != 4 or face.shape[0] != 1:
        raise ShapeError(f"train_msi takes one face 1×3×S×S, got {tuple(face.shape)}")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    token_size = sd.text_encoder.get_input_embeddings().embedding_dim
    msi = msi or MultiScaleInversion(clip.hidden_size, token_size)
    msi.to(sd.device).train()
    prompt = TokenPrompt(sd)
    views = [face, face.flip(-1)] if flip else [face]
    with torch.no_grad():
        latents = [sd.encode_images(v).float() for v in views]
        features = [clip_features(clip, v).to(sd.device) for v in views]
    optimiser = torch.optim.AdamW(msi.parameters(), lr=lr)
    alphas = sd.schedule.alphas_cumprod
    losses = []
    for step in range(steps):
        view = int(torch.randint(len(views), (), generator=generator))
        t = int(torch.randint(len(alphas), (), generator=generator))
        noise = torch.randn(latents[view].shape, generator=generator).to(sd.device)
        a = float(alphas[t])
        noisy = a**0.5 * latents[view] + (1 - a) ** 0.5 * noise
        token = msi(features[view], bucket_of(t, len(alphas)))
        predicted = sd.predict_noise(noisy, t, prompt.encode(token))
        loss = F.mse_loss(predicted.float(), noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
    msi.eval()
    with torch.no_grad():
        tokens = msi(features[0].expand(BUCKETS, -1, -1), torch.arange(BUCKETS, device=sd.device))
    log.debug("MSI: %d steps, loss %.4f → %.4f", steps, losses[0] if losses else 0, losses[-1] if losses else 0)
    return MSIResult(tokens.detach(), losses, time.perf_counter() - start)


def bucket_embeddings(sd: StableDiffusion, tokens: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings ``10×L×D`` of the 10 bucket tokens ``10×D`` (no gradient)."""
    with torch.no_grad():
        return TokenPrompt(sd).encode(tokens.to(sd.device, torch.float32))
