"""InsightFace's MobileFaceNet "model-y1-test2" (MXNet), run in PyTorch — research use only, opt-in.

The checkpoint (``model-symbol.json`` + ``model-0000.params``, from github ltkhang/EfficientFace @36f6d5e) is
InsightFace's ``fmobilefacenet`` (``network='y1'``, PReLU, ``version_output='E'``: GDConv → FC → BatchNorm),
trained with ArcFace loss (m 0.5, s 64) on MS1M-refined (85,742 identities, per its training log). It is read
with :func:`faceshield.models.graphs.mxnet.read_ndarray_list` and executed by
:class:`faceshield.models.graphs.mxnet.MXNetGraph`, and validated against the TFLite conversion of the same
network that ships beside it, run by LiteRT (``tests/test_mxnet_models.py``).

Preprocessing: the symbol itself starts with ``(data − 127.5) · 0.0078125``, so the network takes RGB in
[0, 255]; InsightFace feeds it **RGB** faces aligned to its 112×112 template (``face_model.py``:
``cv2.cvtColor(nimg, cv2.COLOR_BGR2RGB)`` after ``face_preprocess.preprocess(..., image_size='112,112')``),
i.e. :data:`~faceshield.models.registry.ARCFACE_112`. The output is the 128-D ``fc1`` BatchNorm, not normalised.

**Licence.** The repository has no licence file, and InsightFace releases its pretrained models for
non-commercial research only. The model is declared in the zoo but is built only when the user opts in, with
``FACESHIELD_ALLOW_RESEARCH_MODELS=1`` (:data:`RESEARCH_ENV`); otherwise :class:`ResearchLicenceError` says why
and how, in one line. Its calibration is kept apart in the shipped table (``research_models``), so it never
enters the default surrogate or judge lists.
"""

from __future__ import annotations

import logging

from torch import nn

from faceshield.errors import AssetError
from faceshield.models import assets
from faceshield.models.graphs.mxnet import load_mxnet_graph
from faceshield.models.registry import (
    ARCFACE_112, RESEARCH_ENV, FRModelConfig, register_fr_model, require_research_opt_in,
)

log = logging.getLogger(__name__)

LICENCE = "research only (non-commercial): no licence file; InsightFace's pretrained models are for research"
SYMBOL_ASSET = "insightface-mobilefacenet-y1/model-symbol.json"
PARAMS_ASSET = "insightface-mobilefacenet-y1/model-0000.params"
REFERENCE_TFLITE = "insightface-mobilefacenet-y1/mobilefacenet.tflite"


CONFIG = FRModelConfig(
    name="insightface-mobilefacenet-y1",
    embedding_dim=128,
    input_size=112,
    template=ARCFACE_112,
    mean=(0.0, 0.0, 0.0),
    std=(1 / 255,) * 3,  # [0, 1] → [0, 255]; the symbol normalises itself
    channel_order="RGB",
    assets=(SYMBOL_ASSET, PARAMS_ASSET),
    licence=LICENCE,
    source="github ltkhang/EfficientFace @36f6d5e: model/model-y1-test2 (InsightFace MobileFaceNet y1)",
    reference=f"LiteRT (ai-edge-litert) on {REFERENCE_TFLITE}",
    description="InsightFace MobileFaceNet y1 (PReLU, 128-D), ArcFace loss on MS1M-refined; "
                f"research only, opt in with {RESEARCH_ENV}=1",
    extra={"research_only": True, "reference_asset": REFERENCE_TFLITE},
)


@register_fr_model(CONFIG)
def build_insightface_y1(config: FRModelConfig) -> nn.Module:
    """The bare network: ``B×3×112×112`` RGB in [0, 255] → ``B×128`` raw embeddings (opt-in required)."""
    require_research_opt_in(config.name, LICENCE)
    network = load_mxnet_graph(assets.fetch(SYMBOL_ASSET), assets.fetch(PARAMS_ASSET))
    if network.output_name != "fc1":
        raise AssetError(f"{SYMBOL_ASSET}: output {network.output_name!r}, expected 'fc1'")
    return network
