"""BiSeNet face parsing (zllrunning/face-parsing.PyTorch ``79999_iter.pth``), weights supplied by the user by path.

The face-parsing network Diff-Privacy uses for its background mask: BiSeNet with a ResNet-18 context path (its
spatial path replaced by the ResNet's 1/8 features), trained on CelebAMask-HQ's 19 classes (:data:`CLASSES`). This
module rebuilds it in plain torch with the **same parameter names and shapes**, so the public file loads as it is;
it never downloads the ImageNet ResNet-18 that the original constructor fetches (the checkpoint holds every weight).

Input: 512×512 RGB, ImageNet mean/std (the reference's ``transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224,
0.225))`` after resizing the photo to 512×512). Output: 19 class logits at the input resolution (the main head;
the two auxiliary heads are training-only and not computed).

**Which classes are "face".** Diff-Privacy (``generate_mask.py``, ``vis_parsing_maps``) keeps the pixels of class 0
(background) and regenerates every other class: skin, brows, eyes, glasses, ears, earrings, nose, mouth, lips,
neck, necklace, cloth, hair and hat. :data:`DIFF_PRIVACY_FACE` is that set; the soft mask is the summed softmax
probability of the chosen classes (``1 − p(background)`` for Diff-Privacy's choice).

Validated against facexlib 0.3.0's ``parsing/bisenet.py`` (the same network and key layout as zllrunning's
``model.py``; its global pools are ``avg_pool2d`` over the whole map, zllrunning's ``adaptive_avg_pool2d(1)``: the
same operation) with random weights in the checkpoint's layout (``tests/test_by_path_models.py``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from faceshield.errors import ShapeError
from faceshield.models import assets
from faceshield.models.checkpoint import load_state_dict_exact, read_state_dict

log = logging.getLogger(__name__)

WEIGHTS_ASSET = "face-parsing-bisenet/79999_iter.pth"
INPUT_SIZE = 512
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CLASSES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r", "nose",
           "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
DIFF_PRIVACY_FACE: tuple[int, ...] = tuple(range(1, len(CLASSES)))  # everything but the background


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU, named ``conv`` / ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; ``downsample`` (1×1 conv + BN) when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 feature maps (128, 256, 512 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    """``feat · σ(BN(conv(mean(feat))))`` with ``feat = ConvBNReLU(x)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))


class ContextPath(nn.Module):
    """ResNet-18 with attention refinement of the 1/32 and 1/16 maps and a global context term, brought to 1/8."""

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(feat32.mean((2, 3), keepdim=True))  # broadcast = nearest upsampling of a 1×1 map
        up32 = self.conv_head32(F.interpolate(self.arm32(feat32) + context, feat16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest"))
        return feat8, up16


class FeatureFusion(nn.Module):
    """``f + f·σ(conv2(relu(conv1(mean(f)))))`` with ``f = ConvBNReLU(cat(spatial, context))``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, 1, 1, 0)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], 1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat + feat * attention


class ParsingHead(nn.Module):
    """ConvBNReLU 3×3 then a 1×1 conv (no bias) to the class logits."""

    def __init__(self, in_channels: int, mid_channels: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels)
        self.conv_out = nn.Conv2d(mid_channels, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """``B×3×H×W`` ImageNet-normalised RGB → ``B×19×H×W`` class logits (the main head, bilinearly upsampled with
    ``align_corners=True`` as the reference). The auxiliary heads ``conv_out16``/``conv_out32`` exist for the key
    layout only."""

    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = ParsingHead(256, 256, classes)
        self.conv_out16 = ParsingHead(128, 64, classes)
        self.conv_out32 = ParsingHead(128, 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8 = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet(path: str) -> BiSeNet:
    """BiSeNet with the weights of checkpoint ``path`` (zllrunning's key layout), in eval mode, frozen."""
    network = BiSeNet()
    load_state_dict_exact(network, read_state_dict(path, "BiSeNet face parsing"), path,
                          "BiSeNet face-parsing (79999_iter.pth)")
    for p in network.parameters():
        p.requires_grad_(False)
    return network.eval()


class FaceParser(nn.Module):
    """Soft face masks of photos or crops from BiSeNet parsing.

    Args:
        network: a loaded :class:`BiSeNet`.
        classes: class indices that count as face (default :data:`DIFF_PRIVACY_FACE`: all but the background).
    """

    def __init__(self, network: BiSeNet, classes: tuple[int, ...] = DIFF_PRIVACY_FACE):
        super().__init__()
        self.network = network
        self.classes = tuple(classes)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``B×19×512×512`` logits of ``images`` ``B×3×H×W`` float RGB in [0, 1] (resized to 512² bilinearly)."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ShapeError(f"face parsing expects float images B×3×H×W in [0, 1], got {tuple(images.shape)} "
                             f"{images.dtype}")
        x = images.to(self.mean)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, (INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.network((x - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Soft face mask ``B×1×H×W`` in [0, 1] of ``images`` ``B×3×H×W`` RGB in [0, 1]: the summed probability of
        :attr:`classes`, at the images' resolution."""
        probs = self.logits(images).softmax(1)[:, list(self.classes)].sum(1, keepdim=True)
        if probs.shape[-2:] != images.shape[-2:]:
            probs = F.interpolate(probs, images.shape[-2:], mode="bilinear", align_corners=False)
        return probs.clamp(0, 1)


def load_face_parser(path: str = "", device: str = "cpu") -> FaceParser:
    """The face parser with BiSeNet weights from ``path`` (empty: the asset :data:`WEIGHTS_ASSET`, found through
    ``$FACESHIELD_WEIGHTS`` or a mirror folder), built once per resolved file and device.

    Raises:
        AssetError: one line naming the file, where to get it and how to pass it.
    """
    return _parser(str(assets.user_file(WEIGHTS_ASSET, path or None)), device)


@functools.lru_cache(maxsize=4)
def _parser(file: str, device: str) -> FaceParser:
    return FaceParser(load_bisenet(file)).to(device)
