"""PSNR / SSIM against scikit-image and BRISQUE against OpenCV contrib, on real CelebA-HQ photos."""

import hashlib
import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import PAIRS, pair_ids
from faceshield.errors import ShapeError
from faceshield.eval import quality
from faceshield.eval.quality import brisque, brisque_features, load_brisque_model, psnr, ssim

N_PHOTOS = 3


def _jpeg(rgb: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(buf).convert("RGB"))


def _noisy(rgb: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian noise of ``sigma`` 8-bit levels, rounded and clipped to uint8."""
    noise = np.random.default_rng(seed).standard_normal(rgb.shape) * sigma
    return np.clip(rgb + noise, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photos(shared_data) -> list[np.ndarray]:
    return [np.asarray(Image.open(PAIRS / "train" / f"{i}.png").convert("RGB")) for i in pair_ids(N_PHOTOS)]


@pytest.fixture(scope="module")
def distorted(photos) -> list[tuple[str, np.ndarray]]:
    """Clean, noisy, blurred and JPEG q=20 versions of each photo: 4 × N_PHOTOS uint8 RGB images."""
    out = []
    for k, rgb in enumerate(photos):
        out += [
            (f"{k}-clean", rgb),
            (f"{k}-noise", _noisy(rgb, 15.0, seed=k)),
            (f"{k}-blur", np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(2)))),
            (f"{k}-jpeg20", _jpeg(rgb, 20)),
        ]
    return out


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


# --- PSNR / SSIM ----------------------------------------------------------------------------------------------


def test_psnr_ssim_match_skimage(photos):
    skm = pytest.importorskip("skimage.metrics")
    clean, dist = [], []
    for k, rgb in enumerate(photos):
        for other in (_noisy(rgb, 12.0, seed=k), _jpeg(rgb, 20)):
            clean.append(rgb)
            dist.append(other)
    a, b = _batch(clean), _batch(dist)
    ours_s, ours_p = ssim(a, b), psnr(a, b)
    assert ours_s.shape == ours_p.shape == (len(clean),)
    # skimage in float64 on exactly the float32 values we were given.
    x = a.permute(0, 2, 3, 1).double().numpy()
    y = b.permute(0, 2, 3, 1).double().numpy()
    ref_s = [skm.structural_similarity(u, v, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=1, channel_axis=-1) for u, v in zip(x, y)]
    ref_p = [skm.peak_signal_noise_ratio(u, v, data_range=1) for u, v in zip(x, y)]
    ds = np.abs(ours_s.numpy() - np.array(ref_s)).max()
    dp = np.abs(ours_p.numpy() - np.array(ref_p)).max()
    logging.getLogger(__name__).info("SSIM max abs diff %.2e, PSNR max abs diff %.2e dB", ds, dp)
    assert ds <= 1e-4, f"SSIM differs from skimage by {ds}"
    assert dp <= 1e-3, f"PSNR differs from skimage by {dp} dB"
    # The distortions are real: SSIM well below 1, PSNR finite.
    assert (ours_s < 0.95).all() and torch.isfinite(ours_p).all()

    # Grayscale B×1×H×W, with a non-square crop, in float64 (agreement to rounding).
    ga, gb = a[:2, :1, :200, :131].double(), b[:2, :1, :200, :131].double()
    ref_g = [skm.structural_similarity(u[0].numpy(), v[0].numpy(), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1) for u, v in zip(ga, gb)]
    assert np.abs(ssim(ga, gb).numpy() - np.array(ref_g)).max() <= 1e-12


def test_identical_images(photos):
    a = _batch(photos[:2])
    assert torch.isinf(psnr(a, a)).all() and (psnr(a, a) > 0).all()
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-6)
    # data_range scales consistently: the same images on a 0–255 scale give the same values.
    b = _batch([_jpeg(p, 30) for p in photos[:2]])
    assert torch.allclose(psnr(a * 255, b * 255, data_range=255.0), psnr(a, b), atol=1e-4)
    assert torch.allclose(ssim(a * 255, b * 255, data_range=255.0), ssim(a, b), atol=1e-5)


def test_ssim_psnr_gradcheck():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 12, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.rand(1, 3, 12, 13, dtype=torch.float64, generator=gen)
    # ~1000 tiny forward passes: on a loaded 2-core machine intra-op threading makes each one ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.autograd.gradcheck(lambda x: ssim(x, b), (a,))
        assert torch.autograd.gradcheck(lambda x: psnr(x, b), (a,))
    finally:
        torch.set_num_threads(threads)


def test_shape_errors():
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ShapeError, match="differ in shape"):
        ssim(x, x[:1])
    with pytest.raises(ShapeError, match="B×3×H×W"):
        psnr(x[0], x[0])
    with pytest.raises(ShapeError, match="B×3×H×W"):
        ssim(x[:, :2], x[:, :2])
    with pytest.raises(ShapeError, match="float"):
        psnr((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
    with pytest.raises(ShapeError, match="at least 11"):
        ssim(x[..., :10], x[..., :10])
    with pytest.raises(ShapeError, match="batch of 2"):
        brisque(x)
    with pytest.raises(ShapeError):
        brisque(np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(ShapeError, match="16×16"):
        brisque(np.zeros((12, 40, 3), np.uint8))
    with pytest.raises(ShapeError, match="dtype"):
        brisque(np.zeros((32, 32, 3), np.int16))


# --- BRISQUE --------------------------------------------------------------------------------------------------


def test_brisque_model_files():
    # The vendored OpenCV files, unchanged (sha256 of opencv-data 4.6.0's /usr/share/opencv4/quality/*).
    for path, sha in ((quality.BRISQUE_MODEL, "4c44c7eec9e5139830c0bb0e4a044c9cd351ba5bbc9e3798beca3243e2782ff4"),
                      (quality.BRISQUE_RANGE, "a18427f4f7ad087524bd0d63389649a3899b51ca6d44a4d5f8d8171f1f914a9c")):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, path
    model = load_brisque_model()
    assert model.support_vectors.shape == (774, 36) and model.alpha.shape == (774,)
    assert model.gamma == pytest.approx(0.05) and model.rho == pytest.approx(-149.63506109127357)
    assert model.feature_min.shape == model.feature_max.shape == (36,)
    assert (model.feature_max > model.feature_min).all()


def test_brisque_matches_opencv(distorted):
    cv2 = pytest.importorskip("cv2", reason="OpenCV not installed (pip install opencv-contrib-python-headless)")
    if not hasattr(cv2, "quality"):
        pytest.skip("cv2.quality missing: OpenCV's contrib build (opencv-contrib-python-headless) is needed")
    if int(cv2.__version__.split(".")[0]) < 5:
        pytest.skip(f"OpenCV {cv2.__version__}: we follow OpenCV 5's gray conversion (2^-15 fixed point; 4 used 2^-14)")
    # Our gray conversion is OpenCV's, on every one of a random set of colours.
    colours = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(quality._to_gray(colours), cv2.cvtColor(colours[..., ::-1].copy(), cv2.COLOR_BGR2GRAY))

    # In flat areas the score hinges on float32 rounding (module docstring); we reproduce OpenCV's x86-64
    # AVX2/FMA arithmetic. Where this OpenCV build rounds otherwise (another SIMD path), only images without
    # flat areas (noisy ones) can be held to the tight tolerance.
    gray = quality._to_gray(distorted[0][1]).astype(np.float32) * np.float32(1 / 255)
    ref_blur = cv2.GaussianBlur(gray, (7, 7), 7 / 6, 0, borderType=cv2.BORDER_REPLICATE)
    same_blur = np.array_equal(quality._blur7(gray), ref_blur)
    flats = [np.full((32, 32), v, np.float32) for v in np.arange(256, dtype=np.float32) * np.float32(1 / 255)]
    same_resize = all(
        quality._resize_cubic(f, 16, 16)[8, 8] == cv2.resize(f, (16, 16), interpolation=cv2.INTER_CUBIC)[8, 8]
        for f in flats
    )
    if not (same_blur and same_resize):
        logging.getLogger(__name__).warning("this OpenCV build rounds differently from the emulated x86-64 "
                                            "AVX2/FMA path; comparing BRISQUE on noisy images only")

    model, rng = str(quality.BRISQUE_MODEL), str(quality.BRISQUE_RANGE)
    # Add an odd-sized crop: the half-size image then has a non-integer scale and an odd width.
    images = distorted + [("crop", distorted[0][1][3:250, 5:244])]
    if not (same_blur and same_resize):
        images = [(name, rgb) for name, rgb in images if name.endswith("noise")]
    diffs, fdiffs = {}, {}
    for name, rgb in images:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        ref = cv2.quality.QualityBRISQUE_compute(bgr, model, rng)[0]
        ref_f = cv2.quality.QualityBRISQUE_computeFeatures(bgr).ravel().astype(np.float64)
        diffs[name] = abs(brisque(rgb) - ref)
        feats = brisque_features(rgb)
        fdiffs[name] = float((np.abs(feats - ref_f) / np.maximum(np.abs(ref_f), 1e-3)).max())
    worst = max(diffs, key=diffs.get)
    logging.getLogger(__name__).info("BRISQUE max abs diff %.4f (%s); features max rel diff %.1e",
                                     diffs[worst], worst, max(fdiffs.values()))
    # Measured ≤ 0.003 (OpenCV's SVR runs in float32, ours in float64). In flat areas (JPEG blocks, saturated
    # background) the score hinges on float32 rounding; a different OpenCV SIMD path moves it by points there.
    assert diffs[worst] <= 0.05, f"BRISQUE differs from OpenCV by {diffs[worst]:.4f} on {worst}: {diffs}"
    assert max(fdiffs.values()) <= 1e-2, fdiffs


def test_brisque_grows_with_noise(photos):
    for k, rgb in enumerate(photos):
        clean = brisque(rgb)
        scores = [brisque(_noisy(rgb, s, seed=k)) for s in (10.0, 20.0, 40.0)]
        # Visible noise (σ ≥ 10 levels) makes it strictly worse, and σ ≥ 20 worse than the clean photo.
        # (Very mild noise can *lower* BRISQUE on these smooth, upsampled CelebA-HQ faces, so σ < 10 is not used.)
        assert scores[0] < scores[1] < scores[2], (k, clean, scores)
        assert clean < scores[1], (k, clean, scores)
        assert 0.0 <= clean <= 100.0 and scores[2] > 40.0


def test_brisque_distortions_score_worse(distorted):
    scores = {name: brisque(rgb) for name, rgb in distorted}
    for k in range(N_PHOTOS):
        for dist in ("noise", "blur", "jpeg20"):
            assert scores[f"{k}-{dist}"] > scores[f"{k}-clean"] + 5.0, scores


def test_brisque_input_forms(photos):
    rgb = photos[0][:100, :90]  # also a non-square size
    expected = brisque(rgb)
    as_float = rgb.astype(np.float32) / 255.0
    tensor = torch.from_numpy(as_float).permute(2, 0, 1)
    assert brisque(as_float) == expected
    assert brisque(tensor) == expected
    assert brisque(tensor[None]) == expected
    gray = quality._to_gray(rgb)
    assert brisque(gray) == expected
    assert brisque(gray[:, :, None]) == expected
    assert brisque(torch.from_numpy(gray.astype(np.float32) / 255.0)[None, None]) == expected


def test_brisque_flat_image_is_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="faceshield.eval.quality"):
        score = brisque(np.full((64, 64, 3), 128, np.uint8))
    assert math.isnan(score)
    assert "flat image" in caplog.text
