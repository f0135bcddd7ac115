"""FaceNet InceptionResnetV1 (facenet-pytorch ``20180402-114759-vggface2.pt`` / ``20180408-102900-casia-webface.pt``),
weights supplied by the user by path.

David Sandberg's TensorFlow FaceNet models (VGGFace2 and CASIA-WebFace, softmax + centre loss), converted to
PyTorch by facenet-pytorch (Tim Esler; MIT). This module rebuilds ``InceptionResnetV1`` in plain torch with the
**same parameter names and shapes**, so the released files load as they are; their classifier head (``logits.*``:
8631 VGGFace2 / 10575 CASIA classes) is accepted and not used.

Architecture (facenet-pytorch names): stem ``conv2d_1a`` 3→32 3×3 s2, ``conv2d_2a`` 32→32 3×3, ``conv2d_2b`` 32→64
3×3 p1, max-pool 3 s2, ``conv2d_3b`` 64→80 1×1, ``conv2d_4a`` 80→192 3×3, ``conv2d_4b`` 192→256 3×3 s2; ``repeat_1``
5× Block35 (scale 0.17), ``mixed_6a`` (→896), ``repeat_2`` 10× Block17 (scale 0.10), ``mixed_7a`` (→1792),
``repeat_3`` 5× Block8 (scale 0.20), ``block8`` (scale 1, no ReLU), global average pool, ``last_linear`` 1792→512
(no bias), ``last_bn`` (BatchNorm1d, eps 1e-3). Every ``BasicConv2d`` is conv (no bias) → BN (eps 1e-3) → ReLU.

Input: 160×160 **RGB**, ``fixed_image_standardization`` = ``(x·255 − 127.5) / 128``. 512-D output (L2-normalised by
the zoo wrapper, as ``InceptionResnetV1.forward`` does).

**Alignment.** facenet-pytorch does not align: it crops MTCNN's final (regressed, not squared) box, with
``margin=0`` by default, and resizes it to 160×160. Our zoo aligns every model with a similarity transform to a
5-point template, so :data:`FACENET_160` is the mean position of MTCNN's five landmarks inside that 160×160 box
crop, measured with our MTCNN (the same Zhang et al. P/R/O-net weights and box regression as facenet-pytorch) on
real faces: ``benchmarks/validate_by_path_models.py --derive-template`` (the faces and the spread are in
docs/models.md). A similarity alignment cannot reproduce the per-face anisotropic squash of a non-square box; the
template reproduces its average geometry.

Validated against facenet-pytorch 2.6.0's ``models/inception_resnet_v1.py`` with random weights in the released
checkpoints' layout (``tests/test_by_path_models.py``). **Not calibrated**: never a default surrogate or judge.
"""

from __future__ import annotations

import torch
from torch import nn

from faceshield.models import assets
from faceshield.models.checkpoint import load_state_dict_exact, read_state_dict
from faceshield.models.registry import FRModelConfig, Landmarks5, register_fr_model

# Mean MTCNN landmarks in facenet-pytorch's 160×160 crop of the MTCNN box (margin 0); pixel centres at integers.
# Measured on 218 faces (200 CelebA-HQ, 12 VGGFace2, 6 target photos); per-point std 11–21 px across, 4–6 px down
# (pose: the box follows the head outline, the landmarks turn with the face).
FACENET_160: Landmarks5 = (
    (44.5880, 64.0552),
    (118.3686, 63.7435),
    (80.9527, 98.0719),
    (49.1240, 121.4730),
    (114.5510, 120.9512),
)

CLASSES = {"vggface2": 8631, "casia-webface": 10575}  # rows of the released files' unused ``logits`` head
FILES = {"vggface2": "20180402-114759-vggface2.pt", "casia-webface": "20180408-102900-casia-webface.pt"}
_RELEASE = "github timesler/facenet-pytorch release v2.2.9"


class BasicConv2d(nn.Sequential):
    """Conv (no bias) → BatchNorm (eps 1e-3, TensorFlow's) → ReLU, named ``conv`` / ``bn`` as facenet-pytorch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU()


class _Residual(nn.Module):
    """``relu(x + scale · conv2d(cat(branches)))`` (no ReLU for the final ``block8``)."""

    def __init__(self, branches: list[nn.Module], mixed: int, channels: int, scale: float, relu: bool = True):
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)
        self.count = len(branches)
        self.conv2d = nn.Conv2d(mixed, channels, 1)
        self.scale = scale
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.count)], 1)
        out = x + self.scale * self.conv2d(mixed)
        return torch.relu(out) if self.relu else out


def block35(scale: float) -> _Residual:
    return _Residual([
        BasicConv2d(256, 32, 1),
        nn.Sequential(BasicConv2d(256, 32, 1), BasicConv2d(32, 32, 3, padding=1)),
        nn.Sequential(BasicConv2d(256, 32, 1), BasicConv2d(32, 32, 3, padding=1), BasicConv2d(32, 32, 3, padding=1)),
    ], 96, 256, scale)


def block17(scale: float) -> _Residual:
    return _Residual([
        BasicConv2d(896, 128, 1),
        nn.Sequential(BasicConv2d(896, 128, 1), BasicConv2d(128, 128, (1, 7), padding=(0, 3)),
                      BasicConv2d(128, 128, (7, 1), padding=(3, 0))),
    ], 256, 896, scale)


def block8(scale: float, relu: bool = True) -> _Residual:
    return _Residual([
        BasicConv2d(1792, 192, 1),
        nn.Sequential(BasicConv2d(1792, 192, 1), BasicConv2d(192, 192, (1, 3), padding=(0, 1)),
                      BasicConv2d(192, 192, (3, 1), padding=(1, 0))),
    ], 384, 1792, scale, relu)


class _Concat(nn.Module):
    """Reduction block: the branches side by side (the last one a parameter-free 3×3 s2 max-pool)."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)
        self.count = len(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.count)], 1)


class InceptionResnetV1(nn.Module):
    """``B×3×160×160`` standardised RGB → ``B×512`` raw embeddings (before L2 normalisation)."""

    def __init__(self):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*(block35(0.17) for _ in range(5)))
        self.mixed_6a = _Concat([
            BasicConv2d(256, 384, 3, stride=2),
            nn.Sequential(BasicConv2d(256, 192, 1), BasicConv2d(192, 192, 3, padding=1),
                          BasicConv2d(192, 256, 3, stride=2)),
            nn.MaxPool2d(3, stride=2),
        ])
        self.repeat_2 = nn.Sequential(*(block17(0.10) for _ in range(10)))
        self.mixed_7a = _Concat([
            nn.Sequential(BasicConv2d(896, 256, 1), BasicConv2d(256, 384, 3, stride=2)),
            nn.Sequential(BasicConv2d(896, 256, 1), BasicConv2d(256, 256, 3, stride=2)),
            nn.Sequential(BasicConv2d(896, 256, 1), BasicConv2d(256, 256, 3, padding=1),
                          BasicConv2d(256, 256, 3, stride=2)),
            nn.MaxPool2d(3, stride=2),
        ])
        self.repeat_3 = nn.Sequential(*(block8(0.20) for _ in range(5)))
        self.block8 = block8(1.0, relu=False)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b,
                      self.conv2d_4a, self.conv2d_4b, self.repeat_1, self.mixed_6a, self.repeat_2, self.mixed_7a,
                      self.repeat_3, self.block8):
            x = stage(x)
        return self.last_bn(self.last_linear(x.mean((2, 3))))


def checkpoint_layout(network: InceptionResnetV1, dataset: str) -> dict[str, torch.Tensor]:
    """The key layout of the released file for ``dataset``: our tensors plus its ``logits`` head."""
    return {**network.state_dict(), "logits.weight": torch.empty(CLASSES[dataset], 512),
            "logits.bias": torch.empty(CLASSES[dataset])}


def load_facenet(path: str) -> InceptionResnetV1:
    """InceptionResnetV1 with the weights of checkpoint ``path`` (facenet-pytorch's key layout), in eval mode."""
    network = InceptionResnetV1()
    load_state_dict_exact(network, read_state_dict(path, "FaceNet"), path, "FaceNet InceptionResnetV1 (facenet-pytorch)",
                          ignore_prefixes=("logits.",))
    return network.eval()


def _config(dataset: str) -> FRModelConfig:
    asset = f"facenet-{dataset}/{FILES[dataset]}"
    return FRModelConfig(
        name=f"facenet-{dataset}",
        embedding_dim=512,
        input_size=160,
        template=FACENET_160,
        mean=(127.5 / 255,) * 3,
        std=(128 / 255,) * 3,
        channel_order="RGB",
        assets=(asset,),
        licence=f"MIT (facenet-pytorch; davidsandberg/facenet); trained on {dataset} (research dataset)",
        source=f"{_RELEASE}: {FILES[dataset]} (InceptionResnetV1(pretrained={dataset!r})); weights by path",
        reference="facenet-pytorch 2.6.0 models/inception_resnet_v1.py (random weights, tests/data fixture)",
        description=f"FaceNet InceptionResnetV1 ({dataset}), 512-D; weights supplied by the user; uncalibrated",
        extra={"weights_asset": asset},
    )


for _dataset in FILES:
    def _build(config: FRModelConfig, weights: str | None = None) -> nn.Module:
        """The bare network with the user's weights (``weights`` path, else found as the config's asset)."""
        return load_facenet(str(assets.user_file(config.weights_asset, weights)))

    register_fr_model(_config(_dataset))(_build)
