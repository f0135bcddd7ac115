"""Fuzzing the photo reader and the protect path with malformed files (property-based, hypothesis).

The files start as valid Pillow encodings (PNG, JPEG/MPO, WebP, BMP, TIFF; modes 1, L, LA, P with and without
transparency, RGB, RGBA, I;16, CMYK; single frames and animations; small synthetic images and real faces;
with and without EXIF, valid, with a bad orientation or corrupt) and are then broken: truncated, bit-flipped,
overwritten, given another format's header or replaced by another format, given absurd dimensions with valid
checksums, header fields out of range, empty, duplicated or random chunks, or emptied; each is saved under a
supported suffix chosen independently of its content. What this proves, for every such file:

- ``load_image`` returns upright 8-bit RGB of at least 2×2 and at most ``MAX_PIXELS`` pixels (alpha H×W uint8
  or None), or raises ``ImageReadError`` with one line naming the file: never any other exception, never a raw
  Pillow warning on the terminal, and no decoding (nor its memory) for dimensions above the limit;
- ``protect_paths`` on a folder of them gives exactly one record per photo with a known status (a failure
  names its file in one line), never raises for a bad photo, and leaves every input byte-for-byte unchanged.

The suite runs a short deterministic sample; ``FACESHIELD_FUZZ_EXAMPLES`` (reader) and
``FACESHIELD_FUZZ_PROTECT_EXAMPLES`` (protect path) set how many inputs; ``benchmarks/fuzz_images.py`` runs
thousands.
"""

from __future__ import annotations

import functools
import io
import os
import resource
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.errors import ImageReadError
from faceshield.images import DECODERS, IMAGE_SUFFIXES, MAX_PIXELS, load_image
from faceshield.methods.base import create_method
from faceshield.protect import STATUSES, Protector, protect_paths

READER_EXAMPLES = int(os.environ.get("FACESHIELD_FUZZ_EXAMPLES", 150))
PROTECT_EXAMPLES = int(os.environ.get("FACESHIELD_FUZZ_PROTECT_EXAMPLES", 25))

FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF")  # MPO: the multi-picture JPEG of some cameras
MODES = ("1", "L", "LA", "P", "PT", "RGB", "RGBA", "I;16", "CMYK")  # PT: palette with a transparent entry
# formats faceshield must refuse whatever the file is called; Pillow writes them all without extra tools
FOREIGN = ("GIF", "PPM", "ICO", "TGA", "PCX", "SGI", "EPS", "PDF", "JPEG2000", "DDS", "QOI")
MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"BM", b"II*\x00",
          b"MM\x00*", b"II+\x00", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"%PDF-1.4\n", b"\x00\x00\x01\x00", b"8BPS",
          b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"qoif")
# values that sit on the edges of the fields they are written into (and of MAX_PIXELS: 15811² < 250 MP < 15812²)
EDGES = (0, 1, 2, 3, 7, 8, 255, 256, 4096, 15811, 15812, 16383, 16384, 65535, 65536, 2**24 - 1, 2**31 - 1,
         2**31, 2**32 - 1)
PNG_TYPES = (b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"tEXt", b"zTXt",
             b"iTXt", b"bKGD", b"pHYs", b"sBIT", b"eXIf", b"acTL", b"fcTL", b"fdAT", b"tIME", b"xyZw")
RIFF_TYPES = (b"VP8X", b"VP8L", b"VP8 ", b"ALPH", b"ANIM", b"ANMF", b"ICCP", b"EXIF", b"XMP ", b"abcd")
JPEG_MARKERS = (0xE0, 0xE1, 0xE2, 0xEE, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD, 0xFE, 0xDA, 0xC3, 0xCF)
# TIFF tags whose values decide allocations and decoding: sizes, layout, samples, orientation, EXIF IFD
TIFF_TAGS = (256, 257, 258, 259, 262, 273, 274, 277, 278, 279, 284, 320, 322, 323, 324, 325, 338, 339, 34665)
BMP_FIELDS = ((2, 4), (10, 4), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2), (30, 4), (34, 4), (46, 4), (50, 4),
              (54, 4), (58, 4), (62, 4), (66, 4))


def _faces() -> tuple[np.ndarray, ...]:
    """A few real 256×256 faces, so that some inputs go through detection and protection."""
    if not PAIRS.is_dir():
        return ()
    faces = []
    for name in pair_ids(3):
        with Image.open(PAIRS / "train" / f"{name}.png") as img:
            faces.append(np.asarray(img.convert("RGB")))
    return tuple(faces)


FACES = _faces()


@dataclass(frozen=True)
class Sample:
    """A file to read: its bytes, the suffix it is saved under, and how it was made (for the report)."""

    data: bytes
    suffix: str
    recipe: str

    def __repr__(self) -> str:
        data = repr(self.data) if len(self.data) <= 512 else f"<{len(self.data)} bytes>"
        return f"Sample({self.recipe!r}, suffix={self.suffix!r}, data={data})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints a failing example
        printer.text(repr(self))


# --- valid encodings ---------------------------------------------------------------------------------------------
def _pixels(draw: st.DrawFn, face_odds: int) -> tuple[np.ndarray, str]:
    """H×W×4 uint8 RGBA: a real face one time in ``face_odds``, else 1..64 px of noise, flat colour or a ramp."""
    if FACES and draw(st.integers(0, face_odds - 1)) == 0:
        index = draw(st.integers(0, len(FACES) - 1))
        face = FACES[index]
        return np.dstack([face, np.full(face.shape[:2], 255, np.uint8)]), f"face{index}"
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    kind = draw(st.sampled_from(("noise", "flat", "ramp")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "noise":
        rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    elif kind == "flat":
        rgba = np.broadcast_to(rng.integers(0, 256, 4, dtype=np.uint8), (h, w, 4)).copy()
    else:
        ramp = np.add.outer(np.arange(h), np.arange(w)) * 255 // max(1, h + w - 2)
        rgba = np.dstack([ramp, ramp[::-1], ramp[:, ::-1], 255 - ramp]).astype(np.uint8)
    return rgba, f"{kind}{w}x{h}"


def _in_mode(rgba: np.ndarray, mode: str, colors: int) -> Image.Image:
    img = Image.fromarray(rgba)
    if mode == "RGBA":
        return img
    if mode == "LA":
        return img.convert("LA")
    if mode == "I;16":  # the full 16-bit range, as scanners and raw converters write it
        return Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    if mode in ("P", "PT"):
        return img.convert("RGB").quantize(colors=colors)
    return img.convert("RGB").convert(mode)


def _exif(draw: st.DrawFn) -> tuple[bytes | None, str]:
    """An EXIF block (with its ``Exif\\0\\0`` header): valid, with a bad orientation entry, or corrupt."""
    kind = draw(st.sampled_from(("none", "valid", "orientation", "garbage", "truncated", "offset")))
    if kind == "none":
        return None, ""
    exif = Image.Exif()
    exif[0x0112] = draw(st.integers(1, 8))
    exif[0x010F] = "PhoneMaker"
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # a GPS sub-IFD: one more offset to get wrong
    valid = exif.tobytes()
    if kind == "valid":
        return valid, f"exif(orientation {exif[0x0112]})"
    if kind == "orientation":  # one IFD entry with any type, count and value (counts past the end included)
        order = draw(st.sampled_from(("<", ">")))
        kind_, count = draw(st.integers(0, 13)), draw(st.sampled_from((0, 1, 2, 4, 1000, 2**32 - 1)))
        value = draw(st.binary(min_size=4, max_size=4))
        ifd = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "IH", 8, 1)
        ifd += struct.pack(order + "HHI", 0x0112, kind_, count) + value + struct.pack(order + "I", 0)
        return b"Exif\x00\x00" + ifd, f"exif(orientation type {kind_} count {count} value {value.hex()})"
    if kind == "garbage":
        prefix = draw(st.sampled_from((b"", b"Exif\x00\x00", b"Exif\x00\x00II*\x00", b"Exif\x00\x00MM\x00*")))
        return prefix + draw(st.binary(max_size=64)), "exif(garbage)"
    if kind == "truncated":
        cut = draw(st.integers(0, len(valid) - 1))
        return valid[:cut], f"exif(truncated at {cut})"
    offset = draw(st.sampled_from((0, 1, 4, 8, 2**16, 2**31 - 1, 2**32 - 1)))  # first IFD: self, inside, past end
    order = "<" if valid[6:8] == b"II" else ">"
    return valid[:10] + struct.pack(order + "I", offset) + valid[14:], f"exif(ifd at {offset})"


def _save(img: Image.Image, fmt: str, options: dict) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's writers warn about the corrupt EXIF they are given on purpose
        img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _encode(draw: st.DrawFn, img: Image.Image, mode: str, fmt: str, exif: bytes | None) -> tuple[bytes, str]:
    """``img`` in ``fmt`` with format-specific options; when the format refuses the mode (or the EXIF), the
    nearest thing it takes, so that every draw yields a file."""
    options: dict = {}
    if fmt in ("JPEG", "MPO"):
        options.update(quality=draw(st.integers(1, 100)), progressive=draw(st.booleans()))
    elif fmt == "WEBP":
        options.update(lossless=draw(st.booleans()), quality=draw(st.integers(0, 100)))
    elif fmt == "TIFF":
        compressions = ("raw", "tiff_lzw", "tiff_adobe_deflate", "packbits") + (("group4",) if mode == "1" else ())
        options["compression"] = draw(st.sampled_from(compressions + (("jpeg",) if mode in ("L", "RGB") else ())))
    elif fmt == "PNG":
        options["compress_level"] = draw(st.integers(0, 9))
    if mode == "PT":
        options["transparency"] = draw(st.integers(0, 255))
    if fmt in ("PNG", "WEBP", "TIFF", "MPO") and draw(st.booleans()):  # a second frame: APNG, animated WebP, ...
        options.update(save_all=True, append_images=[img.transpose(Image.Transpose.ROTATE_180)])
    if exif is not None:
        options["exif"] = exif
    attempts = [(img, options, "")]
    if exif is not None:
        attempts.append((img, {k: v for k, v in options.items() if k != "exif"}, " (exif refused)"))
    attempts.append((img.convert("RGB"), {}, " (as RGB)"))
    for candidate, opts, note in attempts:
        try:
            return _save(candidate, fmt, opts), note
        except Exception:  # noqa: BLE001 - Pillow's writers refuse modes and EXIF in many ways; try the next
            continue
    raise AssertionError(f"Pillow cannot write RGB as {fmt}")


# --- structure-aware mutations -----------------------------------------------------------------------------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _spans(data: bytes) -> tuple[str, list[tuple[int, int]]]:
    """The container and its chunks as (start, end): PNG chunks, RIFF (WebP) chunks, JPEG segments up to the
    first scan; ("", []) for anything else."""
    spans: list[tuple[int, int]] = []
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        pos = 8
        while pos + 12 <= len(data):
            end = pos + 12 + struct.unpack(">I", data[pos:pos + 4])[0]
            if end > len(data):
                break
            spans.append((pos, end))
            pos = end
        return "png", spans
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        pos = 12
        while pos + 8 <= len(data):
            size = struct.unpack("<I", data[pos + 4:pos + 8])[0]
            end = pos + 8 + size + (size & 1)
            if end > len(data):
                break
            spans.append((pos, end))
            pos = end
        return "riff", spans
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
            if end > len(data):
                break
            spans.append((pos, end))
            if data[pos + 1] == 0xDA:  # start of scan: entropy-coded data follows
                break
            pos = end
        return "jpeg", spans
    return "", spans


def _new_chunk(draw: st.DrawFn, container: str, empty: bool) -> tuple[bytes, str]:
    payload = b"" if empty else draw(st.binary(max_size=40))
    if container == "png":
        kind = draw(st.sampled_from(PNG_TYPES))
        return _png_chunk(kind, payload), kind.decode()
    if container == "riff":
        kind = draw(st.sampled_from(RIFF_TYPES))
        return kind + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1), kind.decode()
    marker = draw(st.sampled_from(JPEG_MARKERS))
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload, f"FF{marker:02X}"


def _fix_riff_size(data: bytes) -> bytes:
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:] if data[:4] == b"RIFF" else data


def _chunk_mutation(draw: st.DrawFn, data: bytes, kind: str) -> tuple[bytes, str]:
    container, spans = _spans(data)
    if not spans:
        return data, f"{kind}: no chunks"
    boundaries = [s for s, _ in spans] + [spans[-1][1]]
    at = boundaries[draw(st.integers(0, len(boundaries) - 1))]
    if kind == "duplicate-chunk":
        start, end = spans[draw(st.integers(0, len(spans) - 1))]
        out, note = data[:at] + data[start:end] + data[at:], f"duplicate chunk@{start} to {at}"
    elif kind == "zero-chunk" and draw(st.booleans()):  # empty an existing chunk, its checksum made valid again
        start, end = spans[draw(st.integers(0, len(spans) - 1))]
        if container == "png":
            empty = _png_chunk(data[start + 4:start + 8], b"")
        elif container == "riff":
            empty = data[start:start + 4] + b"\x00" * 4
        else:
            empty = data[start:start + 2] + struct.pack(">H", draw(st.sampled_from((0, 1, 2))))
        out, note = data[:start] + empty + data[end:], f"empty chunk@{start}"
    else:
        chunk, name = _new_chunk(draw, container, empty=kind == "zero-chunk")
        out, note = data[:at] + chunk + data[at:], f"{kind} {name}@{at}"
    if container == "riff" and draw(st.booleans()):
        out = _fix_riff_size(out)
    return out, note


def _dimension(draw: st.DrawFn, bits: int) -> int:
    return draw(st.one_of(st.sampled_from(EDGES), st.integers(0, 2**32 - 1))) & ((1 << bits) - 1)


def _tiff_entries(data: bytes) -> tuple[str, list[int]]:
    """Byte order and the offsets of the first IFD's 12-byte entries (those inside the file)."""
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(data[:4])
    if order is None or len(data) < 8:
        return "", []
    ifd = struct.unpack(order + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return order, []
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    return order, [e for e in range(ifd + 2, ifd + 2 + 12 * count, 12) if e + 12 <= len(data)]


def _put(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):] if offset + len(value) <= len(data) else data


def _dimensions(draw: st.DrawFn, data: bytes) -> tuple[bytes, str]:
    """Write width and height into the header of whatever the file is, keeping checksums valid."""
    container, spans = _spans(data)
    if container == "png" and spans and data[12:16] == b"IHDR":
        w, h = _dimension(draw, 32), _dimension(draw, 32)
        end = spans[0][1]
        ihdr = struct.pack(">II", w, h) + data[24:end - 4]
        return data[:8] + _png_chunk(b"IHDR", ihdr) + data[end:], f"IHDR {w}x{h}"
    if container == "jpeg":
        sofs = [s for s, _ in spans if data[s + 1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB)]
        if sofs:
            w, h = _dimension(draw, 16), _dimension(draw, 16)
            return _put(data, sofs[0] + 5, struct.pack(">HH", h, w)), f"SOF {w}x{h}"
    if container == "riff":
        w, h = _dimension(draw, 24), _dimension(draw, 24)  # stored minus one (VP8X, VP8L); VP8L and VP8: 14 bits
        for start, end in spans:
            kind = data[start:start + 4]
            if kind == b"VP8X":
                return _put(data, start + 12, w.to_bytes(3, "little") + h.to_bytes(3, "little")), f"VP8X {w}+1x{h}+1"
            if kind == b"VP8L" and end >= start + 13:  # after the signature byte: 14 + 14 bits, alpha, version
                flags = struct.unpack("<I", data[start + 9:start + 13])[0] & 0xF0000000
                bits = (w & 0x3FFF) | (h & 0x3FFF) << 14 | flags
                return _put(data, start + 9, struct.pack("<I", bits)), f"VP8L {w & 0x3FFF}+1x{h & 0x3FFF}+1"
            if kind == b"VP8 ":  # after the frame tag and start code: 14 bits and a 2-bit scale each
                size = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
                return _put(data, start + 14, size), f"VP8 {w & 0x3FFF}x{h & 0x3FFF}"
    if data[:2] == b"BM":
        w, h = _dimension(draw, 32), _dimension(draw, 32)  # signed in the file: a negative height is top-down
        return _put(data, 18, struct.pack("<II", w, h)), f"BMP {w}x{h}"
    order, entries = _tiff_entries(data)
    sized = [e for e in entries if struct.unpack(order + "H", data[e:e + 2])[0] in (256, 257)]
    if sized:
        out = data
        for entry in sized:  # rewritten as LONG so that any 32-bit size fits
            out = _put(out, entry + 2, struct.pack(order + "HII", 4, 1, _dimension(draw, 32)))
        return out, "TIFF sizes " + "x".join(str(struct.unpack(order + "I", out[e + 8:e + 12])[0]) for e in sized)
    return data, "dimensions: no header"


def _header_field(draw: st.DrawFn, data: bytes) -> tuple[bytes, str]:
    """Any other header field out of range: PNG IHDR bytes (checksum kept valid), BMP fields, TIFF entries."""
    value = draw(st.one_of(st.sampled_from(EDGES), st.integers(0, 2**32 - 1)))
    container, spans = _spans(data)
    if container == "png" and spans and data[12:16] == b"IHDR" and spans[0][1] >= 33:
        end = spans[0][1]
        ihdr = bytearray(data[16:end - 4])
        field = draw(st.integers(8, 12))  # bit depth, colour type, compression, filter, interlace
        ihdr[field] = value & 0xFF
        return data[:8] + _png_chunk(b"IHDR", bytes(ihdr)) + data[end:], f"IHDR[{field}]={value & 0xFF}"
    if data[:2] == b"BM":
        offset, size = draw(st.sampled_from(BMP_FIELDS))
        value &= (1 << 8 * size) - 1
        return _put(data, offset, value.to_bytes(size, "little")), f"BMP@{offset}={value}"
    order, entries = _tiff_entries(data)
    if entries:
        tags = {struct.unpack(order + "H", data[e:e + 2])[0]: e for e in entries}
        wanted = [t for t in TIFF_TAGS if t in tags] or list(tags)
        tag = draw(st.sampled_from(wanted))
        part, size = draw(st.sampled_from(((2, 2), (4, 4), (8, 4))))  # type, count, value or offset
        value &= (1 << 8 * size) - 1
        return _put(data, tags[tag] + part, value.to_bytes(size, "little" if order == "<" else "big")), \
            f"TIFF tag {tag} +{part}={value}"
    if container == "jpeg" and spans:  # a byte of a segment's payload: SOF sampling factors, table ids, ...
        start, end = spans[draw(st.integers(0, len(spans) - 1))]
        if end > start + 4:
            at = draw(st.integers(start + 4, end - 1))
            return _put(data, at, bytes([value & 0xFF])), f"JPEG@{at}={value & 0xFF}"
    return data, "header field: none"


def _position(draw: st.DrawFn, data: bytes) -> int:
    """Mostly in the first 64 bytes, where the headers are."""
    last = max(0, len(data) - 1)
    return draw(st.one_of(st.integers(0, min(last, 64)), st.integers(0, last)))


MUTATIONS = ("truncate", "flip", "overwrite", "insert", "delete", "magic", "foreign", "empty", "dimensions",
             "header-field", "zero-chunk", "duplicate-chunk", "random-chunk")


def _mutate(draw: st.DrawFn, data: bytes, kind: str, img: Image.Image) -> tuple[bytes, str]:
    if kind == "truncate":
        cut = draw(st.integers(0, len(data)))
        return data[:cut], f"truncate@{cut}"
    if kind == "flip":
        at, bit = _position(draw, data), draw(st.integers(0, 7))
        return (_put(data, at, bytes([data[at] ^ 1 << bit])), f"flip@{at}.{bit}") if data else (data, "flip: empty")
    if kind == "overwrite":
        at, junk = _position(draw, data), draw(st.binary(min_size=1, max_size=16))
        return data[:at] + junk + data[at + len(junk):], f"overwrite@{at}={junk.hex()}"
    if kind == "insert":
        at, junk = _position(draw, data), draw(st.binary(min_size=1, max_size=16))
        return data[:at] + junk + data[at:], f"insert@{at}={junk.hex()}"
    if kind == "delete":
        at, n = _position(draw, data), draw(st.integers(1, 64))
        return data[:at] + data[at + n:], f"delete@{at}+{n}"
    if kind == "magic":  # another format's signature over (or before) this one's
        magic, over = draw(st.sampled_from(MAGICS)), draw(st.booleans())
        out = magic + data[len(magic):] if over else magic + data
        return out, f"magic {magic[:8]!r} {'over' if over else 'before'}"
    if kind == "foreign":
        fmt = draw(st.sampled_from(FOREIGN))
        try:
            return _save(img.convert("RGB"), fmt, {}), f"foreign {fmt}"
        except Exception:  # noqa: BLE001 - a writer that refuses this image: keep the file as it was
            return data, f"foreign {fmt}: not written"
    if kind == "empty":
        return b"", "empty"
    if kind == "dimensions":
        return _dimensions(draw, data)
    if kind == "header-field":
        return _header_field(draw, data)
    return _chunk_mutation(draw, data, kind)


@st.composite
def photos(draw: st.DrawFn, face_odds: int = 8) -> Sample:
    """A photo file as users have them, possibly broken, under a supported suffix (see the module docstring)."""
    rgba, content = _pixels(draw, face_odds)
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    img = _in_mode(rgba, mode, draw(st.integers(2, 256)))
    exif, exif_note = _exif(draw) if fmt != "BMP" else (None, "")
    data, note = _encode(draw, img, mode, fmt, exif)
    steps = [f"{fmt} {mode} {content}{note} {exif_note}".strip()]
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), max_size=4)):
        data, step = _mutate(draw, data, kind, img)
        steps.append(step)
    return Sample(data, draw(st.sampled_from(IMAGE_SUFFIXES)), " | ".join(steps))


# --- the properties ------------------------------------------------------------------------------------------------
READER_INPUTS = photos()
# folders of one to three photos, a real face more often: detection, protection and the no-face copy all run
PROTECT_INPUTS = st.lists(photos(face_odds=3), min_size=1, max_size=3)
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
# Reading a photo within the limit costs up to ~16 bytes per pixel (decoded image, upright copy, RGB, array);
# more than this budget means a decoder allocated for something other than the header's pixels.
BYTES_PER_PIXEL = 24
BASE_MEMORY = 256 << 20


def _max_rss() -> int:
    """The process's peak resident memory: its growth over a call shows a new high-water mark."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _declared_pixels(path: Path) -> int:
    """The pixel count the file's header claims, read by Pillow's own parser with its size guard lifted
    (0 when Pillow cannot parse the header)."""
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path, formats=DECODERS) as img:
                return abs(img.size[0] * img.size[1])
    except Exception:  # noqa: BLE001 - not parseable: load_image must refuse it, checked by the caller
        return 0
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def _assert_one_line_naming(message: str, path: Path) -> None:
    assert len(message.splitlines()) == 1 and "\n" not in message, f"not one line: {message!r}"
    assert str(path) in message, f"does not name {path}: {message!r}"


@settings(max_examples=READER_EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=HEALTH)
@given(sample=READER_INPUTS)
def test_load_image_returns_rgb_or_one_line_error(sample: Sample) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"photo{sample.suffix}"
        path.write_bytes(sample.data)
        declared = _declared_pixels(path)
        rss = _max_rss()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loaded = load_image(path)
            except ImageReadError as exc:
                loaded, message = None, str(exc)
        grown = _max_rss() - rss
        # Pillow's complaints about a malformed file are logged, never printed raw on the user's terminal
        assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
        assert grown <= BASE_MEMORY + BYTES_PER_PIXEL * min(declared, MAX_PIXELS), f"reading took {grown >> 20} MiB"
        if declared > MAX_PIXELS:  # refused by our own limit, from the header, before any decoding
            assert loaded is None and "megapixels" in message, f"{declared} pixels not refused by the limit"
        if loaded is None:
            _assert_one_line_naming(message, path)
            return
        h, w = loaded.rgb.shape[:2]
        assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (h, w, 3)
        assert 2 <= h and 2 <= w and h * w <= MAX_PIXELS
        assert loaded.alpha is None or (loaded.alpha.dtype == np.uint8 and loaded.alpha.shape == (h, w))


@functools.cache
def _protector() -> Protector:
    # one step, no augmentation: the property is about the path's bookkeeping, not the protection's strength
    return Protector(create_method("cloak", surrogates=("mobilefacenet-ms1m",), steps=1, eot=False))


@settings(max_examples=PROTECT_EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=HEALTH)
@given(samples=PROTECT_INPUTS)
def test_protect_paths_gives_one_honest_record_per_photo(samples: list[Sample]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        files = [folder / f"photo{i}{s.suffix}" for i, s in enumerate(samples)]
        for path, sample in zip(files, samples):
            path.write_bytes(sample.data)
        run = protect_paths([folder], _protector(), Path(tmp) / "out", progress=False)
        assert sorted(r.input for r in run.records) == sorted(map(str, files))
        for record in run.records:
            assert record.status in STATUSES, record
            if record.status == "failed":
                _assert_one_line_naming(record.error or "", Path(record.input))
        for path, sample in zip(files, samples):
            assert path.read_bytes() == sample.data, f"{path} was modified"


# --- what the fuzzing found, pinned as plain tests ----------------------------------------------------------------
def _tiff_header(width: int, height: int) -> bytes:
    """A one-strip 8-bit grayscale TIFF of ``width``×``height`` whose pixel data is missing."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
               (278, 4, height), (279, 4, width * height)]
    ifd = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0)


def test_multi_page_tiff_with_gps_exif_is_read(tmp_path: Path) -> None:
    # its EXIF sub-IFDs were serialised after the file was closed: "corrupt or truncated image (seek of closed file)"
    exif = Image.Exif()
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)
    page = Image.new("RGB", (8, 8), (1, 2, 3))
    page.save(tmp_path / "two.tif", save_all=True, append_images=[page], exif=exif.tobytes())
    loaded = load_image(tmp_path / "two.tif")
    kept = Image.Exif()
    kept.load(loaded.exif)
    assert loaded.size == (8, 8) and kept.get_ifd(0x8825) == {2: (48.0, 51.0, 24.0)}


def test_size_limit_is_ours_for_every_format(tmp_path: Path) -> None:
    # Pillow's guard (from ~179 MP, for TIFF again at decoding) refused first, without the size, and below our limit
    (tmp_path / "huge.tif").write_bytes(_tiff_header(16000, 16000))
    with pytest.raises(ImageReadError, match=r"huge.tif: 16000×16000 is 256.0 megapixels, more than the 250 MP"):
        load_image(tmp_path / "huge.tif")
    (tmp_path / "big.tif").write_bytes(_tiff_header(14000, 14000))  # 196 MP: within our limit, decoded (and cut)
    with pytest.raises(ImageReadError, match="big.tif: corrupt or truncated image"):
        load_image(tmp_path / "big.tif")


def test_pillow_warnings_about_a_corrupt_exif_are_logged_in_one_line(tmp_path: Path, caplog) -> None:
    # an orientation entry whose 1000 values lie past the end of the block: Pillow skips it with a UserWarning
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1000, 0xFFFF) + b"\0" * 4
    Image.new("RGB", (8, 8)).save(tmp_path / "exif.jpg", exif=exif)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger="faceshield.images"):
        warnings.simplefilter("always")
        assert load_image(tmp_path / "exif.jpg").size == (8, 8)
    assert not caught
    message = f"{tmp_path / 'exif.jpg'}: Tag data larger than file. Skipping tag 274"
    assert [r.getMessage() for r in caplog.records] == [message]


def test_protect_paths_survives_an_output_too_large_for_its_format(tmp_path: Path) -> None:
    # found by the protect property: a JPEG whose header says 7×16384, named .webp (no face: copied to the output)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16384, 2), (128, 128, 128)).save(tmp_path / "in" / "wide.webp", format="PNG")
    (record,) = protect_paths([tmp_path / "in"], _protector(), tmp_path / "out", progress=False).records
    assert record.status == "no-face" and record.output is None
    assert "too large to write as WEBP (at most 16383 px a side)" in record.note
    # with a face, refused before the protection is computed, naming the input
    canvas = Image.new("RGB", (16400, 1024), (128, 128, 128))
    with Image.open(PAIRS / "train" / f"{pair_ids(1)[0]}.png") as face:
        canvas.paste(face.convert("RGB").resize((1024, 1024)), (0, 0))
    canvas.save(tmp_path / "in" / "panorama.webp", format="PNG")
    records = protect_paths([tmp_path / "in" / "panorama.webp"], _protector(), tmp_path / "o2", progress=False).records
    assert records[0].status == "failed" and records[0].error.startswith(str(tmp_path / "in" / "panorama.webp"))
    assert "too large to write as WEBP" in records[0].error
