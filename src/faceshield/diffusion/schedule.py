"""The noise schedule and the deterministic DDIM update, in plain differentiable torch.

A latent at noise level ``ᾱ`` is ``z = √ᾱ·z₀ + √(1−ᾱ)·ε``. DDIM moves a latent from level ``ᾱ_from`` to level
``ᾱ_to`` with the model's noise estimate ε: ``z₀ = (z − √(1−ᾱ_from)·ε)/√ᾱ_from`` then
``z' = √ᾱ_to·z₀ + √(1−ᾱ_to)·ε``. The same formula runs both ways: toward less noise (sampling) and toward more
(inversion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from faceshield.errors import FaceshieldError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ (cumulative product of 1 − β) per training timestep, and what the model predicts.

    Attributes:
        alphas_cumprod: ``T`` float64, ᾱ of timesteps 0 … T−1.
        final_alpha_cumprod: ᾱ of the clean end of the last sampling step (1, or ᾱ₀ as in SD's
            ``set_alpha_to_one=False``).
        prediction_type: ``"epsilon"`` (SD 1.x, SD-2-base) or ``"v_prediction"`` (SD-2 768).
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise FaceshieldError(f"unsupported prediction type {self.prediction_type!r}; "
                                  f"supported: {', '.join(PREDICTION_TYPES)}")

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        """From a diffusers scheduler config (``beta_schedule`` linear or scaled_linear, as every SD 1.x/2.x)."""
        steps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
        else:
            raise FaceshieldError(f"unsupported beta_schedule {kind!r} (Stable Diffusion uses scaled_linear)")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final, config.get("prediction_type", "epsilon"))

    def alpha(self, timestep: int | None) -> float:
        """ᾱ at ``timestep``; ``None`` = the clean end (``final_alpha_cumprod``)."""
        return self.final_alpha_cumprod if timestep is None else float(self.alphas_cumprod[int(timestep)])

    def to_epsilon(self, output: torch.Tensor, sample: torch.Tensor, timestep: int) -> torch.Tensor:
        """The model's output as a noise estimate ε (``v = √ᾱ·ε − √(1−ᾱ)·z₀`` for v-prediction)."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alpha(timestep)
        return a**0.5 * output + (1 - a) ** 0.5 * sample.to(output.dtype)

    @staticmethod
    def ddim_move(sample: torch.Tensor, epsilon: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
        """Deterministic DDIM update of ``sample`` from level ``alpha_from`` to ``alpha_to`` (either direction)."""
        epsilon = epsilon.to(sample.dtype)
        clean = (sample - (1 - alpha_from) ** 0.5 * epsilon) / alpha_from**0.5
        return alpha_to**0.5 * clean + (1 - alpha_to) ** 0.5 * epsilon
