"""Baseline: plain PGD (Madry et al. 2018) under L∞ ε = 8/255 on the whole photo, against the surrogate ensemble."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from faceshield.adversarial import IdentityObjective, sign_attack
from faceshield.methods.base import FRAttackMethod, ProtectionResult, check_photo, register_method
from faceshield.settings import Settings, setting


@dataclass
class PGDConfig(Settings):
    """Plain projected gradient descent.

    Attributes:
        epsilon: L∞ bound in [0, 1] pixel units (8/255, the literature's standard).
        steps: iterations.
        step_size: per-step change (2/255, Madry et al.'s α = ε/4).
        random_start: start from uniform noise inside the bound.
        surrogates: FR models attacked; empty = every calibrated model with AUC ≥ 0.9.
        seed: random start seed.
        device: where to run.
    """

    epsilon: float = setting(8 / 255, "(0, 1]")
    steps: int = setting(20, "[1, inf)")
    step_size: float = setting(2 / 255, "(0, 1]")
    random_start: bool = True
    surrogates: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"


@register_method
class PGD(FRAttackMethod):
    name = "pgd"
    Config = PGDConfig

    def protect(self, image, landmarks, target=None, progress=None) -> ProtectionResult:
        check_photo(image, landmarks)
        cfg = self.config
        # Plain PGD: no thresholds and margins, just the raw cosine objective for the full number of steps.
        x, landmarks = image.to(cfg.device), landmarks.to(cfg.device, image.dtype)
        objective = IdentityObjective(self.ensemble, x, landmarks, target)
        generator = torch.Generator().manual_seed(cfg.seed)
        out, steps, history = sign_attack(x, objective, cfg.epsilon, cfg.steps, cfg.step_size,
                                          generator=generator, random_start=cfg.random_start, progress=progress)
        return ProtectionResult(out.to(image), steps, history)
