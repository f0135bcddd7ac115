"""Image-quality metrics for the evaluation harness: PSNR, SSIM (full-reference) and BRISQUE (no-reference).

All three run offline; BRISQUE's trained model ships with the package.

* :func:`psnr` and :func:`ssim` take ``B×C×H×W`` float tensors (C = 3 RGB or 1 gray, values in
  ``[0, data_range]``), return one value per image (``Tensor[B]``) and are differentiable, so a protector
  may use ``1 - ssim`` as a loss.
* :func:`brisque` scores one photo, 0 (best) to 100 (worst); :func:`brisque_features` gives its 36 features.

SSIM (Wang et al. 2004): Gaussian window σ = 1.5, 11 taps, K1 = 0.01, K2 = 0.03, population (co)variances,
computed per channel and averaged. The SSIM map is averaged over the *valid* part of the image only, i.e.
without the 5-pixel strip along each border whose window would leave the image. This is exactly what
scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
does: it filters with reflected borders and then crops ``(win_size - 1) // 2 = 5`` pixels per side before
averaging, so its padded border values never enter the mean and a valid (unpadded) convolution gives the
same number.

BRISQUE (Mittal, Moorthy and Bovik 2012) follows OpenCV contrib's ``cv::quality::QualityBRISQUE``, whose
LIVE-R2 model we use, with its conventions:

* colour → gray with OpenCV 5's 8-bit ``COLOR_BGR2GRAY`` (fixed-point weights 9798/19235/3735 over 2^15
  for R/G/B, rounded), then ``gray * (1/255)`` in float32; float inputs are first rounded to 8 bits, as the
  photo would be saved;
* two scales: the image and a half-size copy (``floor(W/2)×floor(H/2)``) made with OpenCV's bicubic
  resize (``INTER_CUBIC``: Keys a = -0.75, pixel centres aligned, clamped borders, no anti-aliasing);
* MSCN coefficients ``(I - μ) / (σ + 1/255)``, μ and E[I²] from a 7×7 Gaussian window σ = 7/6 with
  replicated borders, σ = sqrt(E[I²] - μ²); where that difference rounds below 0, OpenCV's square root
  gives NaN and the pixel is counted on neither side of the fit, like a 0 (we store 0);
* an asymmetric generalised Gaussian (AGGD) fit by moment matching, the shape found by a grid search from
  0.2 in steps of 0.001 that stops at the first local minimum; on the MSCN map it gives (shape,
  (σ_l² + σ_r²)/2), on the four pairwise products (H, V, main and anti-diagonal neighbours, the shifted
  map zero-filled outside the image, zeros counted in the moments) it gives (shape, mean, σ_l², σ_r²):
  18 features per scale, 36 in all;
* features scaled to [-1, 1] with ``brisque_range_live.yml`` (row 0 minima, row 1 maxima), then an ε-SVR
  with RBF kernel from ``brisque_model_live.yml``: ``Σ α_i exp(-γ‖x - s_i‖²) - ρ``, clamped to [0, 100].

Why the features are computed in float32 with OpenCV's operation order (fused multiply-adds included): in
flat areas (JPEG q=20 blocks, saturated backgrounds) the exact MSCN value is 0 and what the reference
computes there is float32 rounding noise, each pixel landing at 0, NaN (excluded) or ±1e-5 (counted on one
side of the AGGD fit). Those counts move σ_l, σ_r and the score by points: a float64 version of the same
maths differed from OpenCV by up to 7.0 on JPEG q=20 faces, and OpenCV itself moves by up to 3.3 between
its SIMD and plain code paths (``cv2.setUseOptimized(False)``). To agree with the reference (whose LIVE
model was trained with OpenCV's own trainer on these features) we reproduce its x86-64 AVX2/FMA arithmetic:
the blur is bit-exact, the resize bit-exact on constant areas (~1% of other pixels differ by 1 ulp, which
does not matter there).

Model files: ``faceshield/data/brisque_model_live.yml`` (567 815 bytes, sha256 4c44c7ee…2782ff4) and
``brisque_range_live.yml`` (1 356 bytes, sha256 a18427f4…1f914a9c) are OpenCV contrib's
``modules/quality/samples`` files, unchanged, as shipped in Debian's ``opencv-data`` 4.6.0+dfsg-12
(``/usr/share/opencv4/quality/``); licence Apache-2.0 AND BSD-3-Clause (OpenCV; the model was trained by
OpenCV on LIVE-R2 following the BRISQUE software release of UT Austin's LIVE lab, whose notice asks
publications to cite Mittal et al.).

Validation (tests/test_quality.py, on CelebA-HQ photos from shared/data/celebahq-pairs, clean and with
Gaussian noise, Gaussian blur and JPEG q=20):

* SSIM vs ``skimage.metrics.structural_similarity`` (float64): max abs diff 4e-6 for float32 input,
  3e-15 for float64; asserted ≤ 1e-4.
* PSNR vs ``skimage.metrics.peak_signal_noise_ratio``: max abs diff 2e-6 dB (float32); asserted ≤ 1e-3 dB.
* BRISQUE vs ``cv2.quality.QualityBRISQUE_compute`` (opencv-contrib-python-headless 5.0.0.93, x86-64 with
  AVX2/FMA) on 13 images: max abs diff 0.0024 on the 0–100 scale (features: max relative diff 1.4e-4);
  asserted ≤ 0.05. What remains is the SVR, which OpenCV evaluates in float32 and we in float64. Over 30
  images (6 faces × clean, noise, blur, JPEG q=20, odd-sized crop) the largest difference was 0.009.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from faceshield.errors import FaceshieldError, ShapeError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
BRISQUE_MODEL = DATA_DIR / "brisque_model_live.yml"
BRISQUE_RANGE = DATA_DIR / "brisque_range_live.yml"

# SSIM constants of Wang et al. 2004.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * 1.5 + 0.5): 11 taps, as scikit-image and the paper
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# ------------------------------------------------------------------------------------------------------------
# Full-reference metrics (differentiable)
# ------------------------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor, min_side: int = 1) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ShapeError(f"expected two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise ShapeError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ShapeError(f"expected B×3×H×W or B×1×H×W, got {tuple(a.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ShapeError(f"expected float images, got {a.dtype} and {b.dtype}")
    if min(a.shape[2], a.shape[3]) < min_side:
        raise ShapeError(f"images must be at least {min_side}×{min_side} pixels, got {a.shape[3]}×{a.shape[2]}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image.

    Args:
        a, b: ``B×C×H×W`` float (C = 3 or 1), values in ``[0, data_range]``.
        data_range: the peak value (1.0 for [0, 1] images, 255 for 8-bit values).

    Returns:
        ``Tensor[B]``: ``10·log10(data_range² / MSE)``, MSE over channels and pixels; ``inf`` for identical
        images. Differentiable wherever the images differ.
    """
    _check_pair(a, b)
    mse = (a - b).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * x.square() / SSIM_SIGMA**2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), one value per image.

    Gaussian window σ = 1.5 (11 taps), K1 = 0.01, K2 = 0.03, population covariances; the SSIM map of each
    channel is averaged over the valid region (5-pixel border strip left out, as scikit-image does), then
    the channels are averaged.

    Args:
        a, b: ``B×C×H×W`` float (C = 3 or 1), values in ``[0, data_range]``, H and W ≥ 11.
        data_range: the dynamic range of the values (1.0 for [0, 1] images).

    Returns:
        ``Tensor[B]`` in [-1, 1], 1 for identical images. Differentiable.
    """
    _check_pair(a, b, min_side=2 * SSIM_RADIUS + 1)
    batch, channels = a.shape[:2]
    g = _gaussian_window(a.dtype, a.device)
    # One grouped, separable, valid convolution filters the five maps of every channel at once.
    maps = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    groups = maps.shape[1]
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    mu_a, mu_b, e_aa, e_bb, e_ab = maps.split(channels, dim=1)
    var_a = e_aa - mu_a.square()
    var_b = e_bb - mu_b.square()
    cov = e_ab - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return s.mean(dim=(2, 3)).mean(dim=1).reshape(batch)


# ------------------------------------------------------------------------------------------------------------
# BRISQUE (no-reference)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrisqueModel:
    """The ε-SVR of BRISQUE and its feature scaling.

    Attributes:
        support_vectors: ``N×36`` (features already scaled to [-1, 1]).
        alpha: ``N`` dual coefficients.
        rho: bias; the prediction is ``Σ α_i K(x, s_i) - rho``.
        gamma: RBF kernel parameter, ``K(x, s) = exp(-gamma·‖x - s‖²)``.
        feature_min, feature_max: ``36`` each, the range each raw feature is mapped from onto [-1, 1].
    """

    support_vectors: np.ndarray
    alpha: np.ndarray
    rho: float
    gamma: float
    feature_min: np.ndarray
    feature_max: np.ndarray

    def predict(self, features: np.ndarray) -> float:
        """Score of one raw 36-feature vector, clamped to [0, 100]."""
        x = -1.0 + 2.0 * (features - self.feature_min) / (self.feature_max - self.feature_min)
        k = np.exp(-self.gamma * np.square(self.support_vectors - x).sum(axis=1))
        score = float(k @ self.alpha - self.rho)
        return min(max(score, 0.0), 100.0)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _yml_scalar(text: str, key: str, path: Path) -> str:
    match = re.search(rf"^\s*{key}:\s*(\S+)\s*$", text, re.MULTILINE)
    if match is None:
        raise FaceshieldError(f"{path}: no '{key}' in this OpenCV model file")
    return match.group(1)


def _yml_numbers(text: str, start: str, end: str | None, path: Path) -> np.ndarray:
    i = text.find(start)
    if i < 0:
        raise FaceshieldError(f"{path}: no '{start}' in this OpenCV model file")
    j = text.find(end, i) if end else len(text)
    return np.array(_NUMBER.findall(text[i + len(start) : j]), dtype=np.float64)


@functools.lru_cache(maxsize=4)
def load_brisque_model(model_path: str | Path = BRISQUE_MODEL, range_path: str | Path = BRISQUE_RANGE) -> BrisqueModel:
    """Read OpenCV's BRISQUE files (``cv::ml::SVM`` YAML and the ``range`` matrix YAML).

    Only what an RBF ε-SVR with one decision function needs is read; anything else is refused.
    """
    model_path, range_path = Path(model_path), Path(range_path)
    text = model_path.read_text()
    svm_type = _yml_scalar(text, "svmType", model_path)
    kernel = re.search(r"kernel:\s*\n\s*type:\s*(\S+)\s*\n\s*gamma:\s*(\S+)", text)
    if svm_type != "EPS_SVR" or kernel is None or kernel.group(1) != "RBF":
        raise FaceshieldError(f"{model_path}: expected an EPS_SVR with RBF kernel, got {svm_type}")
    var_count = int(_yml_scalar(text, "var_count", model_path))
    sv_total = int(_yml_scalar(text, "sv_total", model_path))
    if text.count("sv_count:") != 1:
        raise FaceshieldError(f"{model_path}: expected one decision function")
    svs = _yml_numbers(text, "support_vectors:", "decision_functions:", model_path)
    if svs.size != sv_total * var_count:
        raise FaceshieldError(f"{model_path}: {svs.size} support-vector values, expected {sv_total}×{var_count}")
    svs = svs.reshape(sv_total, var_count)
    df = text[text.find("decision_functions:") :]
    sv_count = int(_yml_scalar(df, "sv_count", model_path))
    alpha = _yml_numbers(df, "alpha:", "]", model_path)
    if "index:" in df:  # an SVM may keep a subset of its vectors per decision function
        index = _yml_numbers(df, "index:", "]", model_path).astype(np.int64)
        svs = svs[index]
    if alpha.size != sv_count or svs.shape[0] != sv_count:
        raise FaceshieldError(f"{model_path}: {alpha.size} coefficients for {svs.shape[0]} support vectors")

    rtext = range_path.read_text()
    rows, cols = int(_yml_scalar(rtext, "rows", range_path)), int(_yml_scalar(rtext, "cols", range_path))
    rng = _yml_numbers(rtext, "data:", "]", range_path)
    if (rows, cols) != (2, var_count) or rng.size != rows * cols:
        raise FaceshieldError(f"{range_path}: expected a 2×{var_count} range matrix, got {rows}×{cols}")
    rng = rng.reshape(2, var_count)
    return BrisqueModel(
        support_vectors=svs,
        alpha=alpha,
        rho=float(_yml_scalar(df, "rho", model_path)),
        gamma=float(kernel.group(2)),
        feature_min=rng[0],
        feature_max=rng[1],
    )


def _to_gray(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Any accepted input → H×W uint8 gray, by OpenCV's 8-bit BGR2GRAY conversion."""
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ShapeError(f"brisque scores one image; got a batch of {t.shape[0]} (loop over it)")
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ShapeError(f"expected 3×H×W or 1×H×W (optionally with a batch of 1), got {tuple(image.shape)}")
        image = t.permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ShapeError(f"expected H×W×3 RGB or H×W gray, got shape {arr.shape}")
    if min(arr.shape[:2]) < 16:
        raise ShapeError(f"BRISQUE needs an image of at least 16×16 pixels, got {arr.shape[1]}×{arr.shape[0]}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ShapeError(f"expected uint8 or float in [0, 1], got dtype {arr.dtype}")
        # Round to 8 bits like a saved photo: BRISQUE's model and OpenCV's conversion are defined on 8-bit values.
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim == 2:
        return arr
    rgb = arr.astype(np.int64)
    # OpenCV 5's fixed-point BGR2GRAY for 8-bit images: 0.299, 0.587, 0.114 in units of 2^-15, rounded
    # (equal to cv2.cvtColor on all 2^24 colours; OpenCV 4 used 2^-14 units, ±1 level on ~0.3% of colours).
    return ((rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + (1 << 14)) >> 15).astype(np.uint8)


# The feature pipeline runs in float32 with OpenCV's operation order, fused multiply-adds included (see the
# module docstring: in flat areas the MSCN values are rounding noise whose signs the reference's arithmetic
# decides, and they move the score by several points).
_F32 = np.float32


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray) -> np.ndarray:
    """float32 ``a*b + c`` as an FMA instruction computes it: the float32 product is exact in float64, so only
    the sum is rounded (via float64, which differs from a single rounding only in rare double-rounding ties)."""
    return (a.astype(np.float64) * np.float64(b) + c).astype(_F32)


@functools.lru_cache(maxsize=1)
def _gaussian7() -> np.ndarray:
    """7-tap Gaussian, σ = 7/6, computed in float64 and stored as float32 like cv::getGaussianKernel."""
    x = np.arange(-3, 4, dtype=np.float64)
    g = np.exp(-0.5 * x**2 / (7.0 / 6.0) ** 2)
    return (g / g.sum()).astype(_F32)


def _blur7(img: np.ndarray) -> np.ndarray:
    """cv::GaussianBlur 7×7, σ = 7/6, BORDER_REPLICATE on float32: row pass tap by tap, column pass on
    symmetric pairs from the centre out, each step fused."""
    k = _gaussian7()
    h, w = img.shape
    p = np.pad(img, ((0, 0), (3, 3)), mode="edge")
    rows = (p[:, 0:w] * k[0]).astype(_F32)
    for j in range(1, 7):
        rows = _fma(p[:, j : j + w], k[j], rows)
    q = np.pad(rows, ((3, 3), (0, 0)), mode="edge")
    out = (q[3 : 3 + h] * k[3]).astype(_F32)
    for j in (1, 2, 3):
        out = _fma((q[3 - j : 3 - j + h] + q[3 + j : 3 + j + h]).astype(_F32), k[3 + j], out)
    return out


def _cubic_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (dst×4, clamped) and float32 Keys weights (a = -0.75) of OpenCV's INTER_CUBIC along one axis."""
    pos = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(_F32)  # pixel centres aligned
    base = np.floor(pos)
    t = (pos - base).astype(_F32)
    a, one = _F32(-0.75), _F32(1.0)
    w0 = ((a * (t + one) - _F32(5) * a) * (t + one) + _F32(8) * a) * (t + one) - _F32(4) * a
    w1 = ((a + _F32(2)) * t - (a + _F32(3))) * t * t + one
    w2 = ((a + _F32(2)) * (one - t) - (a + _F32(3))) * (one - t) * (one - t) + one
    weights = np.stack([w0, w1, w2, one - w0 - w1 - w2], axis=1).astype(_F32)
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, src - 1)
    return index, weights


def _resize_cubic(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv::resize INTER_CUBIC on float32 (no anti-aliasing): horizontal pass, then vertical pass."""
    index, w = _cubic_taps(img.shape[1], width)
    s = [img[:, index[:, k]] * w[:, k] for k in range(4)]
    rows = ((s[0] + s[1]).astype(_F32) + (s[2] + s[3]).astype(_F32)).astype(_F32)
    index, w = _cubic_taps(img.shape[0], height)
    s = [rows[index[:, k]] for k in range(4)]
    w = w[:, :, None]
    top = _fma(s[0], w[:, 0], (s[1] * w[:, 1]).astype(_F32))
    bottom = _fma(s[2], w[:, 2], (s[3] * w[:, 3]).astype(_F32))
    return (top + bottom).astype(_F32)


def _mscn(img: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a float32 image in [0, 1]."""
    mu = _blur7(img)
    var = (_blur7((img * img).astype(_F32)) - (mu * mu).astype(_F32)).astype(_F32)
    with np.errstate(invalid="ignore"):
        sigma = (np.sqrt(var) + _F32(1.0 / 255.0)).astype(_F32)
    mscn = ((img - mu).astype(_F32) / sigma).astype(_F32)
    # In flat areas E[I²] - μ² can round below 0; the reference's square root then yields NaN, which its fit
    # counts on neither side, exactly as a 0 is counted.
    mscn[~(var >= 0)] = 0.0
    return mscn


@functools.lru_cache(maxsize=1)
def _gamma_table() -> tuple[np.ndarray, np.ndarray]:
    """The shape grid 0.2, 0.201, … (< 10) of the AGGD search and ρ(γ) = Γ(2/γ)² / (Γ(1/γ) Γ(3/γ)) on it."""
    grid = []
    gam = 0.2
    while gam < 10:  # accumulated like the reference's loop, so the grid points are the same floats
        grid.append(gam)
        gam += 0.001
    g = np.array(grid)
    lg = np.vectorize(math.lgamma)
    return g, np.exp(2 * lg(2 / g) - lg(1 / g) - lg(3 / g))


def _aggd_fit(x: np.ndarray) -> tuple[float, float, float]:
    """Moment-matching AGGD fit: (shape γ, left σ_l, right σ_r); zeros count in the moments but in neither side."""
    x = x.astype(np.float64).ravel()
    pos = x[x > 0]
    neg = x[x < 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan, math.nan, math.nan
    pos_sq, neg_sq = float(np.square(pos).sum()), float(np.square(neg).sum())
    sigma_l = math.sqrt(neg_sq / neg.size)
    sigma_r = math.sqrt(pos_sq / pos.size)
    g_hat = sigma_l / sigma_r
    r_hat = ((float(pos.sum()) - float(neg.sum())) / x.size) ** 2 / ((pos_sq + neg_sq) / x.size)
    r_norm = r_hat * (g_hat**3 + 1) * (g_hat + 1) / (g_hat**2 + 1) ** 2
    grid, rho = _gamma_table()
    diff = np.abs(rho - r_norm)
    # The reference walks the grid upward and stops as soon as the mismatch grows: the first local minimum.
    rising = np.flatnonzero(diff[1:] > diff[:-1])
    best = int(rising[0]) if rising.size else grid.size - 1
    return float(grid[best]), sigma_l, sigma_r


# Neighbour offsets (row, column) of the pairwise products: horizontal, vertical, main and anti-diagonal.
_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))


def _shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[i, j] = x[i + dy, j + dx]``, zero where that falls outside the image."""
    out = np.zeros_like(x)
    h, w = x.shape
    dst = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
    out[dst] = x[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]
    return out


def _scale_features(img: np.ndarray) -> list[float]:
    mscn = _mscn(img)
    gam, sl, sr = _aggd_fit(mscn)
    feats = [gam, (sl * sl + sr * sr) / 2]
    for dy, dx in _SHIFTS:
        gam, sl, sr = _aggd_fit((mscn * _shifted(mscn, dy, dx)).astype(_F32))
        mean = (sr - sl) * math.exp(math.lgamma(2 / gam) - 0.5 * (math.lgamma(1 / gam) + math.lgamma(3 / gam)))
        feats += [gam, mean, sl * sl, sr * sr]
    return feats


def brisque_features(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """The 36 BRISQUE features of one photo (18 at full size, 18 at half size), in OpenCV's order.

    Args:
        image: ``H×W×3`` RGB or ``H×W`` gray numpy array, uint8 or float in [0, 1]; or a torch tensor
            ``3×H×W`` / ``1×H×W`` / ``1×C×H×W`` float in [0, 1]. At least 16×16 pixels.

    Returns:
        float64 array of 36 values; NaN where the image is flat (no spread to fit).
    """
    gray = (_to_gray(image).astype(_F32) * _F32(1.0 / 255.0)).astype(_F32)
    half = _resize_cubic(gray, gray.shape[0] // 2, gray.shape[1] // 2)
    return np.array(_scale_features(gray) + _scale_features(half))


def brisque(
    image: np.ndarray | torch.Tensor,
    model_path: str | Path = BRISQUE_MODEL,
    range_path: str | Path = BRISQUE_RANGE,
) -> float:
    """BRISQUE no-reference quality score of one photo: 0 (best) to 100 (worst), OpenCV's LIVE-R2 model.

    Args:
        image: ``H×W×3`` RGB or ``H×W`` gray numpy array, uint8 or float in [0, 1]; or a torch tensor
            ``3×H×W`` / ``1×H×W`` / ``1×C×H×W`` float in [0, 1]. Floats are rounded to 8 bits first.
        model_path, range_path: OpenCV BRISQUE model and range files (default: the LIVE-R2 pair shipped
            in ``faceshield/data``).

    Returns:
        The score, clamped to [0, 100]; NaN (with a warning) for a flat image, where BRISQUE is undefined.
    """
    features = brisque_features(image)
    if not np.isfinite(features).all():
        log.warning("BRISQUE is undefined on a flat image (no local contrast); returning NaN")
        return math.nan
    return load_brisque_model(str(model_path), str(range_path)).predict(features)
