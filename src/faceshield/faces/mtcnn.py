"""MTCNN (Zhang et al. 2016): a cascade of three small CNNs giving face boxes, scores and 5 landmarks.

Weights: ``mtcnn/det{1,2,3}.npy``, numpy dicts ``{layer: {"weights" | "biases" | "alpha": array}}`` in the
TensorFlow layout of FaceNet's ``align/detect_face.py`` port of the original Caffe models: conv kernels
``kh×kw×in×out``, fully connected ``in×out``, PReLU slopes per channel. Conventions of that port, kept here:

* input RGB, normalised as ``(v − 127.5) / 128`` for v in 0..255;
* the networks were trained (in Caffe, from MATLAB's column-major images) on *transposed* images, so every
  input is transposed H↔W before the network and the maps are transposed back after it; the fully
  connected layers flatten the transposed NHWC map (order: image-x, image-y, channel);
* TensorFlow "SAME" max pooling (extra padding at the end) equals PyTorch ``ceil_mode=True`` for these
  sizes; "VALID" pooling equals the default floor mode;
* outputs: face probability = softmax channel 1; box regression (dx0, dy0, dx1, dy1) in units of the box's
  width / height; O-net landmarks as (x0..x4, y0..y4) fractions of the box, order image-left eye,
  image-right eye, nose, image-left mouth corner, image-right mouth corner (faceshield's order).

The cascade (pyramid with factor 0.709 from 12-px P-net windows, thresholds 0.6 / 0.7 / 0.7, NMS 0.5 within
a scale, 0.7 across scales and after R-net, 0.7 intersection-over-minimum after O-net, square crops) follows
the paper and that port, written here with continuous pixel coordinates (pixel i spans [i, i + 1)).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from faceshield.errors import ShapeError
from faceshield.faces.detect import Face, check_image, nms

log = logging.getLogger(__name__)

WEIGHT_ASSETS = ("mtcnn/det1.npy", "mtcnn/det2.npy", "mtcnn/det3.npy")


class _CascadeNet(nn.Module):
    """Shared pre/post-processing: RGB [0, 1] in image orientation → normalised, transposed input."""

    def prepare(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ShapeError(
                f"{type(self).__name__} expects B×3×H×W float RGB in [0, 1], got {tuple(x.shape)} {x.dtype}"
            )
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            raise ShapeError(f"{type(self).__name__} expects {size}×{size} crops, got {tuple(x.shape[-2:])}")
        # contiguous: convolutions on a transposed view take a slower path.
        return ((x * 255.0 - 127.5) / 128.0).transpose(2, 3).contiguous()

    @staticmethod
    def flatten(x: torch.Tensor) -> torch.Tensor:
        # The fully connected weights expect TensorFlow's NHWC flattening of the transposed map.
        return x.permute(0, 2, 3, 1).flatten(1)


class PNet(_CascadeNet):
    """Proposal net, fully convolutional on a whole pyramid level.

    ``forward(x)``: ``x`` B×3×H×W RGB in [0, 1] (H, W ≥ 12) → (face probability B×H'×W',
    regression B×4×H'×W'), H' = ⌈(H − 2)/2⌉ − 4: one cell per 12×12 window at stride 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.score = nn.Conv2d(32, 2, 1)
        self.regression = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pool1(self.prelu1(self.conv1(self.prepare(x))))
        h = self.prelu3(self.conv3(self.prelu2(self.conv2(h))))
        prob = self.score(h).softmax(dim=1)[:, 1]
        return prob.transpose(1, 2), self.regression(h).transpose(2, 3)


class RNet(_CascadeNet):
    """Refinement net on 24×24 crops: ``forward(x)`` B×3×24×24 → (face probability B, regression B×4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.score = nn.Linear(128, 2)
        self.regression = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pool1(self.prelu1(self.conv1(self.prepare(x, 24))))
        h = self.pool2(self.prelu2(self.conv2(h)))
        h = self.prelu4(self.fc(self.flatten(self.prelu3(self.conv3(h)))))
        return self.score(h).softmax(dim=1)[:, 1], self.regression(h)


class ONet(_CascadeNet):
    """Output net on 48×48 crops: ``forward(x)`` B×3×48×48 → (face probability B, regression B×4,
    landmarks B×10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.score = nn.Linear(256, 2)
        self.regression = nn.Linear(256, 4)
        self.landmarks = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.pool1(self.prelu1(self.conv1(self.prepare(x, 48))))
        h = self.pool2(self.prelu2(self.conv2(h)))
        h = self.pool3(self.prelu3(self.conv3(h)))
        h = self.prelu5(self.fc(self.flatten(self.prelu4(self.conv4(h)))))
        return self.score(h).softmax(dim=1)[:, 1], self.regression(h), self.landmarks(h)


# Our module name -> the layer name in det{1,2,3}.npy.
_LAYER_NAMES = {
    PNet: {"conv1": "conv1", "prelu1": "PReLU1", "conv2": "conv2", "prelu2": "PReLU2", "conv3": "conv3",
           "prelu3": "PReLU3", "score": "conv4-1", "regression": "conv4-2"},
    RNet: {"conv1": "conv1", "prelu1": "prelu1", "conv2": "conv2", "prelu2": "prelu2", "conv3": "conv3",
           "prelu3": "prelu3", "fc": "conv4", "prelu4": "prelu4", "score": "conv5-1", "regression": "conv5-2"},
    ONet: {"conv1": "conv1", "prelu1": "prelu1", "conv2": "conv2", "prelu2": "prelu2", "conv3": "conv3",
           "prelu3": "prelu3", "conv4": "conv4", "prelu4": "prelu4", "fc": "conv5", "prelu5": "prelu5",
           "score": "conv6-1", "regression": "conv6-2", "landmarks": "conv6-3"},
}


def load_cascade_net(cls: type[_CascadeNet], path: str | Path) -> _CascadeNet:
    """Build ``cls`` (PNet, RNet or ONet) and copy the weights of a FaceNet-layout ``det*.npy`` into it."""
    weights = np.load(path, allow_pickle=True, encoding="latin1").item()
    net = cls()
    used = set()
    for module_name, layer in _LAYER_NAMES[cls].items():
        module = getattr(net, module_name)
        params = weights[layer]
        used.add(layer)
        with torch.no_grad():
            if isinstance(module, nn.PReLU):
                module.weight.copy_(torch.from_numpy(params["alpha"]))
                continue
            w = torch.from_numpy(params["weights"])
            if isinstance(module, nn.Conv2d):
                w = w.permute(3, 2, 0, 1)  # kh×kw×in×out → out×in×kh×kw
            else:
                w = w.t()  # in×out → out×in
            if w.shape != module.weight.shape:
                raise ShapeError(
                    f"{Path(path).name}:{layer}: weight {tuple(w.shape)} does not fit {tuple(module.weight.shape)}"
                )
            module.weight.copy_(w)
            module.bias.copy_(torch.from_numpy(params["biases"]))
    if set(weights) - used:
        raise ShapeError(f"{Path(path).name}: unused layers {sorted(set(weights) - used)}")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes N×4 → squares of side max(w, h) with the same centres."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values
    return torch.cat([centre - side / 2, centre + side / 2], dim=1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN box regression: each edge moves by its offset times the box's width (x) or height (y)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + reg * size


class MTCNNDetector:
    """:class:`~faceshield.faces.detect.FaceDetector` running the MTCNN cascade in PyTorch.

    Args:
        device: torch device for the three networks.
        min_face: smallest face side searched for, in pixels (sets the first pyramid scale 12 / min_face).
        factor: pyramid scale step.
        thresholds: face-probability thresholds of P-, R- and O-net.
    """

    name = "mtcnn"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face: int = 20,
        factor: float = 0.709,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    ) -> None:
        from faceshield.models.assets import fetch

        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = (
            load_cascade_net(cls, fetch(asset)).to(self.device) for cls, asset in zip((PNet, RNet, ONet), WEIGHT_ASSETS)
        )
        self.min_face = min_face
        self.factor = factor
        self.thresholds = thresholds

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(image, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None].float() / 255.0

    def _crops(self, pil: Image.Image, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """``size``×``size`` crops of (rounded) ``boxes``; parts outside the image are black, as in training."""
        crops = []
        for x0, y0, x1, y1 in boxes.round().to(torch.int64).tolist():
            x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
            # PIL fills the outside of the image with zeros; its resize is antialiased for downscaling.
            crops.append(np.asarray(pil.crop((x0, y0, x1, y1)).resize((size, size), Image.BILINEAR)))
        return torch.from_numpy(np.stack(crops)).to(self.device).permute(0, 3, 1, 2).float() / 255.0

    def _stage1(self, image: np.ndarray, pil: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[:2]
        scale = 12.0 / self.min_face
        all_boxes, all_scores = [], []
        while min(h, w) * scale >= 12:
            sh, sw = math.ceil(h * scale), math.ceil(w * scale)
            level = self._to_tensor(np.asarray(pil.resize((sw, sh), Image.BILINEAR)))
            prob, reg = self.pnet(level)
            rows, cols = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            if rows.numel():
                # Cell (i, j) sees the 12×12 window at (2j, 2i) of this level; map it back to the image.
                x0, y0 = cols.float() * 2 / scale, rows.float() * 2 / scale
                boxes = torch.stack([x0, y0, x0 + 12 / scale, y0 + 12 / scale], dim=1)
                boxes = _regress(boxes, reg[0, :, rows, cols].t())
                scores = prob[0, rows, cols]
                keep = nms(boxes, scores, 0.5)
                all_boxes.append(boxes[keep])
                all_scores.append(scores[keep])
            scale *= self.factor
        if not all_boxes:
            return torch.zeros(0, 4, device=self.device), torch.zeros(0, device=self.device)
        boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
        keep = nms(boxes, scores, 0.7)
        return boxes[keep], scores[keep]

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` (H×W×3 uint8 RGB), best score first; coordinates in ``image`` pixels."""
        check_image(image)
        pil = Image.fromarray(np.ascontiguousarray(image))
        boxes, _ = self._stage1(image, pil)
        if boxes.shape[0] == 0:
            return []

        boxes = _square(boxes)
        prob, reg = self.rnet(self._crops(pil, boxes, 24))
        keep = prob >= self.thresholds[1]
        boxes, prob, reg = boxes[keep], prob[keep], reg[keep]
        if boxes.shape[0] == 0:
            return []
        keep = nms(boxes, prob, 0.7)
        boxes = _square(_regress(boxes[keep], reg[keep]))

        prob, reg, marks = self.onet(self._crops(pil, boxes, 48))
        keep = prob >= self.thresholds[2]
        boxes, prob, reg, marks = boxes[keep], prob[keep], reg[keep], marks[keep]
        if boxes.shape[0] == 0:
            return []
        # Landmarks are fractions of the (square) crop box, x's first then y's.
        size = boxes[:, 2:] - boxes[:, :2]
        landmarks = torch.stack([boxes[:, None, 0] + marks[:, :5] * size[:, None, 0],
                                 boxes[:, None, 1] + marks[:, 5:] * size[:, None, 1]], dim=-1)
        boxes = _regress(boxes, reg)
        keep = nms(boxes, prob, 0.7, overlap="min")
        boxes, prob, landmarks = boxes[keep].cpu().numpy(), prob[keep].cpu().numpy(), landmarks[keep].cpu().numpy()
        return [
            Face(box=tuple(float(v) for v in b), score=float(s), landmarks=lm.astype(np.float32))
            for b, s, lm in zip(boxes, prob, landmarks)
        ]
