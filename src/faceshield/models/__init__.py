"""Models: the FR zoo (registry, networks), graph loaders (ONNX, TF.js, MXNet) and the verified model-file layer.

The registry's names are imported on first use, so that light submodules (``expressions``, ``catalog``) do not pull
in torch (the command line's start-up)."""

__all__ = ["FRModelConfig", "FaceRecognizer", "create_fr_model", "list_fr_models"]


def __getattr__(name: str):
    if name in __all__:
        from faceshield.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'faceshield.models' has no attribute {name!r}")
