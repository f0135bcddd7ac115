"""Shared machinery of pixel-space adversarial protection against face recognition.

An attack perturbs a photo ``x`` (``1×3×H×W`` in [0, 1]) so that the surrogate FR models' embeddings of its
faces move away from the originals (dodging) or toward a target identity (impersonation). The FR crops are
taken with the differentiable alignment, so gradients land on the photo's own pixels. Methods in
:mod:`faceshield.methods` combine these parts; they never import each other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from faceshield.augment import gaussian_blur, luma
from faceshield.models.ensemble import FREnsemble

log = logging.getLogger(__name__)


@dataclass
class Region:
    """The part of a photo an attack works on: rows ``y0:y1``, columns ``x0:x1``."""

    y0: int
    y1: int
    x0: int
    x1: int

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        return image[..., self.y0 : self.y1, self.x0 : self.x1]

    def shift(self, landmarks: torch.Tensor) -> torch.Tensor:
        return landmarks - landmarks.new_tensor([self.x0, self.y0])

    def paste(self, image: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        out = image.clone()
        out[..., self.y0 : self.y1, self.x0 : self.x1] = crop
        return out


def face_region(image_size: tuple[int, int], landmarks: torch.Tensor, margin: float = 1.0) -> Region:
    """Bounding box of every face with a margin of ``margin`` × the face size on each side, clipped to the image.

    The FR crops of the zoo reach at most about one face size beyond the landmarks (faceres' loose crop), so a
    margin of 1.0 contains every pixel any surrogate sees.
    """
    h, w = image_size
    lo = landmarks.amin(dim=1)  # F×2
    hi = landmarks.amax(dim=1)
    extent = (hi - lo).amax(dim=1, keepdim=True).clamp(min=8.0)  # F×1, face size
    lo = (lo - margin * extent).amin(dim=0)
    hi = (hi + margin * extent).amax(dim=0)
    x0, y0 = max(0, int(lo[0].floor())), max(0, int(lo[1].floor()))
    x1, y1 = min(w, int(hi[0].ceil()) + 1), min(h, int(hi[1].ceil()) + 1)
    return Region(y0, y1, x0, x1)


class IdentityObjective:
    """Loss over a surrogate ensemble; lower is better for the protector.

    Each model's cosine is put on a common scale first: ``z = (cos − t_m) / (1 − t_m)`` with ``t_m`` the model's
    calibrated threshold, so 0 is the decision boundary and 1 a perfect match whatever the model's own spread
    (dlib's cosines of different people are ~0.8, MobileFaceNet's ~0). Dodging: ``relu(z + margin)`` of each
    face's similarity to its own original embedding, counted until it is ``margin`` below the boundary (so
    effort goes to the models not yet fooled). Impersonation: ``relu(margin − z)`` toward the target.
    Without thresholds, the plain (negative) cosine. The loss is the mean over models and faces.
    """

    def __init__(
        self,
        ensemble: FREnsemble,
        image: torch.Tensor,
        landmarks: torch.Tensor,
        target: dict[str, torch.Tensor] | None = None,
        thresholds: dict[str, float] | None = None,
        margin: float = 0.1,
    ):
        self.ensemble = ensemble
        self.landmarks = landmarks
        self.target = target
        self.thresholds = thresholds
        self.margin = margin
        with torch.no_grad():
            self.original = ensemble(image, landmarks)

    def similarities(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{model: F}`` cosine of each face to its reference (own original, or the target)."""
        return self.ensemble.map_models(lambda name: self._similarity(name, image))

    def _similarity(self, name: str, image: torch.Tensor) -> torch.Tensor:
        model = self.ensemble.models[name]
        embedding = model(self.ensemble.align(image, self.landmarks.to(image), name))
        reference = self.original[name] if self.target is None else self.target[name]
        return (embedding * reference.to(embedding)).sum(-1)

    def scaled(self, name: str, s: torch.Tensor) -> torch.Tensor:
        """``(cos − t) / (1 − t)``: 0 at the model's threshold, 1 at a perfect match."""
        t = self.thresholds[name]
        return (s - t) / (1.0 - t)

    def loss(self, sims: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self._term(name, s) for name, s in sims.items()]).mean()

    def _term(self, name: str, s: torch.Tensor) -> torch.Tensor:
        """One model's share of the loss (before the mean over models)."""
        if self.thresholds is None:
            return s.mean() if self.target is None else -s.mean()
        if self.target is None:
            return F.relu(self.scaled(name, s) + self.margin).mean()
        return F.relu(self.margin - self.scaled(name, s)).mean()

    def loss_and_grad(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss at ``image`` and its gradient with respect to ``image`` (same shape), without a graph.

        The loss is a mean of one term per model, so each model's forward and backward runs on its own CPU
        thread (:meth:`FREnsemble.map_models`) and the gradients are summed in the ensemble's order. A model
        already past its threshold by the margin has a zero term and gradient: its backward is skipped.
        """
        leaf = image.detach().requires_grad_(True)

        def term_and_grad(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            term = self._term(name, self._similarity(name, leaf))
            if not term.requires_grad or (self.thresholds is not None and float(term.detach()) == 0.0):
                return term.detach(), torch.zeros_like(leaf)
            (grad,) = torch.autograd.grad(term, leaf)
            return term.detach(), grad

        parts = list(self.ensemble.map_models(term_and_grad).values())
        loss = torch.stack([term for term, _ in parts]).mean()
        grad = torch.stack([g for _, g in parts]).sum(0) / len(parts)
        return loss, grad

    def succeeded(self, sims: dict[str, torch.Tensor]) -> bool:
        """Every face past every model's threshold by the margin (only meaningful with thresholds)."""
        if self.thresholds is None:
            return False
        if self.target is None:
            return all(bool((self.scaled(n, s) < -self.margin).all()) for n, s in sims.items())
        return all(bool((self.scaled(n, s) > self.margin).all()) for n, s in sims.items())


def texture_budget(image: torch.Tensor, epsilon: float, floor: float = 0.5, sigma: float = 2.0) -> torch.Tensor:
    """Per-pixel L∞ budget ``1×1×H×W``: ``epsilon`` in textured areas, down to ``floor·epsilon`` on smooth ones.

    Noise is far less visible on texture (hair, eyebrows, edges) than on smooth skin or sky (contrast masking,
    the basis of JND models). The local standard deviation of luma over a Gaussian window of ``sigma`` px,
    divided by its 75th percentile over the image, scales the budget within ``[floor, 1]``.
    """
    y = luma(image.detach())
    mean = gaussian_blur(y, sigma, border="nearest", truncate=3.0)
    std = (gaussian_blur(y * y, sigma, border="nearest", truncate=3.0) - mean * mean).clamp(min=0).sqrt()
    reference = torch.quantile(std.flatten(), 0.75).clamp(min=1e-4)
    return epsilon * (std / reference).clamp(floor, 1.0)


def sign_attack(
    image: torch.Tensor,
    objective: IdentityObjective,
    budget: torch.Tensor | float,
    steps: int,
    step_size: float,
    momentum: float = 0.0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    check_every: int = 0,
    generator: torch.Generator | None = None,
    random_start: bool | float = False,
    gradient_sigma: float = 0.0,
    constraint: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int, dict[str, list[float]]]:
    """Iterative sign-gradient attack (PGD; MI-FGSM with ``momentum`` > 0) under a per-pixel L∞ ``budget``.

    Args:
        image: ``1×3×h×w`` in [0, 1] (the region the objective's landmarks refer to).
        objective: what to minimise.
        budget: L∞ bound, a float or a ``1×1×h×w`` / ``1×3×h×w`` map.
        steps, step_size: iterations and the step of each, in [0, 1] pixel units.
        momentum: decay of the accumulated L1-normalised gradient (0 = plain PGD).
        transform: applied to the perturbed image before the objective each step (EOT / input diversity).
        mask: ``1×1×h×w`` in [0, 1]; the perturbation is multiplied by it (0 = pixel untouched).
        check_every: every this many steps, stop early once ``objective.succeeded`` on the untransformed image.
        random_start: start from uniform noise in the budget (Madry et al.'s PGD); a float in (0, 1] scales that
            noise (a fraction of the budget). For dodging the start matters: at the original image the cosine to
            itself is at its maximum, so its gradient is numerical noise (it flips with the thread count).
        gradient_sigma: smooth each gradient with a Gaussian of this σ in pixels before the update
            (translation-invariant attack, Dong et al. 2019): the perturbation stops depending on the exact
            pixel grid of the surrogates' crops, which transfers better to other models and survives resampling.
        constraint: maps the perturbation to a feasible one after each step's L∞ projection (e.g.
            :func:`quality_constraint`).
        progress: called as ``progress(step, steps)`` after each step.

    Returns:
        ``(protected image, steps run, history of loss per step)``.
    """
    budget_t = torch.as_tensor(budget, dtype=image.dtype, device=image.device)
    if mask is not None:
        budget_t = budget_t * mask
    delta = torch.zeros_like(image)
    if random_start:
        delta = (torch.rand(image.shape, generator=generator).to(image) * 2 - 1) * budget_t * float(random_start)
    velocity = torch.zeros_like(image)
    history: dict[str, list[float]] = {"loss": []}
    done = 0
    for step in range(steps):
        delta.requires_grad_(True)
        adv = (image + delta).clamp(0, 1)
        seen = transform(adv) if transform is not None else adv
        loss, grad_seen = objective.loss_and_grad(seen)
        (grad,) = torch.autograd.grad(seen, delta, grad_seen)
        if gradient_sigma > 0:
            grad = gaussian_blur(grad, gradient_sigma, border="nearest", truncate=3.0)
        history["loss"].append(loss.item())
        done = step + 1
        with torch.no_grad():
            if momentum > 0:
                velocity = momentum * velocity + grad / grad.abs().mean().clamp(min=1e-12)
                direction = velocity.sign()
            else:
                direction = grad.sign()
            delta = torch.maximum(torch.minimum(delta - step_size * direction, budget_t), -budget_t)
            delta = (image + delta).clamp(0, 1) - image
            if constraint is not None:
                delta = constraint(delta)
        if progress is not None:
            progress(done, steps)
        if check_every and done % check_every == 0:
            with torch.no_grad():
                if objective.succeeded(objective.similarities((image + delta).clamp(0, 1))):
                    break
    return (image + delta).clamp(0, 1).detach(), done, history


def quality_constraint(image: torch.Tensor, min_ssim: float = 0.0, min_psnr: float = 0.0, tries: int = 4
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A perceptual budget on top of L∞: the perturbation, scaled down just enough that ``image + delta`` keeps
    an SSIM ≥ ``min_ssim`` and a PSNR ≥ ``min_psnr`` dB to ``image`` (``1×3×h×w``, h, w ≥ 11; 0 = no floor);
    unchanged when it already does.

    The L∞ bound alone spends the same ε on a photo of smooth skin, where it shows (low SSIM), as on a textured
    one, where it does not; with these floors every photo gets the most perturbation its content hides. The
    PSNR factor is exact (PSNR rises by 20·log10(1/factor) dB); for small perturbations 1 − SSIM grows with the
    square of their scale, so its factor is ``√((1 − floor) / (1 − SSIM))`` (a hair less), checked and repeated
    at most ``tries`` times.
    """
    def project(delta: torch.Tensor) -> torch.Tensor:
        value = psnr_of_change(image, delta) if min_psnr > 0 else math.inf
        if value < min_psnr:
            delta = delta * (0.999 * 10 ** ((value - min_psnr) / 20))
        for _ in range(tries if min_ssim > 0 else 0):
            value = ssim_of_change(image, delta)
            if value >= min_ssim:
                break
            delta = delta * (0.998 * ((1.0 - min_ssim) / (1.0 - value)) ** 0.5)
        return delta

    return project


def rescale_to_floors(image: torch.Tensor, delta: torch.Tensor, bound: torch.Tensor, min_ssim: float,
                      min_psnr: float, most: float = 4.0) -> torch.Tensor:
    """``delta`` scaled up (at most ``most``×, never past the L∞ ``bound``) until ``image + delta`` meets the SSIM /
    PSNR floors exactly, or scaled down when it does not meet them (:func:`quality_constraint`).

    For a perturbation made at a coarser scale and upsampled: its floors held at that scale, where it was sharp;
    at the photo's own scale it is smooth and costs less SSIM, so the same floors allow more of it.
    """
    # up by the exact PSNR factor; quality_constraint then takes it down to the SSIM floor if that binds first
    factor = min(most, 10 ** ((psnr_of_change(image, delta) - min_psnr) / 20)) if min_psnr > 0 else most
    if factor > 1:
        delta = torch.maximum(torch.minimum(delta * factor, bound), -bound)
        delta = (image + delta).clamp(0, 1) - image
    return quality_constraint(image, min_ssim, min_psnr)(delta)


def psnr_of_change(image: torch.Tensor, delta: torch.Tensor) -> float:
    """PSNR (dB) of ``(image + delta).clamp(0, 1)`` to ``image``."""
    from faceshield.eval.quality import psnr

    return float(psnr((image + delta).clamp(0, 1), image))


def ssim_of_change(image: torch.Tensor, delta: torch.Tensor) -> float:
    """SSIM of ``(image + delta).clamp(0, 1)`` to ``image`` (``1×3×h×w``), computed where ``delta`` is non-zero.

    Every SSIM window that sees only unchanged pixels scores exactly 1, so the mean over the whole image is
    ``1 − (1 − SSIM of the changed box) · (windows in the box / windows in the image)``, the box being the
    bounding box of the change grown by two window radii. The same value as :func:`faceshield.eval.quality.ssim`
    on the whole image (to float rounding), at the cost of the face instead of the photo around it.
    """
    from faceshield.eval.quality import SSIM_RADIUS, ssim

    changed = (delta != 0).any(dim=1)[0]
    rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
    if len(rows) == 0:
        return 1.0
    pad = 2 * SSIM_RADIUS
    (h, w), side = image.shape[-2:], 2 * SSIM_RADIUS + 1
    y0, y1 = max(0, int(rows[0]) - pad), min(h, int(rows[-1]) + 1 + pad)
    x0, x1 = max(0, int(cols[0]) - pad), min(w, int(cols[-1]) + 1 + pad)
    a = image[..., y0:y1, x0:x1]
    if min(a.shape[-2:]) < side:
        y0, y1, x0, x1, a = 0, h, 0, w, image
    value = float(ssim((a + delta[..., y0:y1, x0:x1]).clamp(0, 1), a))
    windows = ((y1 - y0 - side + 1) * (x1 - x0 - side + 1)) / ((h - side + 1) * (w - side + 1))
    return 1.0 - (1.0 - value) * windows


def surrogate_ensemble(names: tuple[str, ...] | list[str], device: str | torch.device = "cpu",
                       far: float = 1e-2) -> tuple[FREnsemble, dict[str, float]]:
    """The surrogate models (empty → every calibrated model with AUC ≥ 0.9) and their thresholds at ``far``."""
    from faceshield.eval.calibration import shipped_table

    table = shipped_table()
    names = list(names) or table.surrogate_models()
    ensemble = FREnsemble(names, device)
    thresholds = {n: table.models[n].threshold(far) for n in names if n in table.models}
    return ensemble, thresholds if len(thresholds) == len(names) else {}


def input_diversity(x: torch.Tensor, probability: float = 0.5, max_shift: float = 0.03,
                    scale_range: tuple[float, float] = (0.9, 1.1), generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Input diversity (Xie et al. 2019) that keeps the image size: with ``probability``, rescale the content by a
    random factor in ``scale_range`` about the centre and shift it by up to ``max_shift`` of the size (borders
    replicated). With fixed landmarks this is also a small alignment jitter, which is what transfers."""
    if float(torch.rand((), generator=generator)) >= probability:
        return x
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * float(torch.rand((), generator=generator))
    shift = (torch.rand(2, generator=generator) * 2 - 1) * max_shift * 2  # grid units span 2
    theta = x.new_tensor([[1 / scale, 0, float(shift[0])], [0, 1 / scale, float(shift[1])]]).unsqueeze(0)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
