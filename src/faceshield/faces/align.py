"""Differentiable similarity alignment of faces to an FR model's canonical crop, and back.

Conventions used throughout this module:

* **Pixel coordinates**: ``(x, y)`` with x along the width and y along the height; the centre of pixel
  ``[row i, column j]`` is at ``(x, y) = (j, i)``, so an image of width W spans ``x ∈ [-0.5, W - 0.5]``.
  This is the convention of OpenCV's ``warpAffine``, of InsightFace's templates and of landmark detectors.
* **Affine matrices** are ``B×2×3`` tensors ``A`` acting on homogeneous pixel coordinates: ``p' = A @ [x, y, 1]``.
* An **image→crop matrix** ``M`` (what :func:`crop_transform` returns) maps a point of the original photo to
  the crop, like the matrix one would pass to ``cv2.warpAffine``. Sampling a crop needs the opposite
  direction (crop pixel → where to read in the photo), i.e. ``invert_affine(M)``.
* Resampling is done by :func:`torch.nn.functional.grid_sample`, so every output is differentiable with
  respect to the input pixels and to the landmarks. ``grid_sample`` works in normalised coordinates in
  [-1, 1]; :func:`pixel_to_grid` converts a pixel-space sampling matrix for either ``align_corners`` setting,
  so the result in pixel space does not depend on that flag (except for ``padding_mode="reflection"``,
  which reflects about the pixel edges with ``align_corners=False`` and about the border pixel centres with
  ``True``).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from faceshield.augment import gaussian_blur
from faceshield.errors import ShapeError

if TYPE_CHECKING:
    from faceshield.models.registry import FRModelConfig

logger = logging.getLogger(__name__)

Size2 = tuple[int, int]

__all__ = [
    "CELEBAHQ_256",
    "align_for_model",
    "align_to_template",
    "compose_affine",
    "crop_transform",
    "estimate_similarity",
    "grid_to_pixel",
    "invert_affine",
    "pixel_to_grid",
    "transform_points",
    "warp_affine",
    "warp_back",
    "warp_to_crop",
]


# Where the 5 landmarks sit in CelebA-HQ's aligned 256×256 photos: the mean RetinaFace landmarks of 197 photos of
# ../shared/data/celebahq-pairs/train, made left-right symmetric. The framing the diffusion methods' papers use.
CELEBAHQ_256 = ((95.8, 119.2), (159.2, 119.2), (127.5, 158.3), (100.0, 185.3), (155.0, 185.3))


# --------------------------------------------------------------------------------------------- checks


def _as_points(points: Tensor | Sequence, name: str, like: Tensor | None = None) -> Tensor:
    """``points`` as a float tensor ``B×N×2`` (an ``N×2`` input becomes ``1×N×2``)."""
    if not isinstance(points, Tensor):
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
        device = like.device if like is not None else None
        points = torch.as_tensor(points, dtype=dtype, device=device)
    if not points.is_floating_point():
        raise ShapeError(f"{name} must be a float tensor, got {points.dtype}")
    if points.ndim == 2:
        points = points.unsqueeze(0)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ShapeError(f"{name} must be B×N×2 or N×2 (x, y) points, got {tuple(points.shape)}")
    return points


def _check_matrices(matrices: Tensor, name: str = "matrices") -> None:
    if matrices.ndim != 3 or matrices.shape[1:] != (2, 3):
        raise ShapeError(f"{name} must be B×2×3 affine matrices, got {tuple(matrices.shape)}")
    if not matrices.is_floating_point():
        raise ShapeError(f"{name} must be a float tensor, got {matrices.dtype}")


def _check_image(image: Tensor, name: str = "image") -> None:
    if image.ndim != 4:
        raise ShapeError(f"{name} must be B×C×H×W, got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ShapeError(f"{name} must be a float tensor, got {image.dtype}")


def _size2(size: int | Sequence[int], name: str) -> Size2:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ShapeError(f"{name} must be a positive int or (height, width), got {size}")
    return size  # type: ignore[return-value]


def _broadcast_batch(a: Tensor, b: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    """Expand the leading (batch) dimension of ``a`` or ``b`` when it is 1 so both have the same batch."""
    na, nb = a.shape[0], b.shape[0]
    if na == nb:
        return a, b
    if na == 1:
        return a.expand(nb, *a.shape[1:]), b
    if nb == 1:
        return a, b.expand(na, *b.shape[1:])
    raise ShapeError(f"batch sizes of {names[0]} ({na}) and {names[1]} ({nb}) differ and neither is 1")


# ----------------------------------------------------------------------------------- affine algebra


def _to_3x3(matrices: Tensor) -> Tensor:
    bottom = matrices.new_tensor([0.0, 0.0, 1.0]).expand(matrices.shape[0], 1, 3)
    return torch.cat([matrices, bottom], dim=1)


def invert_affine(matrices: Tensor) -> Tensor:
    """Inverse of affine maps ``B×2×3`` (closed-form 2×2 inverse; differentiable). Returns ``B×2×3``."""
    _check_matrices(matrices)
    a, b, tx = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 0, 2]
    c, d, ty = matrices[:, 1, 0], matrices[:, 1, 1], matrices[:, 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    itx = -(ia * tx + ib * ty)
    ity = -(ic * tx + id_ * ty)
    return torch.stack(
        [torch.stack([ia, ib, itx], dim=-1), torch.stack([ic, id_, ity], dim=-1)], dim=1
    )


def compose_affine(first: Tensor, then: Tensor) -> Tensor:
    """The affine map ``p ↦ then(first(p))`` for ``B×2×3`` matrices (batch broadcast from 1). Returns ``B×2×3``."""
    _check_matrices(first, "first")
    _check_matrices(then, "then")
    first, then = _broadcast_batch(first, then, ("first", "then"))
    return then[:, :, :2] @ first + torch.cat([torch.zeros_like(then[:, :, :2]), then[:, :, 2:]], dim=2)


def transform_points(points: Tensor, matrices: Tensor) -> Tensor:
    """Apply affine maps ``B×2×3`` to points ``B×N×2`` (or ``N×2``; batch broadcast from 1). Returns ``B×N×2``."""
    points = _as_points(points, "points")
    _check_matrices(matrices)
    points, matrices = _broadcast_batch(points, matrices, ("points", "matrices"))
    return points @ matrices[:, :, :2].transpose(1, 2) + matrices[:, :, 2].unsqueeze(1)


# ----------------------------------------------------------------------------- similarity estimation


def estimate_similarity(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity transform (rotation, uniform scale, translation; no reflection) src → dst.

    Minimises ``Σ_i ‖dst_i − (c·R·src_i + t)‖²`` over rotations ``R ∈ SO(2)``, scales ``c ≥ 0`` and
    translations ``t``: the problem Umeyama (1991) solves with an SVD. In 2-D, ``c·R`` is multiplication by
    one complex number ``z = c·e^{iθ}``, and the set of all such ``z`` is the whole complex plane, so the
    constrained problem is an ordinary linear least-squares problem with the closed-form solution
    ``z = Σ conj(s'_i)·d'_i / Σ |s'_i|²`` on centred points ``s' = src − mean(src)``, ``d' = dst − mean(dst)``,
    and ``t = mean(dst) − z·mean(src)``. This equals Umeyama's solution (including his reflection
    correction), is exact for noise-free data, and is smooth, so gradients flow to both point sets.

    Args:
        src: ``B×N×2`` or ``N×2`` float points (x, y), N ≥ 2.
        dst: ``B×N×2`` or ``N×2`` float points; a batch of 1 (or ``N×2``) is broadcast against ``src``.

    Returns:
        ``B×2×3`` matrices ``A`` with ``dst ≈ A @ [x, y, 1]`` for each src point, in the promoted dtype of
        ``src`` and ``dst``.

    Raises:
        ShapeError: wrong shapes/dtypes, fewer than 2 points, or all ``src`` points of a batch item coincide.
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst", like=src)
    if src.shape[1] != dst.shape[1]:
        raise ShapeError(f"src and dst need the same number of points, got {src.shape[1]} and {dst.shape[1]}")
    if src.shape[1] < 2:
        raise ShapeError(f"a similarity transform needs at least 2 points, got {src.shape[1]}")
    dtype = torch.promote_types(src.dtype, dst.dtype)
    src, dst = _broadcast_batch(src.to(dtype), dst.to(dtype), ("src", "dst"))

    mu_s = src.mean(dim=1, keepdim=True)
    mu_d = dst.mean(dim=1, keepdim=True)
    s = src - mu_s
    d = dst - mu_d
    var = (s * s).sum(dim=(1, 2))
    # Degenerate only when every src point is the same (up to rounding); then no scale/rotation is defined.
    scale_ref = (src * src).sum(dim=(1, 2)) + 1.0
    if bool((var <= torch.finfo(dtype).eps * scale_ref).any()):
        raise ShapeError("estimate_similarity: all src points coincide, the transform is undefined")
    a = ((s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(dim=1)) / var
    b = ((s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1)) / var
    mx, my = mu_s[:, 0, 0], mu_s[:, 0, 1]
    tx = mu_d[:, 0, 0] - (a * mx - b * my)
    ty = mu_d[:, 0, 1] - (b * mx + a * my)
    return torch.stack([torch.stack([a, -b, tx], dim=-1), torch.stack([b, a, ty], dim=-1)], dim=1)


def crop_transform(landmarks: Tensor | Sequence, template: Tensor | Sequence) -> Tensor:
    """The **image→crop** similarity matrices that map each face's landmarks onto the template.

    Same estimate as InsightFace's ``estimate_norm`` (least-squares similarity from the detected points to
    the template): the returned matrix maps original-photo pixel coordinates to crop pixel coordinates and is
    what :func:`warp_to_crop` and :func:`warp_back` take. ``invert_affine`` of it is the crop→image map.

    Args:
        landmarks: ``B×N×2`` (or ``N×2``) float points in original-image pixels (N = 5 for the usual
            eyes/nose/mouth-corners order of :class:`~faceshield.models.registry.FRModelConfig`).
        template: ``N×2`` (or ``B×N×2``) points in crop pixels, tensor or nested sequence.

    Returns:
        ``B×2×3`` image→crop matrices in the landmarks' dtype.
    """
    landmarks = _as_points(landmarks, "landmarks")
    template = _as_points(template, "template", like=landmarks).to(landmarks)
    return estimate_similarity(landmarks, template)


# ---------------------------------------------------------------------------- pixel ↔ grid_sample


def _normaliser(size: Size2, align_corners: bool, like: Tensor) -> Tensor:
    """3×3 matrix taking pixel (x, y) to grid_sample's normalised (u, v) for an image of ``size`` (H, W)."""
    h, w = size
    if align_corners:
        # u = 2x / (W - 1) - 1; a 1-pixel side maps everything onto its single pixel centre.
        sx, sy = 2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)
        bx = by = -1.0
    else:
        # u = (2x + 1) / W - 1: pixel edges -0.5 and W - 0.5 go to -1 and 1.
        sx, sy = 2.0 / w, 2.0 / h
        bx, by = 1.0 / w - 1.0, 1.0 / h - 1.0
    return like.new_tensor([[sx, 0.0, bx], [0.0, sy, by], [0.0, 0.0, 1.0]])


def pixel_to_grid(matrices: Tensor, in_size: Size2, out_size: Size2, align_corners: bool = False) -> Tensor:
    """Convert pixel-space **sampling** matrices into ``theta`` for :func:`torch.nn.functional.affine_grid`.

    Args:
        matrices: ``B×2×3`` maps from *output* pixel coordinates to the *input* pixel coordinates to read
            (i.e. output→input, the inverse of a forward warp).
        in_size: (H, W) of the image that will be sampled.
        out_size: (H, W) of the output grid.
        align_corners: the flag that will be passed to both ``affine_grid`` and ``grid_sample``.

    Returns:
        ``B×2×3`` ``theta`` in normalised coordinates: ``theta = N_in · A · N_out⁻¹``.
    """
    _check_matrices(matrices)
    in_size, out_size = _size2(in_size, "in_size"), _size2(out_size, "out_size")
    n_in = _normaliser(in_size, align_corners, matrices)
    n_out_inv = torch.linalg.inv(_normaliser(out_size, align_corners, matrices))
    return (n_in @ _to_3x3(matrices) @ n_out_inv)[:, :2]


def grid_to_pixel(theta: Tensor, in_size: Size2, out_size: Size2, align_corners: bool = False) -> Tensor:
    """Inverse of :func:`pixel_to_grid`: ``affine_grid`` ``theta`` ``B×2×3`` → pixel-space output→input matrices."""
    _check_matrices(theta, "theta")
    in_size, out_size = _size2(in_size, "in_size"), _size2(out_size, "out_size")
    n_in_inv = torch.linalg.inv(_normaliser(in_size, align_corners, theta))
    n_out = _normaliser(out_size, align_corners, theta)
    return (n_in_inv @ _to_3x3(theta) @ n_out)[:, :2]


# ---------------------------------------------------------------------------------------- warping


def _sample(
    image: Tensor,
    sampling: Tensor,
    out_size: Size2,
    mode: str,
    padding_mode: str,
    align_corners: bool,
) -> Tensor:
    """Read ``image`` (B×C×H×W) at ``sampling @ [x_out, y_out, 1]`` for every output pixel."""
    theta = pixel_to_grid(sampling.to(image.dtype), image.shape[-2:], out_size, align_corners)
    grid = F.affine_grid(theta, [image.shape[0], image.shape[1], *out_size], align_corners=align_corners)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def warp_affine(
    image: Tensor,
    matrices: Tensor,
    out_size: int | Size2,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> Tensor:
    """Forward affine warp, like ``cv2.warpAffine``: output pixel ``M @ p`` shows input pixel ``p``.

    Args:
        image: ``B×C×H×W`` float (any range); a batch of 1 is broadcast against ``matrices``.
        matrices: ``B×2×3`` input→output pixel maps (batch of 1 broadcast against ``image``).
        out_size: output (H, W), or an int for a square.
        mode: ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"``, as in ``grid_sample``.
        padding_mode: ``"zeros"`` (default; outside the input reads 0), ``"border"`` or ``"reflection"``.
        align_corners: internal ``grid_sample`` convention; see the module docstring.

    Returns:
        ``B×C×out_H×out_W`` in ``image``'s dtype.
    """
    _check_image(image)
    _check_matrices(matrices)
    image, matrices = _broadcast_batch(image, matrices, ("image", "matrices"))
    return _sample(image, invert_affine(matrices), _size2(out_size, "out_size"), mode, padding_mode, align_corners)


def _antialias_sigmas(matrices: Tensor) -> list[float]:
    """Gaussian σ (input pixels) to pre-blur each input by before an image→crop map ``matrices`` shrinks it.

    The map's scale c (crop pixels per image pixel) is ``sqrt(|det|)``; shrinking by ``1/c`` uses the
    σ = (1/c − 1)/2 rule of scikit-image's ``rescale(anti_aliasing=True)``. σ is a plain float (no gradient
    through it): it sets a kernel size.
    """
    linear = matrices.detach()[:, :, :2]
    det = (linear[:, 0, 0] * linear[:, 1, 1] - linear[:, 0, 1] * linear[:, 1, 0]).abs()
    shrink = 1.0 / det.clamp_min(1e-12).sqrt()
    return [max(0.0, (float(f) - 1.0) / 2.0) for f in shrink]


def warp_to_crop(
    image: Tensor,
    matrices: Tensor,
    size: int | Size2,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
    antialias: bool = False,
) -> Tensor:
    """Crops ``B×C×size×size`` of ``image`` through image→crop matrices (e.g. from :func:`crop_transform`).

    Compute the matrices once and call this every optimisation step to avoid re-estimating them.

    Args:
        image: ``B×C×H×W`` float, any range; a batch of 1 is shared by all matrices (several faces in one
            photo: the gradient of every crop flows into the one image).
        matrices: ``B×2×3`` image→crop pixel maps; a batch of 1 is applied to every image.
        size: crop side S (or (H, W)).
        mode, padding_mode, align_corners: as in :func:`warp_affine`. ``padding_mode="zeros"`` (default)
            matches InsightFace's ``cv2.warpAffine`` with a black border.
        antialias: Gaussian pre-blur of the image by σ = (shrink − 1)/2 per face before sampling, where
            ``shrink`` is image pixels per crop pixel. Off by default (reference pipelines sample plain
            bilinear). When a large face is shrunk, plain bilinear sampling reads (and sends gradients to)
            only the few image pixels next to each sample point; with ``antialias=True`` every pixel of the
            face contributes.

    Returns:
        ``B×C×S×S`` crops in ``image``'s dtype, differentiable w.r.t. ``image`` and ``matrices``.
    """
    _check_image(image)
    _check_matrices(matrices)
    out_size = _size2(size, "size")
    image, matrices = _broadcast_batch(image, matrices, ("image", "matrices"))
    sampling = invert_affine(matrices)
    if not antialias:
        return _sample(image, sampling, out_size, mode, padding_mode, align_corners)
    crops = []
    for i, sigma in enumerate(_antialias_sigmas(matrices)):
        item, samp = image[i : i + 1], sampling[i : i + 1]
        if sigma > 0:
            if padding_mode != "reflection":
                # Blur only the part of the photo this crop reads (plus the kernel's reach), not the whole photo.
                item, samp = _crop_to_footprint(item, samp, out_size, margin=int(3.0 * sigma + 0.5) + 2)
            item = gaussian_blur(item, sigma, border="nearest", truncate=3.0)
        crops.append(_sample(item, samp, out_size, mode, padding_mode, align_corners))
    return torch.cat(crops, dim=0)


def _crop_to_footprint(image: Tensor, sampling: Tensor, out_size: Size2, margin: int) -> tuple[Tensor, Tensor]:
    """Slice ``image`` (1×C×H×W) to the bounding box of what ``sampling`` (1×2×3, output→input) reads, grown by
    ``margin`` pixels, and shift ``sampling`` to the slice. Sampling the slice gives the same values as sampling
    the photo for ``"zeros"`` and ``"border"`` padding (not for ``"reflection"``): the slice keeps every photo
    edge the crop reaches past, and cuts elsewhere lie ``margin`` pixels away from every sample."""
    h, w = image.shape[-2:]
    oh, ow = out_size
    corners = sampling.new_tensor([[-0.5, -0.5], [ow - 0.5, -0.5], [-0.5, oh - 0.5], [ow - 0.5, oh - 0.5]])
    pts = transform_points(corners, sampling.detach())[0]
    x0 = min(max(math.floor(float(pts[:, 0].min())) - margin, 0), w - 1)
    x1 = max(min(math.ceil(float(pts[:, 0].max())) + margin, w - 1), x0)
    y0 = min(max(math.floor(float(pts[:, 1].min())) - margin, 0), h - 1)
    y1 = max(min(math.ceil(float(pts[:, 1].max())) + margin, h - 1), y0)
    shift = sampling.new_tensor([[[0.0, 0.0, float(x0)], [0.0, 0.0, float(y0)]]])
    return image[..., y0 : y1 + 1, x0 : x1 + 1], sampling - shift


def align_to_template(
    image: Tensor,
    landmarks: Tensor | Sequence,
    template: Tensor | Sequence,
    size: int,
    padding_mode: str = "zeros",
    align_corners: bool = False,
    mode: str = "bilinear",
    antialias: bool = False,
) -> Tensor:
    """Differentiable aligned face crops: similarity-warp each face so its landmarks land on ``template``.

    Args:
        image: ``B×C×H×W`` float (typically RGB in [0, 1]; any range works).
        landmarks: ``B×N×2`` (or ``N×2``) points in ``image`` pixels, same order as ``template``
            (5 points: image-left eye, image-right eye, nose tip, image-left / image-right mouth corner).
            One image with several faces: image ``1×C×H×W`` and landmarks ``F×N×2`` give F crops; one set of
            landmarks for a batch of images (e.g. perturbed copies of one photo): landmarks ``1×N×2``.
        template: ``N×2`` points in crop pixels (e.g. ``FRModelConfig.template``).
        size: crop side S (``FRModelConfig.input_size``).
        padding_mode: ``"zeros"`` (default, like InsightFace's black border), ``"border"`` or ``"reflection"``.
        align_corners: internal ``grid_sample`` convention; the pixel convention is fixed (module docstring).
        mode: ``grid_sample`` interpolation, ``"bilinear"`` by default.
        antialias: Gaussian pre-blur when the face is shrunk; see :func:`warp_to_crop`.

    Returns:
        ``B×C×S×S`` crops (B = the broadcast batch), differentiable w.r.t. ``image`` and ``landmarks``.
    """
    _check_image(image)
    landmarks = _as_points(landmarks, "landmarks", like=image)
    matrices = crop_transform(landmarks, template)
    return warp_to_crop(image, matrices, size, mode, padding_mode, align_corners, antialias)


def align_for_model(
    image: Tensor,
    landmarks: Tensor | Sequence,
    config: "FRModelConfig",
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Crops for FR model ``config`` and the image→crop matrices used (for :func:`warp_back`).

    Args:
        image, landmarks: as in :func:`align_to_template`.
        config: an :class:`~faceshield.models.registry.FRModelConfig` (its ``template`` and ``input_size``).
        **kwargs: passed to :func:`warp_to_crop` (``padding_mode``, ``antialias``, ...).

    Returns:
        ``(crops B×C×S×S, matrices B×2×3)``.
    """
    _check_image(image)
    landmarks = _as_points(landmarks, "landmarks", like=image)
    matrices = crop_transform(landmarks, config.template)
    crops = warp_to_crop(image, matrices, config.input_size, **kwargs)
    if matrices.shape[0] != crops.shape[0]:
        matrices = matrices.expand(crops.shape[0], 2, 3)
    return crops, matrices


def warp_back(
    crops: Tensor,
    matrices: Tensor,
    image_size: Size2,
    mode: str = "bilinear",
    align_corners: bool = False,
) -> Tensor:
    """Place crops back into original-image coordinates (the inverse of :func:`warp_to_crop`).

    Args:
        crops: ``B×C×S×S`` (or any ``B×C×h×w``) float crops.
        matrices: ``B×2×3`` **image→crop** matrices that produced them (from :func:`crop_transform`).
        image_size: (H, W) of the original image.
        mode, align_corners: as in :func:`warp_affine`.

    Returns:
        ``B×C×H×W``: each image pixel shows the crop at its crop position; 0 outside the crop, with a
        one-pixel bilinear ramp at the crop's edge (``warp_back(ones, ...)`` gives that coverage, to use
        as an alpha, as :func:`faceshield.faces.masks.paste_crops` does).
    """
    _check_image(crops, "crops")
    _check_matrices(matrices)
    crops, matrices = _broadcast_batch(crops, matrices, ("crops", "matrices"))
    # Reading the crop at M @ p for image pixel p: the image→crop matrix *is* the sampling matrix here.
    return _sample(crops, matrices, _size2(image_size, "image_size"), mode, "zeros", align_corners)

