"""MobileFaceNet trained on refined MS-Celeb-1M (foamliu/MobileFaceNet), run from its ONNX export.

The graph (``MobileFaceNet.onnx``, opset 18, exported by PyTorch 2.9 with BatchNorm already folded into the
convolutions: 51 Conv, 32 Clip(0, 6) = ReLU6, 2 Relu, 12 Add, 1 Reshape) maps a 1×3×112×112 normalised face to a
128-D embedding; it is executed by our own interpreter :mod:`faceshield.models.graphs.onnx` and validated
against onnxruntime (tests/test_onnx_models.py).

Preprocessing, from the training code of foamliu/MobileFaceNet (facts, looked up in the repository):

* training images are the insightface ``faces_emore`` (MS1M-ArcFace) 112×112 crops (``config.py``:
  ``faces_ms1m_folder = 'data/faces_emore'``), which insightface aligned to its 5-point 112×112 template, i.e.
  :data:`~faceshield.models.registry.ARCFACE_112`;
* ``pre_process.py`` decodes each record with ``mx.image.imdecode`` (RGB), converts RGB→BGR and writes it with
  ``cv2.imwrite`` (which expects BGR), so the JPEGs on disk have true colours; ``data_gen.py`` reads them with
  ``PIL.Image.open(...).convert('RGB')`` → channel order **RGB**;
* ``data_gen.py`` then applies ``transforms.ToTensor()`` (→ [0, 1]) and
  ``transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])`` (ImageNet mean/std);
* ``lfw_eval.py`` agrees on colour (aligned BGR crop flipped to RGB before the same transform). Its LFW
  alignment uses a zoomed-out variant of the template (``inner_padding_factor=0.25``), but the network was
  trained on ARCFACE_112 crops, which is what we align to.

The ONNX graph itself starts with a plain Conv on ``input0`` (no normalisation nodes), so normalisation is
ours to apply, as above. The repository ships ``MobileFaceNet.onnx.data`` beside the graph, but this graph
stores all 102 initializers inline and refers to no external data; the data file is fetched only if a graph
that refers to it is used.
"""

from __future__ import annotations

import logging

import onnx
from torch import nn

from faceshield.errors import AssetError
from faceshield.models import assets
from faceshield.models.graphs.onnx import OnnxGraph, load_onnx_graph
from faceshield.models.registry import ARCFACE_112, FRModelConfig, register_fr_model

log = logging.getLogger(__name__)

GRAPH_ASSET = "mobilefacenet-ms1m/MobileFaceNet.onnx"
DATA_ASSET = "mobilefacenet-ms1m/MobileFaceNet.onnx.data"

CONFIG = FRModelConfig(
    name="mobilefacenet-ms1m",
    embedding_dim=128,  # the graph's declared output0 shape is 1×128 (checked when the network is built)
    input_size=112,
    template=ARCFACE_112,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    channel_order="RGB",
    assets=(GRAPH_ASSET, DATA_ASSET),
    licence="Apache-2.0",
    source="github foamliu/MobileFaceNet @a6cc903",
    reference="onnxruntime",
    description="MobileFaceNet (0.99 M params, ReLU6) trained with ArcFace loss on refined MS-Celeb-1M; "
                "LFW 99.48% per its README",
)


def _external_locations(graph_path) -> set[str]:
    """File names of the external-data files the graph refers to (empty for a self-contained graph)."""
    model = onnx.load(str(graph_path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return locations


@register_fr_model(CONFIG)
def build_mobilefacenet_ms1m(config: FRModelConfig) -> nn.Module:
    """The bare network: ``B×3×112×112`` RGB normalised with ImageNet mean/std → ``B×128`` raw embeddings."""
    graph_path = assets.fetch(GRAPH_ASSET)
    data_dir = None
    locations = _external_locations(graph_path)
    if locations:
        # The graph and its data file can resolve to different folders (cache vs mirror): point the loader at
        # the data file's own folder, which works as long as the file keeps the name the graph records.
        data_path = assets.fetch(DATA_ASSET)
        if locations != {data_path.name}:
            raise AssetError(f"{graph_path} refers to external data {sorted(locations)}, "
                             f"but the catalogued data file is {data_path.name}")
        data_dir = data_path.parent
    network: OnnxGraph = load_onnx_graph(graph_path, external_data_dir=data_dir)
    declared = network.output_shapes[0]
    if declared is None or declared[-1] != config.embedding_dim:
        raise AssetError(f"{graph_path}: output shape {declared} does not end in {config.embedding_dim}")
    log.debug("built %s from %s", config.name, graph_path)
    return network
