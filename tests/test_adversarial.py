"""Building blocks of the pixel attacks: the perceptual (SSIM / PSNR) budget."""

import pytest
import torch

from faceshield.adversarial import quality_constraint
from faceshield.eval.quality import psnr, ssim
from faceshield.images import to_tensor


def _sign_noise(image: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.sign(torch.randn(image.shape, generator=torch.Generator().manual_seed(0))) * epsilon / 255


@pytest.mark.parametrize("epsilon", [8, 16])
def test_ssim_floor_scales_the_perturbation_just_enough(face_rgb, epsilon):
    image = to_tensor(face_rgb)
    noise = _sign_noise(image, epsilon)
    assert float(ssim((image + noise).clamp(0, 1), image)) < 0.9  # far outside the budget
    projected = quality_constraint(image, min_ssim=0.95)(noise)
    assert 0.95 <= float(ssim((image + projected).clamp(0, 1), image)) < 0.953  # inside, not shrunk more than needed
    ratio = projected / noise
    assert torch.allclose(ratio, ratio.flatten()[0])  # one factor: the perturbation's pattern is kept
    small = noise * 0.05  # already inside: returned as is
    assert quality_constraint(image, min_ssim=0.95)(small) is small


def test_psnr_floor_is_exact_and_both_floors_hold_together(face_rgb):
    image = to_tensor(face_rgb)
    noise = _sign_noise(image, 12)
    projected = quality_constraint(image, min_psnr=38.0)(noise)
    assert 38.0 <= float(psnr((image + projected).clamp(0, 1), image)) < 38.05
    both = quality_constraint(image, min_ssim=0.97, min_psnr=36.0)(noise)
    protected = (image + both).clamp(0, 1)
    assert float(ssim(protected, image)) >= 0.97 and float(psnr(protected, image)) >= 36.0
