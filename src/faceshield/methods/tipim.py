"""Baseline in the style of TIP-IM (Yang et al., ICCV 2021): momentum iterative attack with input diversity.

TIP-IM's full method also picks a target greedily and adds an MMD naturalness term; what this baseline keeps
is the optimiser the FR-protection literature compares against: MI-FGSM (momentum 1.0, L1-normalised
gradients) with input diversity, L∞ ε = 8/255 on the whole photo. METHODS.md gives no numeric defaults for it;
these are MI-FGSM's and DI's published ones with TIP-IM's budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from faceshield.adversarial import IdentityObjective, input_diversity, sign_attack
from faceshield.methods.base import FRAttackMethod, ProtectionResult, check_photo, register_method
from faceshield.settings import Settings, setting


@dataclass
class TIPIMConfig(Settings):
    """Momentum + input diversity.

    Attributes:
        epsilon: L∞ bound in [0, 1] units.
        steps: iterations; step_size = epsilon / steps · 2.5 unless given (> 0).
        momentum: decay μ of MI-FGSM.
        diversity_probability: chance each step of a random rescale (×0.9–1.1) and shift (≤ 3 %).
        surrogates: FR models attacked; empty = every calibrated model with AUC ≥ 0.9.
        seed, device: randomness and where to run.
    """

    epsilon: float = setting(8 / 255, "(0, 1]")
    steps: int = setting(50, "[1, inf)")
    step_size: float = setting(0.0, "[0, 1]")
    momentum: float = setting(1.0, "[0, 1]")
    diversity_probability: float = setting(0.5, "[0, 1]")
    surrogates: tuple[str, ...] = ()
    seed: int = 0
    device: str = "cpu"


@register_method
class TIPIM(FRAttackMethod):
    name = "tip-im"
    Config = TIPIMConfig

    def protect(self, image, landmarks, target=None, progress=None) -> ProtectionResult:
        check_photo(image, landmarks)
        cfg = self.config
        x, landmarks = image.to(cfg.device), landmarks.to(cfg.device, image.dtype)
        objective = IdentityObjective(self.ensemble, x, landmarks, target)
        generator = torch.Generator().manual_seed(cfg.seed)
        step = cfg.step_size or cfg.epsilon / cfg.steps * 2.5
        transform = partial(input_diversity, probability=cfg.diversity_probability, generator=generator)
        out, steps, history = sign_attack(x, objective, cfg.epsilon, cfg.steps, step,
                                          momentum=cfg.momentum, transform=transform, progress=progress)
        return ProtectionResult(out.to(image), steps, history)
