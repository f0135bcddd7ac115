"""Differentiable image-quality reward models for HAA's anti-aesthetic terms: higher reward = better-looking image.

Every reward model maps images ``B×3×H×W`` float RGB in [0, 1] to rewards ``B`` and is differentiable w.r.t. the
pixels:

- ``brisque``: BRISQUE (Mittal et al. 2012) with OpenCV's LIVE-R2 ε-SVR, rewritten in torch so that gradients
  flow (:mod:`faceshield.eval.quality`'s BRISQUE is numpy, bit-faithful to OpenCV and *not* differentiable).
  Reward ``1 − BRISQUE/100``. No weights to download.
- ``laion``: the LAION aesthetic predictor (an MLP on the L2-normalised CLIP ViT-L/14 image embedding, trained on
  SAC+LOGOS+AVA, ~1–10); CLIP by hub id or folder, the MLP by path (``sac+logos+ava1-l14-linearMSE.pth``).
- ``imagereward``: ImageReward (BLIP ViT-L + BERT cross-attention + MLP, text-conditioned) from its checkpoint file,
  in plain torch (:mod:`faceshield.diffusion.image_reward`, validated against the ``image-reward`` package).

Loading failures are one :class:`~faceshield.errors.DiffusionModelError` line.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from faceshield.errors import DiffusionModelError

log = logging.getLogger(__name__)

RewardModel = Callable[[torch.Tensor], torch.Tensor]
REWARD_MODELS = ("brisque", "laion", "imagereward")
CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- BRISQUE in torch -----------------------------------------------------------------------------------------
_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))  # H, V, main and anti-diagonal neighbours (OpenCV's order)


@functools.lru_cache(maxsize=1)
def _gamma_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Shape grid γ ∈ [0.2, 10) (step 0.001) and the increasing ratio ρ(γ) = Γ(2/γ)²/(Γ(1/γ)Γ(3/γ)) on it."""
    g = torch.arange(0.2, 10.0, 0.001, dtype=torch.float64)
    rho = torch.exp(2 * torch.lgamma(2 / g) - torch.lgamma(1 / g) - torch.lgamma(3 / g))
    return g, rho


def _aggd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moment-matching AGGD fit per image of ``x`` (``B×N``): (shape γ, σ_l, σ_r), differentiable.

    OpenCV searches the γ grid for the first local minimum of ``|ρ(γ) − r̂|``; ρ is increasing, so that is the
    grid point nearest ``r̂``; here γ is the linear interpolation between the two grid points around ``r̂``.
    """
    pos, neg = (x > 0).to(x.dtype), (x < 0).to(x.dtype)
    n_pos, n_neg = pos.sum(1).clamp_min(1), neg.sum(1).clamp_min(1)
    sq = x * x
    pos_sq, neg_sq = (sq * pos).sum(1), (sq * neg).sum(1)
    sigma_l, sigma_r = (neg_sq / n_neg + 1e-12).sqrt(), (pos_sq / n_pos + 1e-12).sqrt()
    g_hat = sigma_l / sigma_r
    n = x.shape[1]
    r_hat = (x.abs().sum(1) / n) ** 2 / ((pos_sq + neg_sq) / n + 1e-12)
    r_norm = r_hat * (g_hat**3 + 1) * (g_hat + 1) / (g_hat**2 + 1) ** 2
    grid, rho = (t.to(x.device, torch.float64) for t in _gamma_table())
    r64 = r_norm.double()
    k = torch.searchsorted(rho, r64.detach()).clamp(1, len(rho) - 1)
    lo, hi = rho[k - 1], rho[k]
    gamma = grid[k - 1] + (r64 - lo) / (hi - lo) * (grid[k] - grid[k - 1])
    gamma = gamma.clamp(0.2, float(grid[-1])).to(x.dtype)
    return gamma, sigma_l, sigma_r


def _blur7(img: torch.Tensor) -> torch.Tensor:
    x = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-0.5 * x**2 / (7.0 / 6.0) ** 2)
    k = (k / k.sum()).to(img)
    padded = F.pad(img, (3, 3, 3, 3), mode="replicate")
    return F.conv2d(F.conv2d(padded, k.view(1, 1, 1, 7)), k.view(1, 1, 7, 1))


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., i, j] = x[..., i + dy, j + dx]``, zero outside."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        x[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


def _scale_features(gray: torch.Tensor) -> torch.Tensor:
    mu = _blur7(gray)
    var = (_blur7(gray * gray) - mu * mu).clamp_min(0)
    mscn = (gray - mu) / ((var + 1e-10).sqrt() + 1 / 255)
    flat = mscn.flatten(1)
    gam, sl, sr = _aggd(flat)
    feats = [gam, (sl * sl + sr * sr) / 2]
    for dy, dx in _SHIFTS:
        gam, sl, sr = _aggd((mscn * _shifted(mscn, dy, dx)).flatten(1))
        mean = (sr - sl) * torch.exp(torch.lgamma(2 / gam) - 0.5 * (torch.lgamma(1 / gam) + torch.lgamma(3 / gam)))
        feats += [gam, mean, sl * sl, sr * sr]
    return torch.stack(feats, 1)


def brisque_torch(images: torch.Tensor) -> torch.Tensor:
    """Differentiable BRISQUE scores ``B`` (0 best … 100 worst, not clamped) of ``B×3×H×W`` RGB in [0, 1].

    The features of :func:`faceshield.eval.quality.brisque_features` in float32 torch, without its 8-bit rounding
    and OpenCV's exact float order (not differentiable), and with γ interpolated between grid points: scores
    agree with the OpenCV-faithful version within a few points on photos (tests/test_haa.py measures it).
    """
    from faceshield.eval.quality import load_brisque_model

    model = load_brisque_model()
    weights = torch.tensor([9798, 19235, 3735], dtype=images.dtype, device=images.device) / 2**15
    gray = (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
    h, w = gray.shape[-2:]
    half = F.interpolate(gray, size=(h // 2, w // 2), mode="bicubic", align_corners=False)
    feats = torch.cat([_scale_features(gray), _scale_features(half)], 1)
    lo = torch.as_tensor(model.feature_min, dtype=feats.dtype, device=feats.device)
    hi = torch.as_tensor(model.feature_max, dtype=feats.dtype, device=feats.device)
    scaled = -1 + 2 * (feats - lo) / (hi - lo)
    sv = torch.as_tensor(model.support_vectors, dtype=feats.dtype, device=feats.device)
    alpha = torch.as_tensor(model.alpha, dtype=feats.dtype, device=feats.device)
    kernel = torch.exp(-model.gamma * torch.cdist(scaled, sv).pow(2))
    return kernel @ alpha - model.rho


def brisque_reward(images: torch.Tensor) -> torch.Tensor:
    """``1 − BRISQUE/100``: higher is better, about [0, 1]."""
    return 1 - brisque_torch(images) / 100


# --- CLIP-based ---------------------------------------------------------------------------------------------------
def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """CLIP's preprocessing, differentiable: shorter side to ``size`` (bicubic, antialiased), centre crop,
    normalised with CLIP's mean and std."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor's head (its checkpoint's ``layers.{0,2,4,6,7}`` keys; dropouts between)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LaionAesthetic(torch.nn.Module):
    """LAION aesthetic score ``B`` of images ``B×3×H×W`` in [0, 1]: MLP(CLIP image embedding / ‖·‖)."""

    def __init__(self, clip: torch.nn.Module, mlp: AestheticMLP, size: int = 224):
        super().__init__()
        self.clip, self.mlp, self.size = clip, mlp, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.clip.parameters()).dtype
        emb = self.clip(pixel_values=clip_preprocess(images.float(), self.size).to(dtype)).image_embeds.float()
        return self.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)


def load_laion_aesthetic(mlp_path: str | Path, clip: str = CLIP_L14, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> LaionAesthetic:
    """The LAION aesthetic predictor: CLIP ViT-L/14 (hub id or ``CLIPVisionModelWithProjection`` folder) + the MLP
    file ``mlp_path`` (a state dict with ``layers.*`` keys, e.g. ``sac+logos+ava1-l14-linearMSE.pth``)."""
    from transformers import CLIPVisionModelWithProjection

    from faceshield.diffusion.loading import load_component, offline

    how = (f"download {CLIP_L14} and the MLP sac+logos+ava1-l14-linearMSE.pth (LAION-AI/aesthetic-predictor) where "
           "there is internet and pass their paths (reward_clip=FOLDER, reward_model=FILE)")
    local = Path(clip).expanduser().is_dir()
    model = load_component(CLIPVisionModelWithProjection.from_pretrained, str(clip), None,
                           what="CLIP vision model", how=how, local_files_only=local or offline())
    path = Path(mlp_path).expanduser()
    if not path.is_file():
        raise DiffusionModelError(f"LAION aesthetic MLP {str(path)!r} not found; {how}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
        mlp.load_state_dict(state)
    except Exception as error:  # a wrong or corrupt file: torch/pickle raise many types
        raise DiffusionModelError(f"cannot load LAION aesthetic MLP {str(path)!r} ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0][:150] if str(error) else ''}); {how}") from error
    proj = model.config.projection_dim
    if mlp.layers[0].in_features != proj:
        raise DiffusionModelError(f"LAION aesthetic MLP {str(path)!r} expects {mlp.layers[0].in_features}-D CLIP "
                                  f"embeddings but {clip!r} gives {proj}-D; use CLIP ViT-L/14 ({CLIP_L14})")
    scorer = LaionAesthetic(model, mlp).to(device).eval().requires_grad_(False)
    scorer.clip.to(dtype)
    return scorer


def create_reward_model(kind: str, path: str = "", clip: str = CLIP_L14, prompt: str = "a photo of person",
                        device: str | torch.device = "cpu", tokenizer: str = "bert-base-uncased") -> RewardModel:
    """The reward model ``kind`` (see :data:`REWARD_MODELS`); ``path``: the LAION MLP or ImageReward file;
    ``tokenizer``: ImageReward's bert-base-uncased tokenizer (folder, hub id or ``vocab.txt``)."""
    if kind == "brisque":
        return brisque_reward
    if kind == "laion":
        if not path:
            raise DiffusionModelError("the laion reward needs the MLP file: set reward_model=PATH "
                                      "(sac+logos+ava1-l14-linearMSE.pth)")
        return load_laion_aesthetic(path, clip, device)
    if kind == "imagereward":
        from faceshield.diffusion.image_reward import load_image_reward

        if not path:
            raise DiffusionModelError("the imagereward reward needs its checkpoint: set reward_path=PATH "
                                      "(ImageReward.pt, with med_config.json beside it)")
        return load_image_reward(path, prompt, tokenizer, device)
    raise DiffusionModelError(f"unknown reward model {kind!r}; choose from {', '.join(REWARD_MODELS)}")


def anti_aesthetic_loss(reward_clean: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """HAA's reward loss (ascended by the perturbation): ``mean exp(R)``, ``R`` = the batch-standardised
    ``r = |RM(x_orig) − RM(x̂)| − RM(x̂)``.

    The mean and std of the standardisation are taken as constants (detached: with gradients through them the
    loss would be blind to a drop of every image's reward alike); one image: ``R = r − r`` (gradient ``∂r``).
    """
    r = (reward_clean.detach() - reward).abs() - reward
    std = r.detach().std() if r.numel() > 1 else torch.ones((), device=r.device)
    standard = (r - r.detach().mean()) / (std + 1e-6)
    return standard.exp().mean()
