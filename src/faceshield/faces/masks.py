"""Soft face-region masks, Gaussian feathering, and paste-back of edited pixels or crops.

Pixel convention as in :mod:`faceshield.faces.align`: the centre of pixel ``[row i, column j]`` is at
``(x, y) = (j, i)``. Masks are ``B×1×H×W`` floats in [0, 1] (1 = take the edited pixel). Everything is
out-of-place, so masks built from landmarks that require grad stay differentiable.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from faceshield.augment import gaussian_blur
from faceshield.errors import ShapeError
from faceshield.faces.align import Size2, _as_points, _check_image, _check_matrices, _size2, warp_back

logger = logging.getLogger(__name__)

__all__ = [
    "FACE_ELLIPSE",
    "face_mask_from_landmarks",
    "feather",
    "hull_mask",
    "paste_back",
    "paste_crops",
]

# Proportions of the 5-point face ellipse, in units of the eye-midpoint → mouth-midpoint distance d_em and
# the inter-ocular distance d_eye (checked on the ArcFace 112 template, where d_eye ≈ 35 px, d_em ≈ 41 px:
# the ellipse then spans y ≈ 15 … 113 and x ≈ 15 … 97).
FACE_ELLIPSE = {
    # centre = eye midpoint + centre_offset · (mouth midpoint − eye midpoint): a bit above the nose tip.
    "centre_offset": 0.3,
    # semi-axis across the face (along the eye line) = across · max(d_eye, profile_floor · d_em); the floor keeps
    # the mask wide when the head turns and the eyes come close together in the image.
    "across": 1.15,
    "profile_floor": 0.85,
    # semi-axis along the face (perpendicular to the eye line) = along · d_em: from 0.9 d_em above the eyes
    # (hairline) to 0.5 d_em below the mouth (chin), as measured on CelebA-HQ faces.
    "along": 1.2,
}


def feather(mask: Tensor, radius: float) -> Tensor:
    """Soften mask edges with a Gaussian (σ = radius / 3, kernel ±radius pixels, replicated borders).

    A hard edge becomes a monotone ramp from 0 to 1 over ``2·radius`` pixels, centred on the old edge; pixels
    farther than ``radius`` from every edge keep their value exactly (0 stays 0, 1 stays 1).

    Args:
        mask: ``B×C×H×W`` float (usually ``B×1×H×W`` in [0, 1]).
        radius: feather half-width in pixels; ``radius ≤ 0`` returns the mask unchanged.

    Returns:
        ``B×C×H×W``, differentiable w.r.t. ``mask``; stays in [0, 1] for a mask in [0, 1].
    """
    _check_image(mask, "mask")
    if radius <= 0:
        return mask
    return gaussian_blur(mask, radius / 3.0, border="nearest", truncate=3.0).clamp(0.0, 1.0)


def _grid(size: Size2, like: Tensor) -> tuple[Tensor, Tensor]:
    h, w = size
    ys = torch.arange(h, dtype=like.dtype, device=like.device).view(1, h, 1)
    xs = torch.arange(w, dtype=like.dtype, device=like.device).view(1, 1, w)
    return xs, ys


def _smoothstep(t: Tensor) -> Tensor:
    t = t.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def face_mask_from_landmarks(
    landmarks: Tensor | Sequence,
    image_size: int | Size2,
    scale: float = 1.0,
    softness: float = 0.1,
) -> Tensor:
    """Soft elliptical face mask from 5 landmarks.

    The ellipse (proportions in :data:`FACE_ELLIPSE`) is centred between the eyes and the mouth
    (``e + 0.3·(m − e)`` with ``e``, ``m`` the eye and mouth-corner midpoints), rotated with the eye line, with
    semi-axes ``1.15·max(d_eye, 0.85·d_em)`` across and ``1.2·d_em`` along the face (``d_eye`` inter-ocular
    distance, ``d_em = ‖m − e‖``), both times ``scale``. On a frontal face this covers forehead to chin and
    cheek to cheek.

    Args:
        landmarks: ``B×5×2`` (or ``5×2``) float points in image pixels: image-left eye, image-right eye, nose
            tip, image-left mouth corner, image-right mouth corner.
        image_size: (H, W) of the image, or an int for a square.
        scale: multiplies both semi-axes (> 1 grows the mask).
        softness: width of the soft rim as a fraction of the ellipse radius; the mask is exactly 1 inside
            normalised radius ``1 − softness``, exactly 0 at radius ≥ 1, smoothstep in between. 0 = hard.

    Returns:
        ``B×1×H×W`` in [0, 1], in the landmarks' dtype, differentiable w.r.t. the landmarks.
    """
    landmarks = _as_points(landmarks, "landmarks")
    if landmarks.shape[1] != 5:
        raise ShapeError(f"face_mask_from_landmarks needs 5 landmarks per face, got {landmarks.shape[1]}")
    if scale <= 0 or not 0 <= softness < 1:
        raise ShapeError(f"need scale > 0 and 0 ≤ softness < 1, got scale={scale}, softness={softness}")
    size = _size2(image_size, "image_size")
    eyes = landmarks[:, 0:2].mean(dim=1)  # B×2
    mouth = landmarks[:, 3:5].mean(dim=1)
    eye_vec = landmarks[:, 1] - landmarks[:, 0]
    d_eye = torch.linalg.vector_norm(eye_vec, dim=1)
    d_em = torch.linalg.vector_norm(mouth - eyes, dim=1)
    if bool((d_eye <= 0).any()) or bool((d_em <= 0).any()):
        raise ShapeError("face_mask_from_landmarks: eyes (or eyes and mouth) coincide, no face geometry")
    u = eye_vec / d_eye.unsqueeze(1)  # unit vector along the eye line
    centre = eyes + FACE_ELLIPSE["centre_offset"] * (mouth - eyes)
    semi_across = FACE_ELLIPSE["across"] * torch.maximum(d_eye, FACE_ELLIPSE["profile_floor"] * d_em) * scale
    semi_along = FACE_ELLIPSE["along"] * d_em * scale

    xs, ys = _grid(size, landmarks)
    dx = xs - centre[:, 0].view(-1, 1, 1)
    dy = ys - centre[:, 1].view(-1, 1, 1)
    ux, uy = u[:, 0].view(-1, 1, 1), u[:, 1].view(-1, 1, 1)
    across = dx * ux + dy * uy  # coordinate along the eye line
    along = -dx * uy + dy * ux  # perpendicular to it
    r2 = (across / semi_across.view(-1, 1, 1)) ** 2 + (along / semi_along.view(-1, 1, 1)) ** 2
    # sqrt has an infinite derivative at 0; the centre pixel may sit exactly there, so keep it off 0.
    r = torch.sqrt(r2.clamp_min(1e-12))
    if softness == 0:
        mask = (r < 1).to(landmarks.dtype)
    else:
        mask = _smoothstep((1.0 - r) / softness)
    return mask.unsqueeze(1)


def _convex_hull(points: Tensor) -> list[int]:
    """Indices of the convex hull of ``points`` (N×2, any device) in counter-clockwise order of the raw (x, y)
    axes (Andrew's monotone chain); collinear points on edges are dropped."""
    pts = points.detach().cpu().double().tolist()
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], pts[i][1]))

    def cross(o: int, a: int, b: int) -> float:
        return (pts[a][0] - pts[o][0]) * (pts[b][1] - pts[o][1]) - (pts[a][1] - pts[o][1]) * (pts[b][0] - pts[o][0])

    lower: list[int] = []
    for i in order:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], i) <= 0:
            lower.pop()
        lower.append(i)
    upper: list[int] = []
    for i in reversed(order):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], i) <= 0:
            upper.pop()
        upper.append(i)
    return lower[:-1] + upper[:-1]


def hull_mask(points: Tensor | Sequence, image_size: int | Size2, softness: float = 1.0) -> Tensor:
    """Mask of the convex hull of many landmarks (e.g. a 468-point face mesh).

    Each pixel centre gets the signed distance ``d`` to the hull (positive inside: the smallest distance to
    the hull's edge lines, a half-plane point-in-polygon test); the mask is ``clamp(0.5 + d / softness, 0, 1)``
    (0.5 on the hull boundary), or ``d ≥ 0`` when ``softness = 0``.

    Args:
        points: ``B×N×2`` (or ``N×2``) float points (x, y) in image pixels, N ≥ 3 not all collinear.
        image_size: (H, W), or an int for a square.
        softness: width in pixels of the linear ramp across the boundary.

    Returns:
        ``B×1×H×W`` in [0, 1], in the points' dtype; differentiable w.r.t. the hull vertices (the choice of
        hull vertices is not).
    """
    points = _as_points(points, "points")
    if softness < 0:
        raise ShapeError(f"softness must be ≥ 0, got {softness}")
    size = _size2(image_size, "image_size")
    xs, ys = _grid(size, points)
    xs, ys = xs[0], ys[0]  # 1×W, H×1
    masks = []
    for b in range(points.shape[0]):
        hull = _convex_hull(points[b])
        if len(hull) < 3:
            raise ShapeError(f"hull_mask: points of batch item {b} are collinear or fewer than 3")
        verts = points[b, hull]  # K×2, counter-clockwise in raw axes
        edges = torch.roll(verts, -1, dims=0) - verts
        lengths = torch.linalg.vector_norm(edges, dim=1)
        # Pick, per pixel, the edge whose line is nearest (smallest signed distance) without building a graph
        # over all K edges; then recompute that one distance with gradients (memory O(H·W), not O(K·H·W)).
        with torch.no_grad():
            best = torch.full(size, float("inf"), dtype=points.dtype, device=points.device)
            best_k = torch.zeros(size, dtype=torch.long, device=points.device)
            for k in range(len(hull)):
                dist = (edges[k, 0] * (ys - verts[k, 1]) - edges[k, 1] * (xs - verts[k, 0])) / lengths[k]
                closer = dist < best
                best = torch.where(closer, dist, best)
                best_k = torch.where(closer, torch.full_like(best_k, k), best_k)
        ex, ey = edges[best_k, 0], edges[best_k, 1]
        vx, vy = verts[best_k, 0], verts[best_k, 1]
        dist = (ex * (ys - vy) - ey * (xs - vx)) / lengths[best_k]
        if softness == 0:
            masks.append((dist >= 0).to(points.dtype))
        else:
            masks.append((0.5 + dist / softness).clamp(0.0, 1.0))
    return torch.stack(masks).unsqueeze(1)


def _check_mask_for(mask: Tensor, image: Tensor) -> None:
    _check_image(mask, "mask")
    b, c, h, w = image.shape
    if mask.shape[0] != b or mask.shape[1] not in (1, c) or mask.shape[2:] != (h, w):
        raise ShapeError(f"mask must be {b}×1×{h}×{w} or {b}×{c}×{h}×{w}, got {tuple(mask.shape)}")


def paste_back(original: Tensor, edited: Tensor, mask: Tensor) -> Tensor:
    """``original·(1 − mask) + edited·mask``: exact ``original`` where mask is 0, exact ``edited`` where 1.

    Args:
        original: ``B×C×H×W`` float.
        edited: ``B×C×H×W`` float, same shape.
        mask: ``B×1×H×W`` (shared by the channels) or ``B×C×H×W``, values in [0, 1].

    Returns:
        ``B×C×H×W``, differentiable w.r.t. all three.
    """
    _check_image(original, "original")
    _check_image(edited, "edited")
    if edited.shape != original.shape:
        raise ShapeError(f"edited {tuple(edited.shape)} must have the shape of original {tuple(original.shape)}")
    _check_mask_for(mask, original)
    return original * (1.0 - mask) + edited * mask


def paste_crops(image: Tensor, crops: Tensor, matrices: Tensor, masks: Tensor) -> Tensor:
    """Paste edited aligned crops back into their photo, blended by face masks.

    Each crop is warped back with :func:`~faceshield.faces.align.warp_back`; its coverage ``cov`` (the warped
    image of an all-ones crop) times the face mask ``m`` is the alpha, and since the warped crop is already
    ``cov``-weighted the blend is ``out·(1 − m·cov) + m·warped`` (premultiplied alpha: no dark seam at the
    crop edge). Faces are pasted in order, later ones on top. Pixels where every ``m·cov`` is 0 keep
    ``image``'s exact values.

    Args:
        image: ``B×C×H×W`` float; B = 1 (all faces go into one photo) or B = F (one face per photo).
        crops: ``F×C×S×S`` edited crops.
        matrices: ``F×2×3`` image→crop matrices that produced the crops (:func:`~faceshield.faces.align.crop_transform`).
        masks: ``F×1×H×W`` face masks in image pixels in [0, 1] (e.g. feathered :func:`face_mask_from_landmarks`).

    Returns:
        ``B×C×H×W``, differentiable w.r.t. all inputs.
    """
    _check_image(image)
    _check_image(crops, "crops")
    _check_matrices(matrices)
    _check_image(masks, "masks")
    b, c, h, w = image.shape
    f = crops.shape[0]
    if crops.shape[1] != c:
        raise ShapeError(f"crops have {crops.shape[1]} channels, image has {c}")
    if matrices.shape[0] != f or masks.shape != (f, 1, h, w):
        raise ShapeError(
            f"need matrices {f}×2×3 and masks {f}×1×{h}×{w} for {f} crops, "
            f"got {tuple(matrices.shape)} and {tuple(masks.shape)}"
        )
    if b not in (1, f):
        raise ShapeError(f"image batch must be 1 or the number of crops ({f}), got {b}")
    warped = warp_back(crops, matrices, (h, w))
    coverage = warp_back(torch.ones_like(crops[:, :1]), matrices, (h, w))
    alpha = masks * coverage
    if b == f:
        return image * (1.0 - alpha) + masks * warped
    out = image
    for i in range(f):
        out = out * (1.0 - alpha[i : i + 1]) + masks[i : i + 1] * warped[i : i + 1]
    return out


def crop_faces(photos: Sequence[tuple[Tensor, Tensor]], template: Tensor, size: int) -> tuple[Tensor, list[Tensor]]:
    """Every face of every photo aligned to ``template`` (5 points in crop pixels) in ``size``² crops.

    Args:
        photos: ``[(image 1×3×H×W, landmarks F×5×2), …]``.
    Returns:
        ``(crops ΣF×3×size×size, [image→crop matrices F×2×3 per photo])``; anti-aliased, borders replicated.
    """
    from faceshield.faces.align import crop_transform, warp_to_crop

    crops, matrices = [], []
    for image, landmarks in photos:
        matrices.append(crop_transform(landmarks.to(image), template))
        crops.append(warp_to_crop(image, matrices[-1], size, padding_mode="border", antialias=True))
    return torch.cat(crops), matrices


def paste_faces(photos: Sequence[tuple[Tensor, Tensor]], faces: Tensor, matrices: Sequence[Tensor],
                mask_scale: float = 1.0) -> list[Tensor]:
    """The inverse of :func:`crop_faces`: each photo with its faces (rows of ``faces``, in crop order) pasted back
    through feathered face ellipses (``mask_scale``, softness 0.25); pixels outside them are untouched."""
    results, first = [], 0
    for (image, landmarks), matrix in zip(photos, matrices):
        count = len(landmarks)
        masks = face_mask_from_landmarks(landmarks.to(image), tuple(image.shape[-2:]), scale=mask_scale,
                                         softness=0.25)
        results.append(paste_crops(image, faces[first:first + count].to(image), matrix, masks))
        first += count
    return results
