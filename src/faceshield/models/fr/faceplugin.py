"""Faceplugin's MobileFaceNet (npm ``faceplugin-face-recognition-js`` 0.0.1, ``model/fr_feature.onnx``), run in PyTorch.

The graph (opset 9: 50 Conv with BatchNorm folded in, 33 PRelu, 12 Add, 1 Reshape) maps a 1×3×112×112
normalised face to a 512-D embedding (not L2-normalised by the graph). It is executed by our ONNX interpreter
:mod:`faceshield.models.graphs.onnx` and validated against onnxruntime on real aligned faces
(``tests/test_onnx_models.py``).

Preprocessing, read off the package's own code (``lib/fr_feature.js``):

* ``alignFeatureImage`` warps the photo with ``cv.getAffineTransform`` from three of the five landmarks onto
  ``REFERENCE_FACIAL_POINTS``, which are ArcFace's 112×112 template (:data:`~faceshield.models.registry.ARCFACE_112`);
  we align with all five points (a similarity transform), as for every other ArcFace-template model;
* ``preprocessFeature`` takes the canvas pixels in their RGBA order, channels 0–2 = **RGB**, as
  ``(pixel − 127) / 128`` into an NCHW tensor.

The training data of this network is not stated by the package.
"""

from __future__ import annotations

import logging

from torch import nn

from faceshield.errors import AssetError
from faceshield.models import assets
from faceshield.models.graphs.onnx import load_onnx_graph
from faceshield.models.registry import ARCFACE_112, FRModelConfig, register_fr_model

log = logging.getLogger(__name__)

GRAPH_ASSET = "faceplugin/fr_feature.onnx"

CONFIG = FRModelConfig(
    name="faceplugin-mobilefacenet",
    embedding_dim=512,  # the graph's declared output shape is 1×512 (checked when the network is built)
    input_size=112,
    template=ARCFACE_112,
    mean=(127 / 255,) * 3,
    std=(128 / 255,) * 3,
    channel_order="RGB",
    assets=(GRAPH_ASSET,),
    licence="MIT",
    source="npm faceplugin-face-recognition-js 0.0.1: model/fr_feature.onnx",
    reference="onnxruntime",
    description="Faceplugin PReLU MobileFaceNet, 512-D; training data not stated",
)


@register_fr_model(CONFIG)
def build_faceplugin(config: FRModelConfig) -> nn.Module:
    """The bare network: ``B×3×112×112`` RGB ``(x·255 − 127) / 128`` → ``B×512`` raw embeddings."""
    graph_path = assets.fetch(GRAPH_ASSET)
    network = load_onnx_graph(graph_path)
    declared = network.output_shapes[0]
    if declared is None or declared[-1] != config.embedding_dim:
        raise AssetError(f"{graph_path}: output shape {declared} does not end in {config.embedding_dim}")
    log.debug("built %s from %s", config.name, graph_path)
    return network
