"""Reading the photos users have, and converting between arrays and tensors.

``load_image`` returns upright 8-bit RGB whatever the file holds: EXIF orientation applied, grayscale,
palette, RGBA/LA (alpha kept aside), CMYK, 16-bit and WebP converted. Very large photos are read at full
resolution; detection works on a downscaled copy (see ``faceshield.faces.detect.detect_faces``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from faceshield.errors import ImageReadError, ShapeError

log = logging.getLogger(__name__)

# Real photos stay far below this limit (a 100 MP medium-format camera); anything above it is refused with our
# own message before it is decoded (Pillow's own guard, lifted while we read, would fail from ~179 MP).
MAX_PIXELS = 250_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# The decoders a photo may go through, whatever its name says: nothing else is ever run on a user's file
# (Pillow would otherwise hand EPS to Ghostscript, for one). JPEG includes the MPO files of some cameras.
DECODERS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# Single-channel modes: such photos are protected in luminance and written back single-channel.
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
UNSUPPORTED_HINT = "supported: JPEG, PNG, WebP, BMP, TIFF; convert it (e.g. to PNG or JPEG) first"


@dataclass
class LoadedImage:
    """A photo as read from disk.

    Attributes:
        rgb: H×W×3 uint8 RGB, upright (EXIF orientation applied).
        alpha: H×W uint8 alpha channel when the file has transparency, else None.
        path: where it came from.
        format: Pillow's format name ("JPEG", "PNG", ...).
        mode: the file's original Pillow mode ("RGB", "L", "I;16", "CMYK", "RGBA", ...).
        exif: the file's EXIF block with orientation reset to 1 (the pixels are upright), or None.
        icc_profile: the file's ICC colour profile, or None.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    path: Path
    format: str
    mode: str
    exif: bytes | None = None
    icc_profile: bytes | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def grayscale(self) -> bool:
        """The file holds a single-channel (grayscale) image; ``rgb`` has three equal channels."""
        return self.mode in GRAY_MODES


def _to_8bit_rgb(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = img.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grayscale: scale the full range down to 8 bits instead of clipping at 255.
        data = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or data.max() > 255 else 255.0
        gray = np.clip(np.round(data / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), None
    if mode == "F":
        data = np.asarray(img, dtype=np.float64)
        scale = 255.0 if data.max() <= 1.0 else 1.0
        gray = np.clip(np.round(data * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), None
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        arr = np.array(rgba)
        alpha = arr[:, :, 3].copy()
        return np.ascontiguousarray(arr[:, :, :3]), alpha
    # RGB, L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's conversions (CMYK with its inversion for Adobe JPEGs).
    return np.array(img.convert("RGB")), None


_READING = threading.Lock()


@contextlib.contextmanager
def _reading() -> Iterator[list[warnings.WarningMessage]]:
    """The conditions a photo is read under, one photo at a time (both settings are process-wide).

    - Pillow's decompression-bomb guard is lifted: it fails from 2 × ``Image.MAX_IMAGE_PIXELS`` (~179 MP), at
      open or, for TIFF, at load, below :data:`MAX_PIXELS` and without the image's size. :func:`load_image`
      checks the size from the header against :data:`MAX_PIXELS` itself, before anything is decoded.
    - Pillow's warnings about the malformed metadata it skips (corrupt EXIF, tags past the end of the file, a
      malformed MPO) are recorded instead of printed raw (two lines, Pillow's source) on the user's terminal.
    """
    with _READING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield caught
        finally:
            Image.MAX_IMAGE_PIXELS = guard


def load_image(path: str | Path) -> LoadedImage:
    """Read a photo as upright 8-bit RGB.

    Raises:
        ImageReadError: one line naming the file and what to do (missing, not an image, truncated, too large,
            corrupt metadata).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, expected a photo file")
    try:
        with _reading() as caught:
            with Image.open(path, formats=DECODERS) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageReadError(f"{path}: {width}×{height} is {width * height / 1e6:.1f} megapixels, more "
                                         f"than the {MAX_PIXELS // 1_000_000} MP faceshield reads; downscale it first")
                fmt = img.format or "unknown"
                mode = img.mode
                img.load()
                exif = img.getexif()
                icc_profile = img.info.get("icc_profile")
                img = ImageOps.exif_transpose(img)
                rgb, alpha = _to_8bit_rgb(img)
                # while the file is open: Pillow reads EXIF sub-IFDs (GPS, Exif) from it on first use, e.g. in a
                # multi-page TIFF ("seek of closed file" once closed)
                exif_bytes = None
                if len(exif):
                    exif[0x0112] = 1  # orientation: the pixels were rotated upright above
                    exif_bytes = exif.tobytes()
        for warning in caught:  # the photo was read: what Pillow skipped is for the log (faceshield -v)
            log.info("%s: %s", path, " ".join(str(warning.message).split()))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image ({UNSUPPORTED_HINT})") from None
    except Image.DecompressionBombError:
        raise ImageReadError(f"{path}: more than {MAX_PIXELS // 1_000_000} megapixels; downscale it first") from None
    except MemoryError:
        raise ImageReadError(f"{path}: too large to decode in the memory available; downscale it first") from None
    except Exception as exc:  # noqa: BLE001 - a malformed file can make a decoder raise almost anything
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ImageReadError(f"{path}: corrupt or truncated image ({reason}); re-export or re-download it") from None
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageReadError(f"{path}: image is only {rgb.shape[1]}×{rgb.shape[0]} pixels")
    return LoadedImage(rgb, alpha, path, fmt, mode, exif_bytes, icc_profile)


def to_tensor(rgb: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """H×W×3 uint8 RGB → 1×3×H×W float32 in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ShapeError(f"expected H×W×3 uint8 RGB, got shape {rgb.shape} dtype {rgb.dtype}")
    return torch.from_numpy(rgb).to(device).permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """1×3×H×W (or 3×H×W) float in [0, 1] → H×W×3 uint8 RGB, rounded."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ShapeError(f"expected one image, got batch of {image.shape[0]}")
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ShapeError(f"expected 3×H×W, got {tuple(image.shape)}")
    arr = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(arr)


def is_supported(path: Path) -> bool:
    """A file name faceshield reads and writes back in the same format (by its suffix)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def scan_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """The photos under ``folder`` (recursively, by suffix) and the other files there, each list sorted.

    Hidden files and folders (``.name``: system files, partial writes) are in neither.
    """
    photos, others = [], []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        (photos if is_supported(path) else others).append(path)
    return photos, others


_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
# the longest side each format's encoder can write (Pillow raises a bare ValueError beyond it)
_MAX_SIDE = {"WEBP": 16383, "JPEG": 65500}


def check_writable_size(name: str | Path, suffix: str, width: int, height: int) -> None:
    """Raise :class:`ImageReadError` (naming ``name``) if a ``width``×``height`` image cannot be written as ``suffix``."""
    fmt = _FORMATS.get(suffix.lower())
    limit = _MAX_SIDE.get(fmt or "")
    if limit and max(width, height) > limit:
        raise ImageReadError(f"{name}: {width}×{height} is too large to write as {fmt} (at most {limit} px a side); "
                             "convert it to PNG or TIFF first")


def save_image(
    path: str | Path,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    source: LoadedImage | None = None,
    keep_metadata: bool = False,
    jpeg_quality: int = 95,
    grayscale: bool = False,
) -> Path:
    """Write H×W×3 uint8 RGB (plus optional alpha) atomically, format chosen by the file suffix.

    ``grayscale`` writes one luminance channel (ITU-R 601 luma of ``rgb``), as the source photo had.

    Metadata (EXIF with GPS, camera serials, ICC profile, comments) is dropped unless ``keep_metadata``, in
    which case ``source``'s EXIF (orientation reset to 1) and ICC profile are written back. JPEG uses 4:4:4
    chroma at ``jpeg_quality`` (default 95) so that the protection is not averaged away by subsampling;
    WebP is written lossless.
    """
    import io

    from faceshield.fileio import write_bytes_atomic

    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageReadError(f"{path}: cannot write this file type; use one of {', '.join(sorted(_FORMATS))}")
    check_writable_size(path, path.suffix, rgb.shape[1], rgb.shape[0])
    img = Image.fromarray(rgb)
    if grayscale:
        img = img.convert("L")
    if alpha is not None and fmt in ("PNG", "WEBP", "TIFF"):
        img.putalpha(Image.fromarray(alpha))
    options: dict = {}
    if fmt == "JPEG":
        options.update(quality=int(jpeg_quality), subsampling=0)
    elif fmt == "WEBP":
        options.update(lossless=True)
    if keep_metadata and source is not None:
        if source.exif:
            options["exif"] = source.exif
        if source.icc_profile:
            options["icc_profile"] = source.icc_profile
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return write_bytes_atomic(path, buffer.getvalue())
