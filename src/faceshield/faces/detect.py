"""Face detection with 5 landmarks: one interface over several detectors, and ``detect_faces`` for photos.

Every detector returns :class:`Face` records (box, score in [0, 1], 5 landmarks in the order image-left eye,
image-right eye, nose tip, image-left mouth corner, image-right mouth corner), best score first.

Detectors (``list_detectors()``):

* ``retinaface`` (default) – RetinaFace-MobileNet0.25 in PyTorch (:mod:`faceshield.faces.retinaface`).
* ``mtcnn`` – the P/R/O-net cascade in PyTorch (:mod:`faceshield.faces.mtcnn`).
* ``dlib-hog`` – dlib's HOG + linear SVM frontal detector with landmarks from dlib's 68-point shape
  predictor (needs the optional ``dlib-bin`` package).

The default was chosen by ``benchmarks/detectors.py`` on this project's real photos; see
the comment above :data:`DEFAULT_DETECTOR` for the numbers.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from faceshield.errors import FaceshieldError, ShapeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: (x0, y0, x1, y1) in original-image pixels (pixel i spans [i, i + 1)).
        score: detector confidence in [0, 1].
        landmarks: 5×2 float32 (x, y) in original-image pixels, pixel centres at integer coordinates (the
            convention of :mod:`faceshield.faces.align` and of the detectors' training labels): image-left eye
            centre, image-right eye centre, nose tip, image-left mouth corner, image-right mouth corner.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


@runtime_checkable
class FaceDetector(Protocol):
    """``detect(image)``: image H×W×3 uint8 RGB → faces sorted by score, descending (may be empty)."""

    name: str

    def detect(self, image: np.ndarray) -> list[Face]: ...


# --- shared helpers --------------------------------------------------------------------------------------------
def check_image(image: np.ndarray) -> None:
    """Raise ShapeError unless ``image`` is an H×W×3 uint8 array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ShapeError(f"face detection expects an H×W×3 uint8 RGB array, got {shape}")
    if image.dtype != np.uint8:
        raise ShapeError(f"face detection expects uint8 RGB (0..255), got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ShapeError(f"face detection got an empty image {image.shape}")


def box_iou(a: torch.Tensor, b: torch.Tensor, overlap: str = "iou") -> torch.Tensor:
    """Overlap of boxes ``a`` (N×4) and ``b`` (M×4), (x0, y0, x1, y1) → N×M in [0, 1].

    ``overlap="iou"``: intersection / union; ``"min"``: intersection / smaller area.
    """
    if a.ndim != 2 or a.shape[1] != 4 or b.ndim != 2 or b.shape[1] != 4:
        raise ShapeError(f"box_iou expects N×4 and M×4 boxes, got {tuple(a.shape)} and {tuple(b.shape)}")
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    if overlap == "min":
        denominator = torch.minimum(area_a[:, None], area_b[None, :])
    else:
        denominator = area_a[:, None] + area_b[None, :] - inter
    return inter / denominator.clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, overlap: str = "iou") -> torch.Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes: N×4 (x0, y0, x1, y1).
        scores: N.
        iou_threshold: a box whose overlap with an already kept, higher-scored box exceeds this is dropped.
        overlap: ``"iou"`` (intersection over union) or ``"min"`` (intersection over the smaller area, which
            also removes a small box lying inside a larger one; MTCNN's last stage uses it).

    Returns:
        int64 indices into ``boxes`` of the kept boxes, highest score first.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ShapeError(f"nms expects N×4 boxes and N scores, got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    if overlap not in ("iou", "min"):
        raise ValueError(f"nms overlap must be 'iou' or 'min', got {overlap!r}")
    order = scores.argsort(descending=True)
    if order.numel() == 0:
        return order
    iou = box_iou(boxes[order], boxes[order], overlap)
    # One pass over candidates best-first; the IoU matrix is small (candidates are pre-filtered by score).
    suppressed = torch.zeros(order.numel(), dtype=torch.bool)
    overlaps = (iou > iou_threshold).cpu()
    keep = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def five_from_68(points: np.ndarray) -> np.ndarray:
    """The 5 faceshield landmarks from the 68 iBUG-300W points (68×2 → 5×2 float32).

    Eye centres are the means of the 6 points of each eye (36–41 on the image's left, 42–47 on its right);
    the nose tip is point 30; the mouth corners are points 48 and 54.
    """
    points = np.asarray(points, dtype=np.float32)
    if points.shape != (68, 2):
        raise ShapeError(f"five_from_68 expects 68×2 points, got {points.shape}")
    return np.stack([
        points[36:42].mean(axis=0),
        points[42:48].mean(axis=0),
        points[30],
        points[48],
        points[54],
    ]).astype(np.float32)


# --- dlib HOG --------------------------------------------------------------------------------------------------
def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        raise FaceshieldError("the dlib-hog detector needs dlib: pip install dlib-bin") from exc
    return dlib


class DlibHogDetector:
    """dlib's frontal face detector (HOG + linear SVM) with landmarks from the 68-point shape predictor.

    dlib scores are SVM margins (dlib keeps margin > 0 by default). They are mapped to [0, 1] by
    ``sigmoid(ln 9 + 4·margin)``, so that dlib's own decision threshold lands exactly on 0.9, the default
    ``min_score`` of :func:`detect_faces`; the slope 4 only spreads the values for display.

    Args:
        upsample: how many times dlib doubles the image before scanning (1 finds faces down to ~40 px).
        adjust_threshold: margin offset passed to dlib; candidates down to this margin are returned
            (score ≥ sigmoid(ln 9 + 4·adjust_threshold)).
    """

    name = "dlib-hog"

    def __init__(self, upsample: int = 1, adjust_threshold: float = -0.5) -> None:
        from faceshield.models.assets import fetch

        dlib = _import_dlib()
        self.upsample = upsample
        self.adjust_threshold = adjust_threshold
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(fetch("dlib/shape_predictor_68_face_landmarks.dat")))

    @staticmethod
    def margin_to_score(margin: float) -> float:
        return 1.0 / (1.0 + math.exp(-(math.log(9.0) + 4.0 * margin)))

    def detect(self, image: np.ndarray) -> list[Face]:
        check_image(image)
        image = np.ascontiguousarray(image)
        rects, margins, _ = self._detector.run(image, self.upsample, self.adjust_threshold)
        faces = []
        for rect, margin in zip(rects, margins):
            shape = self._predictor(image, rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            # dlib rectangles are inclusive pixel ranges; +1 gives the exclusive right/bottom edge.
            box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
            # dlib's points are pixel indices: pixel centres at integers, the convention of faceshield.faces.align.
            faces.append(Face(box=box, score=self.margin_to_score(margin), landmarks=five_from_68(points)))
        return sorted(faces, key=lambda f: f.score, reverse=True)


# --- registry --------------------------------------------------------------------------------------------------
def _retinaface(device: str = "cpu", **kwargs) -> FaceDetector:
    from faceshield.faces.retinaface import RetinaFaceDetector

    return RetinaFaceDetector(device=device, **kwargs)


def _mtcnn(device: str = "cpu", **kwargs) -> FaceDetector:
    from faceshield.faces.mtcnn import MTCNNDetector

    return MTCNNDetector(device=device, **kwargs)


def _dlib_hog(device: str = "cpu", **kwargs) -> FaceDetector:
    if torch.device(device).type != "cpu":
        log.warning("dlib-hog runs on the CPU only; ignoring device=%s", device)
    return DlibHogDetector(**kwargs)


_DETECTORS: dict[str, Callable[..., FaceDetector]] = {
    "retinaface": _retinaface,
    "mtcnn": _mtcnn,
    "dlib-hog": _dlib_hog,
}

# Chosen by ``python benchmarks/detectors.py`` (2-core CPU, torch's default 2 threads, idle machine) on the
# project's 821 single-face photos: 800 CelebA-HQ 256² aligned, 8 targets 1024², 13 VGGFace2 512².
# Detection rate = exactly one face with score ≥ 0.9; landmark error = mean distance of the 5 points to the
# dlib-68-derived points, / inter-ocular distance (mean, median); ms = median per photo (256² / 1024²).
#
#   detector    detection rate   missed  >1 face  landmark error   ms 256²  ms 1024²
#   retinaface  99.3 %           0       6        0.053 / 0.050    12.5     140
#   mtcnn       99.3 %           1       5        0.048 / 0.039    26.2     170
#   dlib-hog    99.5 %           3       1        (reference)      27.0     367
#
# RetinaFace misses none; its six ">1 face" photos (checked by eye) all hold a real second face in the
# background. It is the fastest (2× MTCNN and dlib on 256², 2.6× dlib on 1024²), finds 4/4 faces in all six
# 2×2 grids and in a grid of faces of 256, 128, 96 and 64 px, exactly one face in skimage's astronaut (dlib
# adds a false positive on the suit), none in blank or noise images, and its landmarks agree with dlib's as
# closely as MTCNN's do (MTCNN vs RetinaFace: 0.051 / 0.042).
DEFAULT_DETECTOR = "retinaface"


def list_detectors() -> list[str]:
    """Names accepted by :func:`create_detector`."""
    return sorted(_DETECTORS)


def create_detector(name: str = DEFAULT_DETECTOR, device: str = "cpu", **kwargs) -> FaceDetector:
    """Build detector ``name`` (see :func:`list_detectors`) with its weights; ``kwargs`` go to its constructor."""
    if name not in _DETECTORS:
        raise FaceshieldError(f"unknown face detector {name!r}; choose from: {', '.join(list_detectors())}")
    return _DETECTORS[name](device=device, **kwargs)


@functools.lru_cache(maxsize=1)
def default_detector() -> FaceDetector:
    """The shared default detector (built once per process)."""
    return create_detector(DEFAULT_DETECTOR)


# --- photos ----------------------------------------------------------------------------------------------------
def downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float, float]:
    """A copy of ``image`` whose longer side is ≤ ``max_side`` (antialiased), and the factors (sx, sy) that map
    its pixel coordinates back to ``image``'s. Returns ``image`` itself and (1, 1) when it is small enough."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, 1.0, 1.0
    scale = max_side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR, reducing_gap=3.0))
    return small, w / nw, h / nh


def landmark_tensor(faces: list[Face]) -> torch.Tensor:
    """The faces' landmarks as one ``F×5×2`` float32 tensor, the input of alignment and the FR ensemble."""
    return torch.from_numpy(np.stack([f.landmarks for f in faces])).float()


def detect_faces(
    image: np.ndarray,
    detector: FaceDetector | None = None,
    max_side: int = 1280,
    min_score: float = 0.9,
    min_size: int = 20,
) -> list[Face]:
    """Detect faces in a photo of any size.

    Detection runs on a copy downscaled so that its longer side is ≤ ``max_side`` (the caller keeps full
    resolution); boxes and landmarks are mapped back to ``image`` pixels.

    Args:
        image: H×W×3 uint8 RGB.
        detector: a :class:`FaceDetector`; default: the shared :data:`DEFAULT_DETECTOR` instance.
        max_side: longest side, in pixels, the detector sees.
        min_score: faces scoring below this are dropped.
        min_size: faces whose box is narrower or shorter than this many original-image pixels are dropped.

    Returns:
        Faces sorted by score, descending; ``[]`` when there is none.
    """
    check_image(image)
    if max_side < 32:
        raise ValueError(f"max_side must be at least 32 pixels, got {max_side}")
    detector = detector if detector is not None else default_detector()
    small, sx, sy = downscale(image, max_side)
    faces = []
    for face in detector.detect(small):
        x0, y0, x1, y1 = face.box
        mapped = Face(
            box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy),
            score=face.score,
            landmarks=(face.landmarks * np.array([sx, sy], dtype=np.float32)).astype(np.float32),
        )
        if mapped.score >= min_score and min(mapped.width, mapped.height) >= min_size:
            faces.append(mapped)
    log.debug("%s: %d face(s) in %s image (detected at %s)", getattr(detector, "name", "detector"),
              len(faces), image.shape[:2], small.shape[:2])
    return sorted(faces, key=lambda f: f.score, reverse=True)


def best_face_landmarks(rgb: np.ndarray, detector: FaceDetector) -> torch.Tensor | None:
    """Landmarks ``1×5×2`` of the most confident face in ``rgb`` (H×W×3 uint8), or None when there is none."""
    faces = detect_faces(rgb, detector)
    return landmark_tensor(faces[:1]) if faces else None
