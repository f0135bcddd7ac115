"""EOT transforms: JPEG approximation checked against Pillow's libjpeg on real faces, gradients, blur against
scipy, resize against Pillow, the random sampler's determinism and coverage, shape errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.augment import (
    GaussianBlur,
    JPEGApprox,
    RandomTransforms,
    ResizeRoundtrip,
    TransformSpec,
    gaussian_blur,
    jpeg_approx,
    jpeg_quant_tables,
    resize_roundtrip,
)
from faceshield.errors import ShapeError

N_FACES = 5


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: on a loaded 2-core machine intra-op threading makes them ~40x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]."""
    return 10 * torch.log10(1.0 / ((a - b) ** 2).mean(dim=(1, 2, 3)))


def _to_tensor(arrs) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).double() / 255.0


def _pil_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2)  # 2 = 4:2:0
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def faces(shared_data) -> list[np.ndarray]:
    """Five real 256×256 aligned faces, uint8 RGB."""
    return [np.array(Image.open(PAIRS / "train" / f"{i}.png").convert("RGB")) for i in pair_ids(N_FACES)]


@pytest.fixture(scope="module")
def faces_t(faces) -> torch.Tensor:
    return _to_tensor(faces)


# ------------------------------------------------------------------------------------------------ JPEG


def test_quant_tables_follow_libjpeg_scaling():
    # Quality 50 is the unscaled Annex K table, 100 all ones, 75 halves it (rounded), low quality clamps at 255.
    y50, c50 = jpeg_quant_tables(50)
    assert y50[0, 0, 0] == 16 and y50[0, 7, 7] == 99 and c50[0, 0, 0] == 17 and c50[0, 7, 7] == 99
    y100, c100 = jpeg_quant_tables(100)
    assert (y100 == 1).all() and (c100 == 1).all()
    y75, _ = jpeg_quant_tables(75)
    assert y75[0, 0, 0] == 8 and y75[0, 0, 1] == 6  # floor((16*50+50)/100), floor((11*50+50)/100)
    y1, _ = jpeg_quant_tables(1)
    assert y1.max() == 255 and y1[0, 0, 0] == 255
    y30, _ = jpeg_quant_tables(30)
    assert y30[0, 0, 0] == (16 * (5000 // 30) + 50) // 100


@pytest.mark.parametrize("quality", [50, 75, 95])
@pytest.mark.parametrize("rounding", ["cubic", "ste"])
def test_jpeg_matches_pillow(faces, faces_t, quality, rounding):
    pil = _to_tensor([_pil_jpeg(f, quality) for f in faces])
    ours = jpeg_approx(faces_t, quality, rounding=rounding)
    assert ours.shape == faces_t.shape and ours.dtype == faces_t.dtype
    psnr = _psnr(ours, pil)
    mae = (ours - pil).abs().mean().item() * 255
    # Measured 45-48 dB mean (MAE ≈ 0.8-1.0/255). What remains is libjpeg's integer (islow) DCT and the 8-bit
    # rounding of its Y/Cb/Cr planes and output, which flip coefficients near a rounding boundary, plus the
    # cubic surrogate's ≤ 1/8-step residual. 40 dB (RMS ≈ 2.5/255) leaves ~5 dB margin for other photos and
    # libjpeg builds, and still fails for gross modelling errors (wrong tables, colour matrix, missing
    # subsampling); the finer choice of chroma upsampling (nearest: ~2 dB worse) is not pinned by this bound.
    assert psnr.mean() > 40.0, f"PSNR(ours, Pillow) = {psnr.tolist()}"
    assert psnr.min() > 38.0, f"PSNR(ours, Pillow) = {psnr.tolist()}"
    assert mae < 1.5, f"MAE = {mae:.3f}/255"

    # It really compresses: the distortion against the input is Pillow's. Exact rounding ("ste") should give
    # the same PSNR to a fraction of a dB; the cubic surrogate leaves part of each rounding residual (error
    # d - d³ instead of d), which in theory removes ~1.4 dB of quantisation noise for uniform residuals.
    gap = (_psnr(ours, faces_t) - _psnr(pil, faces_t)).mean().item()
    if rounding == "ste":
        assert abs(gap) < 0.5, f"PSNR(ours, in) - PSNR(Pillow, in) = {gap:.2f} dB"
    else:
        assert 0.0 < gap < 1.5, f"PSNR(ours, in) - PSNR(Pillow, in) = {gap:.2f} dB"
    assert _psnr(ours, faces_t).mean() < 46.0  # not the identity: quality 95 JPEG is ~42 dB from the input


def test_jpeg_odd_size_and_per_image_quality(faces, faces_t):
    # Non-multiple-of-16 size: replicate-padded to whole MCUs and cropped back, as libjpeg pads; still close
    # to Pillow (measured ~49 dB).
    crop = np.ascontiguousarray(faces[0][:83, :57])
    x = _to_tensor([crop])
    ours = jpeg_approx(x, 75)
    assert ours.shape == x.shape
    assert _psnr(ours, _to_tensor([_pil_jpeg(crop, 75)])).item() > 38.0
    # A (B,) quality tensor equals separate calls.
    x2 = faces_t[:2, :, :64, :64]
    both = jpeg_approx(x2, torch.tensor([50.0, 90.0]))
    torch.testing.assert_close(both[0:1], jpeg_approx(x2[0:1], 50))
    torch.testing.assert_close(both[1:2], jpeg_approx(x2[1:2], 90))


def test_jpeg_gradcheck():
    g = torch.Generator().manual_seed(0)
    # Mid-grey range keeps the output clamp inactive (its kink is not differentiable).
    x = (0.3 + 0.4 * torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: jpeg_approx(t, 60), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("rounding", ["cubic", "ste"])
def test_jpeg_gradient_nonzero_and_finite(faces_t, rounding):
    x = faces_t[:1].float().clone().requires_grad_()
    out = jpeg_approx(x, 75, rounding=rounding)
    target = torch.rand_like(out, generator=torch.Generator().manual_seed(1))
    ((out - target) ** 2).mean().backward()
    grad = x.grad
    assert torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.9, "gradient must reach almost every pixel"
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- resize


def test_resize_roundtrip_shape_and_effect(faces_t):
    x = faces_t[:2]
    for scale in (0.5, 0.73, 0.01):
        y = resize_roundtrip(x, scale)
        assert y.shape == x.shape
        assert (y >= 0).all() and (y <= 1).all()
    assert resize_roundtrip(x, 1.0) is x
    assert resize_roundtrip(x[:, :, :40, :30], 0.5, mode="bicubic").shape == (2, 3, 40, 30)
    # Antialiased: 1-pixel stripes at scale 1/3 are averaged by the widened triangle filter to 4/9 or 5/9
    # (point sampling would alias them to pure 0/1 stripes); the outer 3 pixels see renormalised edge taps.
    stripes = (torch.arange(36) % 2).double().expand(1, 3, 36, 36)
    dev = (resize_roundtrip(stripes, 1 / 3) - 0.5).abs()[..., 3:-3, 3:-3]
    assert dev.max() <= 1 / 18 + 1e-9 and dev.max() > 0.05


def test_resize_roundtrip_matches_pillow(faces, faces_t):
    # Pillow's BILINEAR is the same triangle filter (widened by the scale when downsampling) with half-pixel
    # centres; the difference is Pillow's 8-bit intermediate and output rounding.
    ours = resize_roundtrip(faces_t, 0.5)
    pil = []
    for f in faces:
        small = Image.fromarray(f).resize((128, 128), Image.Resampling.BILINEAR)
        pil.append(np.array(small.resize((256, 256), Image.Resampling.BILINEAR)))
    psnr = _psnr(ours, _to_tensor(pil))
    assert psnr.min() > 50.0, psnr.tolist()  # measured 53-54 dB


def test_resize_gradcheck():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = (0.2 + 0.6 * x).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: resize_roundtrip(t, 0.6), (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda t: resize_roundtrip(t, 0.5, "bicubic"), (x,), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------ blur


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3])
def test_blur_matches_scipy_mirror(faces_t, sigma):
    ndimage = pytest.importorskip("scipy.ndimage")
    x = faces_t[:2, :, 100:164, 90:170]
    ours = gaussian_blur(x, sigma)
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror")
    assert np.abs(ours.numpy() - ref).max() < 1e-5
    # scipy's "reflect" repeats the edge sample: same interior, different borders.
    refl = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="reflect")
    r = int(4 * sigma + 0.5)
    assert np.abs(ours.numpy() - refl)[..., r:-r, r:-r].max() < 1e-5
    assert np.abs(ours.numpy() - refl).max() > 1e-4


def test_blur_with_replicated_borders_matches_scipy_nearest():
    ndimage = pytest.importorskip("scipy.ndimage")
    img = torch.rand(2, 3, 31, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for sigma in (0.7, 2.0, 4.3):
        ours = gaussian_blur(img, sigma, border="nearest", truncate=3.0)
        ref = ndimage.gaussian_filter(img.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    with pytest.raises(ValueError, match="border"):
        gaussian_blur(img, 1.0, border="wrap")


def test_blur_kernel_larger_than_image_and_explicit_size():
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 5, 7, generator=g, dtype=torch.float64)
    # radius 12 > H, W: the mirror padding folds repeatedly (F.pad(mode="reflect") would refuse).
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 3.0, 3.0), mode="mirror")
    assert np.abs(gaussian_blur(x, 3.0).numpy() - ref).max() < 1e-5
    # kernel_size 5 at sigma 2 is radius 2, i.e. scipy's truncate = 1.
    ref5 = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 2.0, 2.0), mode="mirror", truncate=1.0)
    assert np.abs(gaussian_blur(x, 2.0, kernel_size=5).numpy() - ref5).max() < 1e-5
    assert gaussian_blur(x, 0.0) is x
    assert GaussianBlur(1.0)(x).shape == x.shape


def test_blur_gradcheck():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 1.0), (x,), eps=1e-6, atol=1e-5)
    small = x[:, :, :6, :6].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 2.5), (small,), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------- EOT


def test_random_transforms_deterministic_with_seed(faces_t):
    x = faces_t[:1, :, :64, :64].expand(8, -1, -1, -1).float()
    a, b = RandomTransforms(seed=7), RandomTransforms(seed=7)
    ya, yb = a(x), b(x)
    assert a.last_specs == b.last_specs
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    # A second call continues the stream (new draws), identically for both.
    first = a.last_specs
    ya2, yb2 = a(x), b(x)
    torch.testing.assert_close(ya2, yb2, rtol=0, atol=0)
    assert a.last_specs == b.last_specs and a.last_specs != first
    # An explicit generator overrides the module's own and is reproducible too.
    c = RandomTransforms()
    yc = c(x, generator=torch.Generator().manual_seed(11))
    yd = c(x, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(yc, yd, rtol=0, atol=0)
    assert RandomTransforms(seed=8).sample(8) != RandomTransforms(seed=7).sample(8)


def test_random_transforms_cover_all_branches_within_ranges():
    t = RandomTransforms(jpeg_quality=(50, 95), resize_scale=(0.5, 1.0), blur_sigma=(0.0, 1.0), seed=0)
    specs = t.sample(400)
    kinds = [s.kind for s in specs]
    counts = {k: kinds.count(k) for k in ("identity", "jpeg", "resize", "blur")}
    # p_identity 0.25, the rest split evenly: expected 100 each (±~9 std), bounds at about ±4 std.
    assert all(60 < c < 140 for c in counts.values()), counts
    qs = [s.param for s in specs if s.kind == "jpeg"]
    assert all(50 <= q <= 95 and q == int(q) for q in qs) and min(qs) <= 55 and max(qs) >= 90
    assert all(0.5 <= s.param <= 1.0 for s in specs if s.kind == "resize")
    assert all(0.0 <= s.param <= 1.0 for s in specs if s.kind == "blur")
    # Disabled transforms are never drawn; p_identity = 1 is always identity.
    only_blur = RandomTransforms(jpeg_quality=None, resize_scale=None, p_identity=0.0, seed=0).sample(50)
    assert {s.kind for s in only_blur} == {"blur"}
    assert {s.kind for s in RandomTransforms(p_identity=1.0, seed=0).sample(50)} == {"identity"}


def test_random_transforms_apply_each_branch_and_backprop(faces_t):
    x = faces_t[:4, :, :48, :48].float().clone().requires_grad_()
    specs = [TransformSpec("identity"), TransformSpec("jpeg", 70.0), TransformSpec("resize", 0.6),
             TransformSpec("blur", 0.8)]
    t = RandomTransforms()
    y = t.apply(x, specs)
    xd = x.detach()
    torch.testing.assert_close(y[0], xd[0])
    torch.testing.assert_close(y[1:2], JPEGApprox(70.0)(xd[1:2]))
    torch.testing.assert_close(y[2:3], ResizeRoundtrip(0.6)(xd[2:3]))
    torch.testing.assert_close(y[3:4], gaussian_blur(xd[3:4], 0.8))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


# ----------------------------------------------------------------------------------------------- errors


def test_shape_and_argument_errors():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ShapeError):
        jpeg_approx(torch.rand(3, 16, 16), 75)
    with pytest.raises(ShapeError):
        jpeg_approx(torch.rand(1, 1, 16, 16), 75)
    with pytest.raises(ShapeError):
        jpeg_approx((x * 255).to(torch.uint8), 75)
    with pytest.raises(ShapeError):
        jpeg_approx(x, 0)
    with pytest.raises(ShapeError):
        jpeg_approx(x, torch.tensor([50.0, 60.0]))
    with pytest.raises(ValueError):
        jpeg_approx(x, 75, rounding="floor")
    with pytest.raises(ShapeError):
        resize_roundtrip(torch.rand(16, 16), 0.5)
    with pytest.raises(ValueError):
        resize_roundtrip(x, 1.5)
    with pytest.raises(ShapeError):
        gaussian_blur(torch.rand(2, 1, 3, 16, 16), 1.0)
    with pytest.raises(ValueError):
        gaussian_blur(x, 1.0, kernel_size=4)
    with pytest.raises(ShapeError):
        RandomTransforms(seed=0)(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError):
        RandomTransforms(jpeg_quality=(95, 50))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transforms_run_on_cuda_like_cpu(faces_t):
    x = faces_t[:2, :, :64, :64]
    xc = x.cuda()
    torch.testing.assert_close(jpeg_approx(xc, 80).cpu(), jpeg_approx(x, 80), rtol=0, atol=1e-9)
    torch.testing.assert_close(gaussian_blur(xc, 1.3).cpu(), gaussian_blur(x, 1.3), rtol=0, atol=1e-9)
    torch.testing.assert_close(resize_roundtrip(xc, 0.7).cpu(), resize_roundtrip(x, 0.7), rtol=0, atol=1e-9)
    y = RandomTransforms(seed=0)(xc.float())
    assert y.device == xc.device and y.shape == x.shape
