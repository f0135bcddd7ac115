"""RetinaFace (MobileNet-0.25 backbone): face boxes, scores and 5 landmarks in one pass.

The network follows the Pytorch_Retinaface project (biubug6, MIT), whose ``mobilenet0.25_Final.pth``
state_dict it loads unchanged: a MobileNet-V1 ×0.25 backbone (stages at strides 8, 16, 32), an FPN with
64 channels, an SSH context module per level and 1×1 class / box / landmark heads with 2 anchors per cell.

Facts taken from that project (checked against its ``data/config.py``, ``models/net.py``,
``layers/functions/prior_box.py``, ``utils/box_utils.py``):

* input: BGR, 0..255, minus the per-channel mean (104, 117, 123), no scaling;
* anchors: per level (strides 8, 16, 32) square anchors of sides (16, 32), (64, 128), (256, 512) pixels,
  centred on ((j + 0.5)·step, (i + 0.5)·step), ordered level → row → column → size;
* decoding with variances (0.1, 0.2): centre = anchor centre + Δ·0.1·anchor side,
  side = anchor side · exp(Δ·0.2); landmarks = anchor centre + Δ·0.1·anchor side;
* LeakyReLU slope 0.1 everywhere (the "≤ 64 channels" branch of the reference), plain ReLU after SSH;
* landmarks in the order: image-left eye, image-right eye, nose tip, image-left mouth corner,
  image-right mouth corner (WIDER FACE annotation order; checked on real photos in the tests), which is
  already faceshield's order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceshield.errors import ShapeError
from faceshield.faces.detect import Face, check_image, downscale, nms

log = logging.getLogger(__name__)

WEIGHTS_ASSET = "retinaface-mnet025/mobilenet0.25_Final.pth"
MIN_SIZES: tuple[tuple[int, int], ...] = ((16, 32), (64, 128), (256, 512))
STEPS: tuple[int, ...] = (8, 16, 32)
VARIANCES: tuple[float, float] = (0.1, 0.2)
BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 123.0)
_SLOPE = 0.1


# --- network ---------------------------------------------------------------------------------------------------
def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, slope: float | None = _SLOPE
) -> list[nn.Module]:
    """Conv (no bias) + BatchNorm (+ LeakyReLU unless ``slope`` is None), as a flat list of layers."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope, inplace=True))
    return layers


def _depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    # Indices 0..5 = dw conv, bn, act, pw conv, bn, act: the layout the checkpoint's keys expect.
    return nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin), *_conv_bn(cin, cout, 1))


class MobileNetV1x025(nn.Module):
    """MobileNet-V1 with width 0.25; returns the feature maps at strides 8, 16, 32 (64, 128, 256 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            nn.Sequential(*_conv_bn(3, 8, 3, 2)),
            _depthwise_separable(8, 16, 1),
            _depthwise_separable(16, 32, 2),
            _depthwise_separable(32, 32, 1),
            _depthwise_separable(32, 64, 2),
            _depthwise_separable(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _depthwise_separable(64, 128, 2), *[_depthwise_separable(128, 128, 1) for _ in range(5)]
        )
        self.stage3 = nn.Sequential(_depthwise_separable(128, 256, 2), _depthwise_separable(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return [c3, c4, c5]


class FPN(nn.Module):
    """Top-down feature pyramid: lateral 1×1 convs, nearest upsampling, 3×3 merge convs."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.output1 = nn.Sequential(*_conv_bn(in_channels[0], out_channels, 1))
        self.output2 = nn.Sequential(*_conv_bn(in_channels[1], out_channels, 1))
        self.output3 = nn.Sequential(*_conv_bn(in_channels[2], out_channels, 1))
        self.merge1 = nn.Sequential(*_conv_bn(out_channels, out_channels, 3))
        self.merge2 = nn.Sequential(*_conv_bn(out_channels, out_channels, 3))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single Stage Headless context module: parallel 3×3, 5×5 (two 3×3) and 7×7 (three 3×3) branches."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.conv3X3 = nn.Sequential(*_conv_bn(channels, half, 3, slope=None))
        self.conv5X5_1 = nn.Sequential(*_conv_bn(channels, quarter, 3))
        self.conv5X5_2 = nn.Sequential(*_conv_bn(quarter, quarter, 3, slope=None))
        self.conv7X7_2 = nn.Sequential(*_conv_bn(quarter, quarter, 3))
        self.conv7x7_3 = nn.Sequential(*_conv_bn(quarter, quarter, 3, slope=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5_in = self.conv5X5_1(x)
        branch7_mid = self.conv7X7_2(branch5_in)  # the 7×7 branch shares the 5×5 branch's first conv
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(branch5_in), self.conv7x7_3(branch7_mid)], dim=1)
        return F.relu(out)


class _Head(nn.Module):
    """1×1 conv: ``per_anchor`` values for each of ``anchors`` anchors per cell → B×(H·W·anchors)×per_anchor."""

    def __init__(self, channels: int, anchors: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(channels, anchors * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)  # cell-major, then anchor: matches the prior order
        return out.reshape(out.shape[0], -1, self.per_anchor)


@dataclass
class RetinaFaceOutput:
    """Raw network outputs for N anchors (N = Σ over levels of 2·⌈H/s⌉·⌈W/s⌉).

    Attributes:
        loc: B×N×4 box offsets (dx, dy, dw, dh), encoded against the anchors.
        logits: B×N×2 (background, face) class logits.
        landmarks: B×N×10 landmark offsets (x0, y0, …, x4, y4), encoded against the anchors.
    """

    loc: torch.Tensor
    logits: torch.Tensor
    landmarks: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        """B×N face probabilities in [0, 1]."""
        return self.logits.softmax(dim=-1)[..., 1]


class RetinaFace(nn.Module):
    """RetinaFace-MobileNet0.25 on RGB images.

    ``forward(x)``: ``x`` is ``B×3×H×W`` float RGB in [0, 1] (any H, W ≥ 32); the BGR/mean preprocessing of the
    original training is applied inside, so the whole path is differentiable with respect to ``x``.
    Returns a :class:`RetinaFaceOutput`; :func:`anchors` and :func:`decode_boxes` / :func:`decode_landmarks`
    turn it into pixel coordinates.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = MobileNetV1x025()
        self.fpn = FPN((64, 128, 256), 64)
        self.ssh1, self.ssh2, self.ssh3 = SSH(64), SSH(64), SSH(64)
        self.ClassHead = nn.ModuleList([_Head(64, 2, 2) for _ in STEPS])
        self.BboxHead = nn.ModuleList([_Head(64, 2, 4) for _ in STEPS])
        self.LandmarkHead = nn.ModuleList([_Head(64, 2, 10) for _ in STEPS])
        self.register_buffer("bgr_mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] → the network's input (BGR, 0..255, mean subtracted)."""
        return x.flip(1) * 255.0 - self.bgr_mean

    def forward(self, x: torch.Tensor) -> RetinaFaceOutput:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ShapeError(f"RetinaFace expects B×3×H×W RGB images, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ShapeError(f"RetinaFace expects float input in [0, 1], got {x.dtype}")
        if min(x.shape[-2:]) < 32:
            raise ShapeError(f"RetinaFace needs images of at least 32×32 pixels, got {tuple(x.shape[-2:])}")
        feats = self.fpn(self.body(self.preprocess(x)))
        feats = [self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2])]
        return RetinaFaceOutput(
            loc=torch.cat([head(f) for head, f in zip(self.BboxHead, feats)], dim=1),
            logits=torch.cat([head(f) for head, f in zip(self.ClassHead, feats)], dim=1),
            landmarks=torch.cat([head(f) for head, f in zip(self.LandmarkHead, feats)], dim=1),
        )


def load_retinaface(path: str | Path | None = None, device: str | torch.device = "cpu") -> RetinaFace:
    """RetinaFace with the released weights (fetched and verified through the asset cache), in eval mode.

    Args:
        path: a state_dict file; default: the catalogued ``retinaface-mnet025/mobilenet0.25_Final.pth``.
        device: where to put the network.
    """
    if path is None:
        from faceshield.models.assets import fetch

        path = fetch(WEIGHTS_ASSET)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    # Checkpoints saved from nn.DataParallel carry a "module." prefix on every key.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = RetinaFace()
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- anchors and decoding --------------------------------------------------------------------------------------
def anchors(height: int, width: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The N×3 anchors (cx, cy, side) in pixels for an input of ``height``×``width``, in the heads' order."""
    per_level = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid(
            (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * step,
            (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * step,
            indexing="ij",
        )
        side = torch.tensor(sizes, dtype=torch.float32, device=device)
        k = len(sizes)
        per_level.append(torch.stack([
            cx.reshape(-1, 1).expand(-1, k),
            cy.reshape(-1, 1).expand(-1, k),
            side.view(1, k).expand(rows * cols, k),
        ], dim=-1).reshape(-1, 3))
    return torch.cat(per_level, dim=0)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Box offsets ``…×N×4`` + anchors ``N×3`` (cx, cy, side) → boxes ``…×N×4`` (x0, y0, x1, y1), pixels."""
    if loc.shape[-1] != 4 or loc.shape[-2] != priors.shape[0] or priors.shape[-1] != 3:
        raise ShapeError(
            f"decode_boxes: loc …×N×4 and anchors N×3 expected, got {tuple(loc.shape)}, {tuple(priors.shape)}"
        )
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def decode_landmarks(
    pre: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = VARIANCES
) -> torch.Tensor:
    """Landmark offsets ``…×N×10`` + anchors ``N×3`` → landmarks ``…×N×5×2`` (x, y) in pixels."""
    if pre.shape[-1] != 10 or pre.shape[-2] != priors.shape[0] or priors.shape[-1] != 3:
        raise ShapeError(
            f"decode_landmarks: …×N×10 and anchors N×3 expected, got {tuple(pre.shape)}, {tuple(priors.shape)}"
        )
    offsets = pre.reshape(*pre.shape[:-1], 5, 2)
    return priors[:, None, :2] + offsets * variances[0] * priors[:, None, 2:]


# --- detector --------------------------------------------------------------------------------------------------
class RetinaFaceDetector:
    """:class:`~faceshield.faces.detect.FaceDetector` backed by RetinaFace-MobileNet0.25.

    The network was trained on 640-pixel crops and its anchors stop at 512 px: a face much larger than
    that in its input is not found whole but as several confident fragments (measured: a CelebA-HQ face
    upscaled to 1280² gives its best box at 0.7× the face's width plus three fragments scoring 0.7–0.9).
    So images whose longer side exceeds ``coarse_side`` are searched twice: a copy downscaled to
    ``coarse_side`` provides every face it sees, and the full-resolution pass only adds faces smaller than
    ``small_face`` pixels *of that copy* (which the copy may miss). Both lists are merged by NMS.

    Args:
        device: torch device for the network.
        score_threshold: candidates below this face probability are dropped before NMS (keep it low:
            :func:`~faceshield.faces.detect.detect_faces` applies the user's ``min_score`` afterwards).
        nms_threshold: IoU above which a lower-scored box is suppressed (0.4, the reference's value).
        top_k: at most this many candidates per pass, best first, enter NMS.
        coarse_side: longer side of the coarse pass; None searches at full resolution only.
        small_face: the full-resolution pass contributes faces whose longer box side is below this many
            pixels of the coarse copy.
        weights: optional state_dict path instead of the catalogued file.
    """

    name = "retinaface"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        top_k: int = 5000,
        coarse_side: int | None = 640,
        small_face: float = 64.0,
        weights: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = load_retinaface(weights, self.device)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.coarse_side = coarse_side
        self.small_face = small_face
        self._anchor_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _anchors(self, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 16:
                self._anchor_cache.clear()
            self._anchor_cache[key] = anchors(height, width, self.device)
        return self._anchor_cache[key]

    def _candidates(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scored candidates before NMS: boxes K×4, scores K, landmarks K×5×2, in ``image`` pixels."""
        h, w = image.shape[:2]
        if min(h, w) < 32:
            # Pad tiny images instead of refusing them: the backbone needs 32 px for its stride-32 level.
            padded = np.zeros((max(h, 32), max(w, 32), 3), dtype=np.uint8)
            padded[:h, :w] = image
            image = padded
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        out = self.model(x)
        priors = self._anchors(*image.shape[:2])
        if priors.shape[0] != out.loc.shape[1]:
            raise RuntimeError(f"anchor count {priors.shape[0]} != network outputs {out.loc.shape[1]}")
        scores = out.scores[0]
        keep = torch.nonzero(scores >= self.score_threshold).squeeze(1)
        keep = keep[scores[keep].argsort(descending=True)[: self.top_k]]
        boxes = decode_boxes(out.loc[0, keep], priors[keep])
        return boxes, scores[keep], decode_landmarks(out.landmarks[0, keep], priors[keep])

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` (H×W×3 uint8 RGB), best score first; coordinates in ``image`` pixels."""
        check_image(image)
        boxes, scores, landmarks = self._candidates(image)
        if self.coarse_side is not None and max(image.shape[:2]) > self.coarse_side:
            coarse, sx, sy = downscale(image, self.coarse_side)
            coarse_size = (boxes[:, 2:] - boxes[:, :2]) / torch.tensor([sx, sy], device=self.device)
            small = coarse_size.amax(dim=1) < self.small_face
            c_boxes, c_scores, c_landmarks = self._candidates(coarse)
            boxes = torch.cat([boxes[small], c_boxes * torch.tensor([sx, sy, sx, sy], device=self.device)])
            landmarks = torch.cat([landmarks[small], c_landmarks * torch.tensor([sx, sy], device=self.device)])
            scores = torch.cat([scores[small], c_scores])
        if scores.numel() == 0:
            return []
        kept = nms(boxes, scores, self.nms_threshold)
        boxes, scores, landmarks = boxes[kept].cpu().numpy(), scores[kept].cpu().numpy(), landmarks[kept].cpu().numpy()
        return [
            Face(box=tuple(float(v) for v in b), score=float(s), landmarks=lm.astype(np.float32))
            for b, s, lm in zip(boxes, scores, landmarks)
        ]
