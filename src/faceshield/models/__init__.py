"""Models: the FR zoo (registry, networks), graph loaders (ONNX, TF.js) and the verified model-file layer."""

from faceshield.models.registry import FaceRecognizer, FRModelConfig, create_fr_model, list_fr_models

__all__ = ["FRModelConfig", "FaceRecognizer", "create_fr_model", "list_fr_models"]
