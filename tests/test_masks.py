"""Face masks, feathering and paste-back."""

import math

import numpy as np
import pytest
import torch

from faceshield.errors import ShapeError
from faceshield.faces.align import align_to_template, crop_transform, transform_points
from faceshield.faces.masks import (
    face_mask_from_landmarks,
    feather,
    hull_mask,
    paste_back,
    paste_crops,
)
from faceshield.models.registry import ARCFACE_112

TEMPLATE = torch.tensor(ARCFACE_112, dtype=torch.float64)


def face_at(scale: float, angle_deg: float, shift: tuple[float, float]) -> torch.Tensor:
    """The ArcFace template placed in a photo by a similarity: 1×5×2 landmarks."""
    a = math.radians(angle_deg)
    m = torch.tensor(
        [[[scale * math.cos(a), -scale * math.sin(a), shift[0]], [scale * math.sin(a), scale * math.cos(a), shift[1]]]],
        dtype=torch.float64,
    )
    return transform_points(TEMPLATE, m)


# ------------------------------------------------------------------------------------------ face mask


def test_face_mask_is_one_at_face_zero_far_away_and_covers_landmarks():
    lm = face_at(1.5, 10.0, (40.0, 30.0))
    mask = face_mask_from_landmarks(lm, (240, 220))
    assert mask.shape == (1, 1, 240, 220) and mask.dtype == torch.float64
    assert mask.min() >= 0 and mask.max() <= 1
    centre = lm[0, :2].mean(0) * 0.7 + lm[0, 3:].mean(0) * 0.3
    assert mask[0, 0, round(float(centre[1])), round(float(centre[0]))] == 1
    for x, y in lm[0].tolist():  # all 5 landmarks lie well inside the face region
        assert mask[0, 0, round(y), round(x)] == 1
    assert mask[0, 0, :5].max() == 0 and mask[0, 0, :, -5:].max() == 0 and mask[0, 0, -5:].max() == 0
    # Proportions: the mask spans about 2.3 inter-ocular distances across and 2.4 eye–mouth distances along.
    area = float(mask.sum())
    d_eye = float(torch.linalg.vector_norm(lm[0, 1] - lm[0, 0]))
    d_em = float(torch.linalg.vector_norm(lm[0, 3:].mean(0) - lm[0, :2].mean(0)))
    expected = math.pi * 1.15 * max(d_eye, 0.85 * d_em) * 1.2 * d_em
    assert 0.8 * expected < area < expected


def test_face_mask_rotates_with_the_face_and_scales():
    lm = face_at(1.2, 0.0, (30.0, 20.0))
    mask = face_mask_from_landmarks(lm, (200, 200), softness=0.2)
    # Rotate the face by 90° about the image centre (pixel centres 0..199, centre 99.5): x' = y, y' = 199 - x,
    # which is torch.rot90 of the image; the eye order stays (image-left eye is the subject's right eye).
    rotated = torch.stack([lm[..., 1], 199.0 - lm[..., 0]], dim=-1)
    mask_rot = face_mask_from_landmarks(rotated, (200, 200), softness=0.2)
    torch.testing.assert_close(mask_rot, torch.rot90(mask, k=1, dims=(2, 3)), atol=1e-9, rtol=0)
    bigger = face_mask_from_landmarks(lm, (200, 200), scale=1.3, softness=0.2)
    assert (bigger >= mask - 1e-12).all() and bigger.sum() > 1.5 * mask.sum()


def test_face_mask_soft_rim_and_gradient():
    lm = face_at(1.0, -15.0, (20.0, 20.0)).requires_grad_(True)
    soft = face_mask_from_landmarks(lm, (150, 150), softness=0.15)
    hard = face_mask_from_landmarks(lm.detach(), (150, 150), softness=0.0)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert ((soft > 0) & (soft < 1)).sum() > 200  # a real ramp
    assert (soft[hard == 0] == 0).all()  # the rim lies inside the hard ellipse
    soft.sum().backward()
    assert lm.grad.abs().sum() > 0 and torch.isfinite(lm.grad).all()
    with pytest.raises(ShapeError):
        face_mask_from_landmarks(torch.rand(2, 4, 2), (50, 50))
    with pytest.raises(ShapeError):
        face_mask_from_landmarks(torch.zeros(5, 2), (50, 50))


def test_face_mask_batch():
    lms = torch.cat([face_at(1.0, 0.0, (10.0, 10.0)), face_at(0.6, 30.0, (60.0, 20.0))])
    masks = face_mask_from_landmarks(lms.float(), (130, 130))
    assert masks.shape == (2, 1, 130, 130) and masks.dtype == torch.float32
    torch.testing.assert_close(masks[1:], face_mask_from_landmarks(lms[1].float(), (130, 130)))


# ------------------------------------------------------------------------------------- blur / feather


def test_feather_edge_is_monotone_and_local():
    mask = torch.zeros(1, 1, 40, 60, dtype=torch.float64)
    mask[..., 30:] = 1.0  # vertical edge between columns 29 and 30
    soft = feather(mask, 6.0)
    assert soft.min() >= 0 and soft.max() <= 1
    profile = soft[0, 0, 20]
    assert (profile[1:] - profile[:-1] >= 0).all()  # monotone across the edge
    assert (profile[:24] == 0).all() and (profile[36:] == 1).all()  # unchanged beyond the radius
    assert 0.02 < profile[27] < 0.5 < profile[32] < 0.98
    torch.testing.assert_close(soft[0, 0], soft[0, 0, :1].expand(40, 60))  # replicated borders: no fading
    assert feather(mask, 0) is mask


def test_feather_disc_stays_in_unit_range():
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = (((xs - 32) ** 2 + (ys - 30) ** 2) < 15**2).float().view(1, 1, 64, 64)
    soft = feather(disc, 4.0)
    assert soft.min() >= 0 and soft.max() <= 1
    assert soft[0, 0, 30, 32] == pytest.approx(1.0) and soft[0, 0, 0, 0] == 0
    # Along a ray from the centre the value only decreases.
    ray = soft[0, 0, 30, 32:]
    assert (ray[1:] - ray[:-1] <= 1e-7).all()


def test_feather_and_paste_back_gradcheck():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 1, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    # Values near 0.5 so the clamp in feather stays inactive (it only guards rounding).
    assert torch.autograd.gradcheck(lambda m: feather(0.25 + 0.5 * m, 2.0), (mask,))
    orig = torch.rand(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    edit = torch.rand(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(paste_back, (orig, edit, m))


# ------------------------------------------------------------------------------------------ paste


def test_paste_back_exact_outside_and_inside():
    g = torch.Generator().manual_seed(1)
    orig = torch.rand(2, 3, 50, 60, generator=g)
    edit = torch.rand(2, 3, 50, 60, generator=g)
    lm = torch.cat([face_at(0.3, 0.0, (10.0, 5.0)), face_at(0.35, 20.0, (25.0, 8.0))]).float()
    mask = feather(face_mask_from_landmarks(lm, (50, 60)), 2.0)
    out = paste_back(orig, edit, mask)
    outside, inside = (mask == 0).expand_as(orig), (mask == 1).expand_as(orig)
    assert outside.any() and inside.any()
    assert torch.equal(out[outside], orig[outside])
    assert torch.equal(out[inside], edit[inside])
    mid = ((mask > 0) & (mask < 1)).expand_as(orig)
    lo, hi = torch.minimum(orig, edit), torch.maximum(orig, edit)
    assert ((out[mid] >= lo[mid] - 1e-6) & (out[mid] <= hi[mid] + 1e-6)).all()
    # A per-channel mask is accepted too.
    torch.testing.assert_close(paste_back(orig, edit, mask.expand_as(orig)), out)
    with pytest.raises(ShapeError):
        paste_back(orig, edit[:, :, :-1], mask)
    with pytest.raises(ShapeError):
        paste_back(orig, edit, mask[:1])
    with pytest.raises(ShapeError):
        paste_back(orig, edit, mask.expand(2, 2, 50, 60))


def test_paste_crops_puts_edited_faces_back():
    g = torch.Generator().manual_seed(2)
    photo = torch.rand(1, 3, 160, 200, generator=g, dtype=torch.float64)
    faces = torch.cat([face_at(0.6, 5.0, (15.0, 20.0)), face_at(0.7, -10.0, (110.0, 60.0))])
    m = crop_transform(faces, TEMPLATE)
    crops = align_to_template(photo, faces, TEMPLATE, 112)
    masks = face_mask_from_landmarks(faces, (160, 200))
    # Pixels outside every face mask keep their exact values.
    same = paste_crops(photo, crops, m, masks)
    assert same.shape == photo.shape
    outside = (masks.amax(0, keepdim=True) == 0).expand_as(photo)
    assert torch.equal(same[outside], photo[outside])
    # An edit (here: colour inversion of each crop) replaces the pixels where mask and coverage are 1.
    edited = paste_crops(photo, 1.0 - crops, m, masks)
    assert torch.equal(edited[outside], photo[outside])
    for i, (x, y) in enumerate(faces[:, 2].tolist()):  # at each nose tip
        r, c = round(y), round(x)
        assert masks[i, 0, r, c] == 1
        torch.testing.assert_close(edited[0, :, r, c], 1.0 - same[0, :, r, c], atol=1e-12, rtol=0)
    # One face per photo: batch of 2 photos, 2 crops.
    both = paste_crops(photo.expand(2, -1, -1, -1), 1.0 - crops, m, masks)
    assert both.shape == (2, 3, 160, 200)
    with pytest.raises(ShapeError):
        paste_crops(photo, crops, m[:1], masks)


# ------------------------------------------------------------------------------------------- hull


def test_hull_mask_matches_point_in_polygon():
    spatial = pytest.importorskip("scipy.spatial")
    measure = pytest.importorskip("skimage.measure")
    g = torch.Generator().manual_seed(3)
    # A 468-point cloud shaped like a face mesh: points inside an ellipse.
    t = torch.rand(468, generator=g, dtype=torch.float64) * 2 * math.pi
    r = torch.rand(468, generator=g, dtype=torch.float64).sqrt()
    pts = torch.stack([60 + 35 * r * torch.cos(t), 50 + 45 * r * torch.sin(t)], dim=-1)
    mask = hull_mask(pts, (110, 130), softness=0)
    assert mask.shape == (1, 1, 110, 130) and set(mask.unique().tolist()) <= {0.0, 1.0}

    hull = pts.numpy()[spatial.ConvexHull(pts.numpy()).vertices]
    ys, xs = np.mgrid[0:110, 0:130]
    centres = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    ref = measure.points_in_poly(centres, hull).reshape(110, 130)
    # Distance of every pixel centre to the hull boundary, to skip the ones that sit on it.
    soft = hull_mask(pts, (110, 130), softness=1e-3)[0, 0].numpy()
    clear = (soft == 0) | (soft == 1)
    assert (mask[0, 0].numpy()[clear] == ref[clear]).all()
    assert clear.mean() > 0.98 and ref.sum() > 2000


def test_hull_mask_soft_edge_and_gradient():
    square = torch.tensor([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0], [20.0, 20.0]],
                          dtype=torch.float64, requires_grad=True)
    mask = hull_mask(square, (40, 40), softness=2.0)
    row = mask[0, 0, 20]
    assert row[9] == 0 and row[10] == 0.5 and row[11] == 1 and row[30] == 0.5 and row[31] == 0
    assert torch.equal(mask[0, 0, 0], torch.zeros(40, dtype=torch.float64))
    mask.sum().backward()
    # Moving the right edge outward grows the mask; the interior point has no effect.
    assert square.grad[1, 0] > 0 and square.grad[2, 0] > 0 and square.grad[4].abs().sum() == 0
    with pytest.raises(ShapeError):
        hull_mask(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), (5, 5))
