"""ArcFace IR-SE50 (TreB1eN/InsightFace_Pytorch ``model_ir_se50.pth``), weights supplied by the user by path.

The checkpoint that pSp, e4e and Diff-Privacy load for their identity losses: TreB1eN's ``Backbone(50, 0.6,
'ir_se')`` trained with ArcFace loss on MS1M (the InsightFace "emore" set). This module rebuilds that network in
plain torch with the **same parameter names and shapes**, so the public file loads as it is
(:func:`faceshield.models.checkpoint.load_state_dict_exact` refuses any other file in one line).

Architecture (parameter names in brackets):

* ``input_layer``: Conv 3→64 3×3 s1 p1 (no bias) [0] → BatchNorm [1] → PReLU(64) [2];
* ``body``: 24 ``bottleneck_IR_SE`` units in 4 stages of (3, 4, 14, 3) units and depths (64, 128, 256, 512); the
  first unit of each stage has stride 2. A unit is ``res_layer`` = BN(in) [0] → Conv in→d 3×3 s1 [1] → PReLU(d) [2]
  → Conv d→d 3×3 s(stride) [3] → BN(d) [4] → SE [5] (``fc1`` Conv d→d/16 1×1, ReLU, ``fc2`` Conv d/16→d 1×1,
  sigmoid, multiplying the global average), plus ``shortcut_layer``: MaxPool(1, stride) when in = d, else
  Conv in→d 1×1 s(stride) [0] → BN [1]. Convs have no bias.
* ``output_layer``: BN(512) [0] → Dropout [1] → Flatten [2] → Linear 512·7·7→512 [3] → BatchNorm1d(512) [4];
  the embedding is L2-normalised.

Input: 112×112 **RGB**, ``(x − 0.5) / 0.5`` on [0, 1] (TreB1eN's ``test_transform``: ``ToTensor`` then
``Normalize([0.5]*3, [0.5]*3)``; pSp feeds its [−1, 1] images directly), faces aligned to the ArcFace 5-point
template (TreB1eN's ``mtcnn.align`` warps to InsightFace's ``REFERENCE_FACIAL_POINTS`` for 112×112, i.e.
:data:`~faceshield.models.registry.ARCFACE_112`). 512-D output.

Validated against facexlib 0.3.0's ``recognition/arcface_arch.py`` (TreB1eN's ``Backbone`` as shipped on PyPI) with
random weights in the checkpoint's layout: ``benchmarks/validate_by_path_models.py``, ``tests/test_by_path_models.py``.
**Not calibrated**: never a default surrogate or judge (the shipped calibration table does not list it).
"""

from __future__ import annotations

import torch
from torch import nn

from faceshield.models import assets
from faceshield.models.checkpoint import load_state_dict_exact, read_state_dict
from faceshield.models.registry import ARCFACE_112, FRModelConfig, register_fr_model

WEIGHTS_ASSET = "arcface-ir-se50/model_ir_se50.pth"
STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))  # (in, depth, units); first unit stride 2

CONFIG = FRModelConfig(
    name="arcface-ir-se50",
    embedding_dim=512,
    input_size=112,
    template=ARCFACE_112,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    channel_order="RGB",
    assets=(WEIGHTS_ASSET,),
    licence="MIT (TreB1eN/InsightFace_Pytorch code and released weights); trained on MS1M (research dataset)",
    source="github TreB1eN/InsightFace_Pytorch: model_ir_se50.pth (Backbone(50, 0.6, 'ir_se')), as used by "
           "pSp/e4e/Diff-Privacy; weights by path",
    reference="facexlib 0.3.0 recognition/arcface_arch.py Backbone (random weights, tests/data fixture)",
    description="ArcFace IR-SE50, 512-D; weights supplied by the user; uncalibrated",
    extra={"weights_asset": WEIGHTS_ASSET},
)


class SqueezeExcite(nn.Module):
    """Channel attention ``x · σ(fc2(relu(fc1(mean(x)))))`` with 1×1 convs (no bias), reduction 16."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(w)


class BottleneckIRSE(nn.Module):
    """Pre-activation residual unit with SE; stride on the second conv and on the shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # subsampling only (no parameters)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SqueezeExcite(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """``B×3×112×112`` normalised RGB → ``B×512`` raw embeddings (L2 normalisation is the zoo wrapper's)."""

    def __init__(self, dropout: float = 0.6):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units = []
        for in_channels, depth, count in STAGES:
            units.append(BottleneckIRSE(in_channels, depth, 2))
            units.extend(BottleneckIRSE(depth, depth, 1) for _ in range(count - 1))
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(dropout), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def load_ir_se50(path: str) -> IRSE50:
    """IR-SE50 with the weights of checkpoint ``path`` (TreB1eN's key layout), in eval mode."""
    network = IRSE50()
    load_state_dict_exact(network, read_state_dict(path, "ArcFace IR-SE50"), path, "ArcFace IR-SE50 (model_ir_se50.pth)")
    return network.eval()


@register_fr_model(CONFIG)
def build_ir_se50(config: FRModelConfig, weights: str | None = None) -> nn.Module:
    """The bare network with the user's weights (``weights`` path, else found as asset :data:`WEIGHTS_ASSET`)."""
    return load_ir_se50(str(assets.user_file(WEIGHTS_ASSET, weights)))
