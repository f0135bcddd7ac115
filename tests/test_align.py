"""Similarity alignment to FR templates: estimation, pixel conventions, round trips, gradients."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from faceshield.errors import ShapeError
from faceshield.faces.align import (
    align_for_model,
    align_to_template,
    compose_affine,
    crop_transform,
    estimate_similarity,
    grid_to_pixel,
    invert_affine,
    pixel_to_grid,
    transform_points,
    warp_affine,
    warp_back,
    warp_to_crop,
)
from faceshield.models.registry import ARCFACE_112, FRModelConfig

TEMPLATE = torch.tensor(ARCFACE_112, dtype=torch.float64)
# 5 landmarks of celebahq-pairs/test/1.png (eye centres = mean of the dlib 68-point eye contours, nose tip
# point 30, mouth corners 48 and 54), measured once with dlib's shape predictor.
FACE1_LANDMARKS = [[95.8, 120.7], [160.2, 121.0], [135.0, 151.0], [101.0, 187.0], [156.0, 189.0]]


def random_similarity(batch: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    scale = 0.5 + 2.0 * torch.rand(batch, generator=generator, dtype=dtype)
    angle = (torch.rand(batch, generator=generator, dtype=dtype) - 0.5) * 2 * math.pi
    shift = torch.randn(batch, 2, generator=generator, dtype=dtype) * 50
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    return torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], dim=1
    )


def smooth_image(h: int, w: int, channels: int = 3, dtype=torch.float32) -> torch.Tensor:
    """Low-frequency test pattern in [0, 1] (periods ≥ 40 px), so bilinear resampling is nearly exact."""
    y = torch.arange(h, dtype=torch.float64).view(h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, w)
    chans = [
        0.5 + 0.25 * torch.sin(2 * math.pi * (x / (47 + 9 * c) + y / (61 - 7 * c)) + c)
        + 0.2 * torch.cos(2 * math.pi * (x / 83 - y / (53 + 5 * c)))
        for c in range(channels)
    ]
    return torch.stack(chans).unsqueeze(0).to(dtype)


def sk_similarity(skt, src: np.ndarray, dst: np.ndarray):
    """scikit-image's least-squares similarity (``from_estimate`` since 0.26, ``estimate`` before)."""
    if hasattr(skt.SimilarityTransform, "from_estimate"):
        return skt.SimilarityTransform.from_estimate(src, dst)
    tform = skt.SimilarityTransform()
    assert tform.estimate(src, dst)
    return tform


@pytest.fixture(scope="module")
def face_photo(shared_data) -> torch.Tensor:
    rgb = np.asarray(Image.open(shared_data / "celebahq-pairs" / "test" / "1.png").convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0


# ------------------------------------------------------------------------------ estimate_similarity


def test_estimate_similarity_recovers_random_similarity_exactly():
    g = torch.Generator().manual_seed(0)
    truth = random_similarity(16, g)
    src = torch.rand(16, 5, 2, generator=g, dtype=torch.float64) * 200
    dst = transform_points(src, truth)
    est = estimate_similarity(src, dst)
    assert est.shape == (16, 2, 3)
    torch.testing.assert_close(est, truth, atol=1e-9, rtol=0)
    # Float32 as used in practice: exact to rounding.
    est32 = estimate_similarity(src.float(), dst.float())
    assert est32.dtype == torch.float32
    torch.testing.assert_close(est32.double(), truth, atol=1e-4, rtol=1e-5)
    assert (transform_points(src.float(), est32) - dst.float()).abs().max() < 1e-3


def test_estimate_similarity_matches_umeyama_on_noisy_points_and_never_reflects():
    skt = pytest.importorskip("skimage.transform")
    g = torch.Generator().manual_seed(1)
    for mirror in (False, True):
        src = torch.randn(5, 2, generator=g, dtype=torch.float64) * 30 + 100
        dst = torch.randn(5, 2, generator=g, dtype=torch.float64) * 30 + 50
        if mirror:  # a reflected point set: the best proper similarity, not a reflection
            dst = dst * torch.tensor([-1.0, 1.0], dtype=torch.float64)
        ours = estimate_similarity(src, dst)[0]
        ref = sk_similarity(skt, src.numpy(), dst.numpy())  # scikit-image implements Umeyama's SVD method
        np.testing.assert_allclose(ours.numpy(), ref.params[:2], atol=1e-10)
        assert torch.linalg.det(ours[:, :2]) > 0


def test_estimate_similarity_broadcasts_template():
    g = torch.Generator().manual_seed(2)
    src = torch.rand(3, 5, 2, generator=g, dtype=torch.float64) * 100
    est = estimate_similarity(src, TEMPLATE)
    for i in range(3):
        torch.testing.assert_close(est[i], estimate_similarity(src[i], TEMPLATE)[0])


@pytest.mark.parametrize(
    "src, dst",
    [
        (torch.zeros(5, 3), torch.zeros(5, 3)),  # not 2-D points
        (torch.rand(2, 5, 2), torch.rand(3, 5, 2)),  # batch mismatch
        (torch.rand(5, 2), torch.rand(4, 2)),  # point count mismatch
        (torch.rand(1, 2), torch.rand(1, 2)),  # one point
        (torch.rand(2, 2, 5, 2), torch.rand(2, 2, 5, 2)),  # too many dims
        (torch.ones(5, 2, dtype=torch.int64), torch.ones(5, 2, dtype=torch.int64)),  # not float
        (torch.ones(5, 2), torch.rand(5, 2)),  # all source points coincide
    ],
)
def test_estimate_similarity_rejects_bad_input(src, dst):
    with pytest.raises(ShapeError):
        estimate_similarity(src, dst)


def test_affine_helpers_invert_and_compose():
    m = random_similarity(4, torch.Generator().manual_seed(3))
    ident = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64).expand(4, 2, 3)
    torch.testing.assert_close(compose_affine(m, invert_affine(m)), ident, atol=1e-12, rtol=0)
    p = torch.rand(4, 7, 2, dtype=torch.float64) * 50
    twice = compose_affine(m, m)
    torch.testing.assert_close(transform_points(p, twice), transform_points(transform_points(p, m), m))
    with pytest.raises(ShapeError):
        invert_affine(torch.zeros(4, 3, 3))


# ------------------------------------------------------------------------------- pixel conventions


@pytest.mark.parametrize("align_corners", [False, True])
def test_pixel_to_grid_round_trip_and_identity_sampling(align_corners):
    m = random_similarity(3, torch.Generator().manual_seed(4))
    theta = pixel_to_grid(m, (40, 50), (20, 30), align_corners)
    torch.testing.assert_close(grid_to_pixel(theta, (40, 50), (20, 30), align_corners), m)
    # The identity pixel map must reproduce the image exactly: pixel centres land on pixel centres.
    img = torch.rand(1, 2, 9, 13, dtype=torch.float64)
    eye = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    torch.testing.assert_close(warp_affine(img, eye, (9, 13), align_corners=align_corners), img)


def test_identity_and_integer_shift_alignment_are_exact():
    img = torch.rand(1, 3, 112, 112, dtype=torch.float64)
    crop = align_to_template(img, TEMPLATE, TEMPLATE, 112)
    torch.testing.assert_close(crop, img, atol=1e-10, rtol=0)
    # Face 7 px right and 3 px down in the photo: the crop is the photo shifted back by whole pixels.
    shifted = align_to_template(img, TEMPLATE + torch.tensor([7.0, 3.0], dtype=torch.float64), TEMPLATE, 100)
    torch.testing.assert_close(shifted, img[:, :, 3:103, 7:107], atol=1e-10, rtol=0)


def test_align_corners_flag_does_not_change_pixel_result():
    img = smooth_image(90, 120, dtype=torch.float64)  # float32 agrees to ~1e-5 (grid rounding at the border)
    lm = transform_points(TEMPLATE, torch.tensor([[[0.6, -0.2, 20.0], [0.2, 0.6, 10.0]]], dtype=torch.float64))
    for padding in ("zeros", "border"):
        a = align_to_template(img, lm, TEMPLATE, 112, padding_mode=padding, align_corners=False)
        b = align_to_template(img, lm, TEMPLATE, 112, padding_mode=padding, align_corners=True)
        assert (a - b).abs().max() < 1e-10


def test_matches_scikit_image_warp_on_real_face(face_photo):
    skt = pytest.importorskip("skimage.transform")
    tform = sk_similarity(skt, np.array(FACE1_LANDMARKS), np.array(ARCFACE_112))
    photo = face_photo[0].permute(1, 2, 0).double().numpy()
    ref = skt.warp(photo, tform.inverse, output_shape=(112, 112), order=1, mode="constant", cval=0.0)
    # float64 agrees to rounding; float32 to the precision of a float32 sampling grid (~1e-5 px).
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 5e-5)):
        crop = align_to_template(face_photo.to(dtype), FACE1_LANDMARKS, ARCFACE_112, 112)
        assert crop.shape == (1, 3, 112, 112) and crop.dtype == dtype
        diff = np.abs(crop[0].permute(1, 2, 0).double().numpy() - ref).max()
        assert diff < tol, (dtype, diff)


# --------------------------------------------------------------------------------- geometry checks


def test_dots_drawn_at_transformed_template_land_on_template():
    """Draw 5 Gaussian dots at a known similarity image of the template; aligning puts them back on it."""
    s, angle, t = 1.7, math.radians(23.0), (45.0, 70.0)
    crop_to_image = torch.tensor(
        [[[s * math.cos(angle), -s * math.sin(angle), t[0]], [s * math.sin(angle), s * math.cos(angle), t[1]]]],
        dtype=torch.float64,
    )
    dots = transform_points(TEMPLATE, crop_to_image)[0]  # non-integer positions in a 300×200 photo
    sigma = 1.5 * s
    ys = torch.arange(300, dtype=torch.float64).view(300, 1)
    xs = torch.arange(200, dtype=torch.float64).view(1, 200)
    img = sum(torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in dots.tolist())
    img = img.float().view(1, 1, 300, 200)

    m = crop_transform(dots, TEMPLATE)
    torch.testing.assert_close(m, invert_affine(crop_to_image), atol=1e-9, rtol=0)
    crop = align_to_template(img, dots, TEMPLATE, 112)[0, 0].double()
    for x, y in TEMPLATE.tolist():
        cx, cy = round(x), round(y)
        win = crop[cy - 6 : cy + 7, cx - 6 : cx + 7]
        gy, gx = torch.meshgrid(
            torch.arange(cy - 6, cy + 7, dtype=torch.float64),
            torch.arange(cx - 6, cx + 7, dtype=torch.float64),
            indexing="ij",
        )
        found = ((win * gx).sum() / win.sum(), (win * gy).sum() / win.sum())
        assert math.hypot(found[0] - x, found[1] - y) < 0.5, (found, (x, y))


def test_round_trip_on_smooth_image():
    img = smooth_image(160, 180)
    lm = transform_points(TEMPLATE, torch.tensor([[[1.1, 0.15, 30.0], [-0.15, 1.1, 25.0]]], dtype=torch.float64))
    crop, m = align_for_model(img, lm, FRModelConfig(
        name="test-112", embedding_dim=8, input_size=112, template=ARCFACE_112, mean=(0.5,) * 3,
        std=(0.5,) * 3, channel_order="RGB", assets=(), licence="-", source="-", reference="-",
    ))
    assert crop.shape == (1, 3, 112, 112) and m.shape == (1, 2, 3)
    back = warp_back(crop, m, (160, 180))
    coverage = warp_back(torch.ones_like(crop[:, :1]), m, (160, 180))
    inside = (coverage > 1 - 1e-6).expand_as(img)
    assert inside.float().mean() > 0.3  # the crop covers a real part of the photo
    err = (back - img).abs()[inside]
    assert err.max() < 5e-3, err.max()
    # Far outside the crop the pasted-back image is exactly zero.
    assert (back[(coverage == 0).expand_as(back)] == 0).all() and (coverage == 0).any()


def test_round_trip_on_real_face(face_photo):
    m = crop_transform(FACE1_LANDMARKS, TEMPLATE * 2)  # 224 crop: ~1.1× the photo's scale
    crop = warp_to_crop(face_photo, m, 224)
    back = warp_back(crop, m, (256, 256))
    coverage = warp_back(torch.ones_like(crop[:, :1]), m, (256, 256))
    inside = (coverage > 1 - 1e-6).expand_as(face_photo)
    err = (back - face_photo).abs()[inside]
    # Two bilinear resamplings of a detailed photo: small mean error, no gross misplacement.
    assert err.mean() < 0.01, err.mean()
    assert err.max() < 0.25, err.max()


# ----------------------------------------------------------------------------------------- gradients


def test_gradient_reaches_photo_only_where_the_crop_reads():
    g = torch.Generator().manual_seed(6)
    img = torch.rand(1, 3, 96, 96, generator=g, dtype=torch.float64, requires_grad=True)
    # Crop zooms in by ~1.6×: the face occupies ~70 photo pixels, every one of them is read.
    lm = transform_points(TEMPLATE, torch.tensor([[[0.62, 0.0, 20.0], [0.0, 0.62, 15.0]]], dtype=torch.float64))
    crop = align_to_template(img, lm, TEMPLATE, 112)
    weights = torch.rand(crop.shape, generator=g, dtype=torch.float64) + 0.5
    (crop * weights).sum().backward()
    grad = img.grad.abs().sum(1)[0]

    m = crop_transform(lm, TEMPLATE)
    scale = float(torch.linalg.vector_norm(m[0, :, 0]))
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    in_crop = transform_points(torch.stack([xs, ys], -1).view(-1, 2).double(), m)[0].view(96, 96, 2)
    # A photo pixel is read only if it is within one photo pixel of a sample point inside the crop.
    reachable = ((in_crop > -0.5 - scale) & (in_crop < 111.5 + scale)).all(-1)
    interior = ((in_crop > scale) & (in_crop < 111 - scale)).all(-1)
    assert (grad[~reachable] == 0).all()
    assert (grad[interior] > 0).all()
    assert (~reachable).sum() > 1000 and interior.sum() > 3000


def test_gradcheck_wrt_image_and_landmarks():
    g = torch.Generator().manual_seed(7)
    img = torch.rand(1, 2, 11, 13, generator=g, dtype=torch.float64, requires_grad=True)
    small = TEMPLATE * (6 / 112)
    lm = (small * 1.3 + torch.tensor([1.7, 1.3], dtype=torch.float64)) + 0.2 * torch.rand(
        5, 2, generator=g, dtype=torch.float64
    )
    lm = lm.unsqueeze(0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda im, p: align_to_template(im, p, small, 6), (img, lm))
    assert torch.autograd.gradcheck(
        lambda im: align_to_template(im, lm.detach(), small, 6, padding_mode="border"), (img,)
    )


# ------------------------------------------------------------------------------- batching & faces


def test_several_faces_in_one_photo():
    img = smooth_image(120, 160, dtype=torch.float64).requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    faces = torch.stack(
        [transform_points(TEMPLATE, torch.tensor([[[0.4, 0.05, 10.0 + 50 * i], [-0.05, 0.4, 20.0 + 25 * i]]],
                                                 dtype=torch.float64))[0] for i in range(3)]
    ) + 0.3 * torch.rand(3, 5, 2, generator=g, dtype=torch.float64)
    crops = align_to_template(img, faces, TEMPLATE, 56)
    assert crops.shape == (3, 3, 56, 56)
    grad_all = torch.autograd.grad(crops.sum(), img)[0]
    grad_sum = torch.zeros_like(img)
    for i in range(3):
        single = align_to_template(img, faces[i], TEMPLATE, 56)
        torch.testing.assert_close(crops[i : i + 1], single)
        grad_sum += torch.autograd.grad(single.sum(), img)[0]
    torch.testing.assert_close(grad_all, grad_sum)

    # One set of landmarks for a batch of photos (e.g. perturbed copies of one photo).
    batch = torch.cat([img.detach(), 1 - img.detach()])
    crops2 = align_to_template(batch, faces[0], TEMPLATE, 56)
    torch.testing.assert_close(crops2[1], 1 - crops[0].detach(), atol=1e-12, rtol=0)
    with pytest.raises(ShapeError):
        align_to_template(batch, faces, TEMPLATE, 56)  # 2 photos vs 3 faces
    with pytest.raises(ShapeError):
        align_to_template(img[0], faces, TEMPLATE, 56)  # not B×C×H×W
    with pytest.raises(ShapeError):
        align_to_template(img, faces[:, :4], TEMPLATE, 56)  # 4 landmarks vs 5 template points


def test_antialias_removes_aliasing_and_spreads_gradient():
    ys, xs = torch.meshgrid(torch.arange(400), torch.arange(400), indexing="ij")
    checker = ((xs + ys) % 2).float().view(1, 1, 400, 400).requires_grad_(True)
    # The face spans ~3 photo pixels per crop pixel.
    lm = transform_points(TEMPLATE, torch.tensor([[[3.0, 0.2, 20.0], [-0.2, 3.0, 40.0]]], dtype=torch.float64))
    plain = align_to_template(checker, lm, TEMPLATE, 112)
    smooth = align_to_template(checker, lm, TEMPLATE, 112, antialias=True)
    centre = (slice(None), slice(None), slice(20, 92), slice(20, 92))
    assert plain[centre].std() > 0.1  # bilinear sampling of a 1-px checkerboard aliases
    assert smooth[centre].std() < 0.02 and abs(smooth[centre].mean() - 0.5) < 0.02

    g_plain = torch.autograd.grad(plain[centre].sum(), checker)[0][0, 0]
    g_smooth = torch.autograd.grad(smooth[centre].sum(), checker)[0][0, 0]
    region = (slice(150, 250), slice(150, 250))  # photo pixels well inside the face
    assert (g_smooth[region] > 0).all()
    assert (g_plain[region] > 0).float().mean() < 0.6


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_antialias_equals_blurring_the_whole_photo(padding_mode):
    from faceshield.augment import gaussian_blur

    img = torch.rand(1, 2, 150, 170, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    # Two faces shrunk ~2.5× and ~1.8×; the second hangs over the photo's right and bottom edges.
    m = crop_transform(
        torch.cat([
            transform_points(TEMPLATE, torch.tensor([[[0.9, 0.2, 10.0], [-0.2, 0.9, 5.0]]], dtype=torch.float64)),
            transform_points(TEMPLATE, torch.tensor([[[0.55, 0.0, 120.0], [0.0, 0.55, 110.0]]], dtype=torch.float64)),
        ]),
        TEMPLATE * (40 / 112),
    )
    crops = warp_to_crop(img, m, 40, padding_mode=padding_mode, antialias=True)
    for i in range(2):
        shrink = 1 / float(torch.linalg.vector_norm(m[i, :, 0]))
        ref = warp_to_crop(gaussian_blur(img, (shrink - 1) / 2, border="nearest", truncate=3.0), m[i : i + 1], 40, padding_mode=padding_mode)
        torch.testing.assert_close(crops[i : i + 1], ref, atol=1e-12, rtol=0)
