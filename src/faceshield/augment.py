"""Differentiable image transforms for expectation over transformation (EOT).

The adversarial protector optimises a perturbation through these transforms so that it survives what
happens to a photo once shared: JPEG re-compression, downscaling and blur. Every function takes and returns
``B×C×H×W`` float RGB in ``[0, 1]`` (JPEG needs ``C == 3``), works on any device and dtype, and is
differentiable with respect to the image.

* :func:`jpeg_approx` follows baseline JPEG as libjpeg (and so Pillow) does it: JFIF YCbCr, 4:2:0 chroma,
  8×8 DCT, IJG tables scaled by quality, with rounding replaced by a smooth surrogate.
* :func:`resize_roundtrip` downsamples (antialiased) and upsamples back to the original size.
* :func:`gaussian_blur` is a separable Gaussian, mirror ("reflect" in PyTorch) or replicated borders.
* :class:`RandomTransforms` draws one of identity / JPEG / resize / blur per image, with random parameters.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceshield.errors import ShapeError

log = logging.getLogger(__name__)

__all__ = [
    "luma",
    "jpeg_approx",
    "jpeg_quant_tables",
    "resize_roundtrip",
    "gaussian_blur",
    "JPEGApprox",
    "ResizeRoundtrip",
    "GaussianBlur",
    "TransformSpec",
    "RandomTransforms",
]

# ITU-T T.81 Annex K tables K.1 (luminance) and K.2 (chrominance), in natural (row-major) order; libjpeg's
# jpeg_set_quality scales exactly these.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)

# JFIF (full-range BT.601) colour conversion on 0..255 values; offsets of 128 on Cb/Cr.
_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168735892, -0.331264108, 0.5),
    (0.5, -0.418687589, -0.081312411),
)
_YCBCR_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136286, -0.714136286),
    (1.0, 1.772, 0.0),
)

_ROUNDINGS = ("cubic", "ste")
_RESIZE_MODES = ("bilinear", "bicubic")


def _check_image(x: Tensor, name: str = "x", channels: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ShapeError(f"{name} must be B×C×H×W, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ShapeError(f"{name} must have {channels} channels (RGB), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ShapeError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def luma(x: Tensor) -> Tensor:
    """``B×3×H×W`` RGB in [0, 1] → ``B×1×H×W`` ITU-R BT.601 luma (JPEG's Y; Pillow's ``convert("L")``)."""
    _check_image(x, channels=3)
    r, g, b = _RGB_TO_YCBCR[0]
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


# --------------------------------------------------------------------------------------------------- JPEG


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal 8-point DCT-II matrix ``D`` (``D @ D.T == I``); JPEG's 2-D FDCT of a block ``b`` is
    ``D @ b @ D.T`` (T.81 A.3.3: the ``1/4 C(u) C(v)`` factors are exactly the orthonormal scaling)."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * 0.5
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


def _quality_tensor(quality: float | Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    q = torch.as_tensor(quality, dtype=dtype, device=device).detach()
    if q.dim() == 0:
        q = q.expand(batch)
    elif q.dim() != 1 or q.shape[0] not in (1, batch):
        raise ShapeError(f"quality must be a scalar or a ({batch},) tensor, got shape {tuple(q.shape)}")
    else:
        q = q.expand(batch)
    if not bool(torch.all((q >= 1) & (q <= 100))):
        raise ShapeError(f"quality must lie in [1, 100], got {q.tolist()}")
    return q


def jpeg_quant_tables(quality: float | Tensor) -> tuple[Tensor, Tensor]:
    """Luminance and chrominance quantisation tables for a JPEG ``quality``, as libjpeg builds them.

    libjpeg's ``jpeg_quality_scaling``: ``scale = 5000 / q`` (integer division) for ``q < 50``, else
    ``200 - 2 q``; each entry is ``floor((base * scale + 50) / 100)`` clamped to ``[1, 255]`` (baseline).

    Args:
        quality: scalar or ``(B,)`` tensor in ``[1, 100]``; non-integer values use the same formula.

    Returns:
        ``(luma, chroma)``, each ``B×8×8`` float64 (``B = 1`` for a scalar quality).
    """
    q = torch.as_tensor(quality, dtype=torch.float64).detach().reshape(-1)
    if q.numel() == 0 or not bool(torch.all((q >= 1) & (q <= 100))):
        raise ShapeError(f"quality must lie in [1, 100], got {q.tolist()}")
    return _quant_tables(q)


def _quant_tables(q: Tensor) -> tuple[Tensor, Tensor]:
    scale = torch.where(q < 50, torch.floor(5000.0 / q), 200.0 - 2.0 * q)[:, None, None]
    base_y = torch.tensor(_LUMA_TABLE, dtype=q.dtype, device=q.device)
    base_c = torch.tensor(_CHROMA_TABLE, dtype=q.dtype, device=q.device)
    qy = torch.floor((base_y * scale + 50.0) / 100.0).clamp(1.0, 255.0)
    qc = torch.floor((base_c * scale + 50.0) / 100.0).clamp(1.0, 255.0)
    return qy, qc


def _round_cubic(x: Tensor) -> Tensor:
    # Shin & Song 2017: exact rounding plus a cubic residual, so the value stays within 1/8 of round(x)
    # while the derivative 3 (x - round(x))^2 is non-zero away from integers.
    r = torch.round(x).detach()
    return r + (x - r) ** 3


def _round_ste(x: Tensor) -> Tensor:
    # Straight-through (BPDA): exact rounding forward, identity gradient backward.
    return x + (torch.round(x) - x).detach()


def _blockify(c: Tensor) -> Tensor:
    """``B×H×W`` (H, W multiples of 8) → ``B×(H/8)×(W/8)×8×8``."""
    b, h, w = c.shape
    return c.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _unblockify(blocks: Tensor) -> Tensor:
    b, nh, nw, _, _ = blocks.shape
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, nh * 8, nw * 8)


def _jpeg_channel(c: Tensor, table: Tensor, dct: Tensor, rounding) -> Tensor:
    """Level shift, DCT, quantise by ``table`` (``B×8×8``), dequantise, inverse DCT of a ``B×H×W`` plane."""
    blocks = _blockify(c - 128.0)
    coef = dct @ blocks @ dct.T
    t = table[:, None, None]
    coef = rounding(coef / t) * t
    return _unblockify(dct.T @ coef @ dct) + 128.0


def jpeg_approx(x: Tensor, quality: float | Tensor, rounding: str = "cubic") -> Tensor:
    """Differentiable approximation of a baseline JPEG encode/decode round trip (libjpeg 4:2:0).

    Steps: RGB → YCbCr (JFIF full range) on 0..255; replicate-pad H, W to multiples of 16 (one 4:2:0 MCU);
    chroma 2×2 average pool; per 8×8 block orthonormal DCT as a matrix product; divide by the IJG tables
    scaled by ``quality`` (libjpeg's rule, see :func:`jpeg_quant_tables`); round (smoothly, see
    ``rounding``); dequantise; inverse DCT; chroma upsampled back ×2 bilinearly (with half-pixel centres this
    is libjpeg's "fancy" triangle upsampling: 3/4 nearer + 1/4 farther sample per axis, edges replicated);
    YCbCr → RGB; crop; clamp to ``[0, 1]``.

    Against Pillow (libjpeg-turbo) the remaining differences are its integer DCT, 8-bit rounding of the
    intermediate planes and the smooth rounding surrogate; on 256×256 faces the result is 45-48 dB PSNR
    from Pillow's decoded JPEG at quality 50-95 (MAE under 1/255; see tests/test_augment.py).

    Args:
        x: ``B×3×H×W`` float RGB in ``[0, 1]``; any H, W ≥ 1.
        quality: JPEG quality in ``[1, 100]``, a number or a ``(B,)`` tensor (one per image). It selects the
            quantisation tables only: no gradient flows into it.
        rounding: ``"cubic"`` (default): ``round(v) + (v - round(v))**3`` (Shin & Song 2017), smooth, its
            value within 1/8 quantisation step of true rounding, gradient ``3 (v - round(v))**2``;
            ``"ste"``: exact rounding forward with an identity (straight-through) gradient, which makes the
            forward pass closer to real JPEG and passes gradient to every coefficient.

    Returns:
        ``B×3×H×W`` tensor in ``[0, 1]``, same dtype and device as ``x``.
    """
    _check_image(x, "x", channels=3)
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
    round_fn = _round_cubic if rounding == "cubic" else _round_ste
    b, _, h, w = x.shape
    dtype, device = x.dtype, x.device
    q = _quality_tensor(quality, b, torch.float64, device)
    qy, qc = (t.to(dtype) for t in _quant_tables(q))
    dct = _dct_matrix(dtype, device)

    pad_h, pad_w = (-h) % 16, (-w) % 16
    if pad_h or pad_w:
        # libjpeg also fills partial MCUs by repeating the last row/column.
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

    to_ycc = torch.tensor(_RGB_TO_YCBCR, dtype=dtype, device=device)
    ycc = torch.einsum("ij,bjhw->bihw", to_ycc, x * 255.0)
    y = ycc[:, 0]
    cbcr = ycc[:, 1:] + 128.0
    cbcr = F.avg_pool2d(cbcr, kernel_size=2, stride=2)

    y = _jpeg_channel(y, qy, dct, round_fn)
    cb = _jpeg_channel(cbcr[:, 0], qc, dct, round_fn)
    cr = _jpeg_channel(cbcr[:, 1], qc, dct, round_fn)
    cbcr = torch.stack([cb, cr], dim=1)
    cbcr = F.interpolate(cbcr, scale_factor=2.0, mode="bilinear", align_corners=False) - 128.0

    to_rgb = torch.tensor(_YCBCR_TO_RGB, dtype=dtype, device=device)
    ycc = torch.cat([y[:, None], cbcr], dim=1)
    rgb = torch.einsum("ij,bjhw->bihw", to_rgb, ycc) / 255.0
    return rgb[:, :, :h, :w].clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------- resize


def resize_roundtrip(x: Tensor, scale: float, mode: str = "bilinear") -> Tensor:
    """Downsample by ``scale`` (antialiased) and upsample back to the input size.

    The small size is ``max(1, round(H * scale)) × max(1, round(W * scale))``; both resizes use half-pixel
    centres (``align_corners=False``), the downsampling with PyTorch's antialias filter (as Pillow's
    resampling does), so high frequencies are removed rather than aliased.

    Args:
        x: ``B×C×H×W`` float image in ``[0, 1]``.
        scale: in ``(0, 1]``; ``1`` returns ``x`` unchanged.
        mode: ``"bilinear"`` (default) or ``"bicubic"``.

    Returns:
        ``B×C×H×W`` tensor clamped to ``[0, 1]`` (bicubic overshoots, as an 8-bit file could not).
    """
    _check_image(x, "x")
    if mode not in _RESIZE_MODES:
        raise ValueError(f"mode must be one of {_RESIZE_MODES}, got {mode!r}")
    scale = float(scale)
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    h, w = x.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    if small == (h, w):
        return x
    down = F.interpolate(x, size=small, mode=mode, align_corners=False, antialias=True)
    up = F.interpolate(down, size=(h, w), mode=mode, align_corners=False)
    return up.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------- blur


def _gaussian_kernel1d(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


BORDERS = ("mirror", "nearest")


def _border_index(n: int, radius: int, border: str, device: torch.device) -> Tensor:
    """Source indices of a length-``n`` axis padded by ``radius`` on both sides.

    ``"mirror"``: ``d c b | a b c d | c b a`` (edge sample not repeated; repeated folding, so any ``radius``
    works, where ``F.pad(mode="reflect")`` requires ``radius < n``). ``"nearest"``: ``a a a | a b c d | d d d``.
    """
    i = torch.arange(-radius, n + radius, device=device)
    if border == "nearest":
        return i.clamp(0, n - 1)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int | None = None, border: str = "mirror",
                  truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur of every channel.

    The kernel is ``exp(-t² / 2σ²)`` sampled at integer offsets ``|t| ≤ r`` and normalised to sum 1, with
    ``r = int(truncate·σ + 0.5)``, so the result equals ``scipy.ndimage.gaussian_filter(x, sigma, mode=border,
    truncate=truncate)`` over H and W. ``"mirror"`` (default; PyTorch's ``"reflect"``: ``d c b | a b c d``)
    suits images; ``"nearest"`` (edge replicated) suits masks and local statistics, where the border should
    not fold content back in.

    Args:
        x: ``B×C×H×W`` float image.
        sigma: standard deviation in pixels, ``≥ 0``; ``0`` returns ``x`` unchanged.
        kernel_size: odd kernel length, overriding ``truncate``.
        border: ``"mirror"`` or ``"nearest"``.
        truncate: kernel half-width in standard deviations (scipy's default 4).

    Returns:
        ``B×C×H×W`` tensor (a convex combination of inputs, so ``[0, 1]`` stays ``[0, 1]``).
    """
    _check_image(x, "x")
    sigma = float(sigma)
    if not sigma >= 0.0 or math.isinf(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if kernel_size is None:
        radius = int(truncate * sigma + 0.5)
    else:
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        radius = int(kernel_size) // 2
    if sigma == 0.0 or radius == 0:
        return x
    b, c, h, w = x.shape
    k = _gaussian_kernel1d(sigma, radius, x.dtype, x.device)
    # Depthwise: fold channels into the batch so one 1-channel kernel serves every channel.
    planes = x.reshape(b * c, 1, h, w)
    planes = planes.index_select(2, _border_index(h, radius, border, x.device))
    planes = F.conv2d(planes, k.view(1, 1, -1, 1))
    planes = planes.index_select(3, _border_index(w, radius, border, x.device))
    planes = F.conv2d(planes, k.view(1, 1, 1, -1))
    return planes.reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------- modules


class JPEGApprox(nn.Module):
    """Module form of :func:`jpeg_approx` with a fixed ``quality``."""

    def __init__(self, quality: float = 75.0, rounding: str = "cubic") -> None:
        super().__init__()
        self.quality = float(quality)
        self.rounding = rounding

    def forward(self, x: Tensor) -> Tensor:
        return jpeg_approx(x, self.quality, rounding=self.rounding)

    def extra_repr(self) -> str:
        return f"quality={self.quality}, rounding={self.rounding!r}"


class ResizeRoundtrip(nn.Module):
    """Module form of :func:`resize_roundtrip`."""

    def __init__(self, scale: float = 0.5, mode: str = "bilinear") -> None:
        super().__init__()
        self.scale = float(scale)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return resize_roundtrip(x, self.scale, self.mode)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mode={self.mode!r}"


class GaussianBlur(nn.Module):
    """Module form of :func:`gaussian_blur`."""

    def __init__(self, sigma: float = 1.0, kernel_size: int | None = None) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_blur(x, self.sigma, self.kernel_size)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, kernel_size={self.kernel_size}"


# -------------------------------------------------------------------------------------------------- EOT


@dataclass(frozen=True)
class TransformSpec:
    """One sampled transform: ``kind`` is ``"identity"``, ``"jpeg"``, ``"resize"`` or ``"blur"``; ``param``
    is the JPEG quality, the resize scale or the blur sigma (``None`` for identity)."""

    kind: str
    param: float | None = None


def _check_range(
    name: str, r: tuple[float, float] | None, low: float, high: float
) -> tuple[float, float] | None:
    if r is None:
        return None
    a, b = (float(v) for v in r)
    if not low <= a <= b <= high:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {r}")
    return a, b


class RandomTransforms(nn.Module):
    """EOT sampler: each image of the batch independently goes through one randomly chosen transform.

    With probability ``p_identity`` the image is returned unchanged; otherwise one of the enabled transforms
    is picked uniformly: JPEG (:func:`jpeg_approx`, integer quality uniform in ``jpeg_quality``), resize round
    trip (:func:`resize_roundtrip`, scale uniform in ``resize_scale``) or Gaussian blur
    (:func:`gaussian_blur`, sigma uniform in ``blur_sigma``). Passing ``None`` for a range disables that
    transform. Randomness comes from a ``torch.Generator`` (CPU) seeded with ``seed`` (or from torch's
    global RNG state when ``seed`` is None); ``forward(x, generator=g)`` uses ``g`` instead, so the draws are
    reproducible either way. The module samples in train and eval mode alike. To average over K
    transforms of one image, pass ``x.expand(K, -1, -1, -1)``.

    Args:
        jpeg_quality: ``(min, max)`` quality, within ``[1, 100]``; default ``(50, 95)``.
        resize_scale: ``(min, max)`` scale, within ``(0, 1]``; default ``(0.5, 1.0)``.
        blur_sigma: ``(min, max)`` sigma in pixels, ``≥ 0``; default ``(0.0, 1.0)``.
        p_identity: probability of no transform, in ``[0, 1]``; default ``0.25``.
        seed: seed of the module's own generator, or None.
        jpeg_rounding: rounding surrogate passed to :func:`jpeg_approx`.
        resize_mode: interpolation passed to :func:`resize_roundtrip`.

    Input ``B×3×H×W`` float RGB in ``[0, 1]``; output the same shape. ``last_specs`` holds the
    :class:`TransformSpec` drawn for each image by the latest call.
    """

    def __init__(
        self,
        jpeg_quality: tuple[float, float] | None = (50, 95),
        resize_scale: tuple[float, float] | None = (0.5, 1.0),
        blur_sigma: tuple[float, float] | None = (0.0, 1.0),
        p_identity: float = 0.25,
        seed: int | None = None,
        jpeg_rounding: str = "cubic",
        resize_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        self.jpeg_quality = _check_range("jpeg_quality", jpeg_quality, 1.0, 100.0)
        self.resize_scale = _check_range("resize_scale", resize_scale, 0.0, 1.0)
        if self.resize_scale is not None and self.resize_scale[0] <= 0.0:
            raise ValueError(f"resize_scale must be > 0, got {resize_scale}")
        self.blur_sigma = _check_range("blur_sigma", blur_sigma, 0.0, math.inf)
        if not 0.0 <= p_identity <= 1.0:
            raise ValueError(f"p_identity must lie in [0, 1], got {p_identity}")
        self.p_identity = float(p_identity)
        if jpeg_rounding not in _ROUNDINGS:
            raise ValueError(f"jpeg_rounding must be one of {_ROUNDINGS}, got {jpeg_rounding!r}")
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
        self.jpeg_rounding = jpeg_rounding
        self.resize_mode = resize_mode
        self.kinds = [
            k
            for k, r in (("jpeg", self.jpeg_quality), ("resize", self.resize_scale), ("blur", self.blur_sigma))
            if r is not None
        ]
        if not self.kinds and self.p_identity < 1.0:
            log.debug("RandomTransforms: every transform disabled, always identity")
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(int(seed))
        self.last_specs: list[TransformSpec] = []

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[TransformSpec]:
        """Draw ``n`` transform specs (one per image) from ``generator`` (default: the module's own)."""
        g = generator if generator is not None else self.generator
        specs = []
        # Fixed number of draws per image (3 uniforms) so the stream does not depend on the branch taken.
        u = torch.rand(n, 3, generator=g, dtype=torch.float64).tolist()
        for u_branch, u_kind, u_param in u:
            if u_branch < self.p_identity or not self.kinds:
                specs.append(TransformSpec("identity"))
                continue
            kind = self.kinds[min(int(u_kind * len(self.kinds)), len(self.kinds) - 1)]
            if kind == "jpeg":
                lo, hi = self.jpeg_quality
                lo_i, hi_i = math.ceil(lo), math.floor(hi)
                q = lo_i + min(int(u_param * (hi_i - lo_i + 1)), hi_i - lo_i) if hi_i >= lo_i else lo
                specs.append(TransformSpec("jpeg", float(q)))
            elif kind == "resize":
                lo, hi = self.resize_scale
                specs.append(TransformSpec("resize", lo + (hi - lo) * u_param))
            else:
                lo, hi = self.blur_sigma
                specs.append(TransformSpec("blur", lo + (hi - lo) * u_param))
        return specs

    def apply(self, x: Tensor, specs: list[TransformSpec]) -> Tensor:
        """Apply ``specs[i]`` to image ``i`` of ``x`` (``B×3×H×W``); images with JPEG share one call."""
        _check_image(x, "x", channels=3)
        if len(specs) != x.shape[0]:
            raise ShapeError(f"got {len(specs)} transform specs for a batch of {x.shape[0]}")
        out: list[Tensor | None] = [None] * len(specs)
        jpeg_idx = [i for i, s in enumerate(specs) if s.kind == "jpeg"]
        if jpeg_idx:
            q = torch.tensor([specs[i].param for i in jpeg_idx], dtype=torch.float64)
            y = jpeg_approx(x[jpeg_idx], q, rounding=self.jpeg_rounding)
            for j, i in enumerate(jpeg_idx):
                out[i] = y[j : j + 1]
        for i, s in enumerate(specs):
            xi = x[i : i + 1]
            if s.kind == "identity":
                out[i] = xi
            elif s.kind == "resize":
                out[i] = resize_roundtrip(xi, s.param, self.resize_mode)
            elif s.kind == "blur":
                out[i] = gaussian_blur(xi, s.param)
            elif s.kind != "jpeg":
                raise ValueError(f"unknown transform kind {s.kind!r}")
        return torch.cat(out, dim=0)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Transform each image of ``x`` (``B×3×H×W``, ``[0, 1]``) by an independently drawn transform."""
        _check_image(x, "x", channels=3)
        self.last_specs = self.sample(x.shape[0], generator)
        return self.apply(x, self.last_specs)

    def extra_repr(self) -> str:
        return (
            f"jpeg_quality={self.jpeg_quality}, resize_scale={self.resize_scale}, blur_sigma={self.blur_sigma}, "
            f"p_identity={self.p_identity}"
        )
