"""The face-recognition (FR) zoo: one typed config per model and ``create_fr_model(name)``.

Every model takes aligned faces ``B×3×S×S`` float RGB in [0, 1] (S = ``config.input_size``, the face aligned
to ``config.template`` by :func:`faceshield.faces.align.align_to_template`) and returns L2-normalised
embeddings ``B×D``. Colour order and normalisation are applied inside the model, from the config, never
guessed from graph shapes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from faceshield.errors import FaceshieldError, ShapeError
from faceshield.models.graphs import flush_subnormals_

Landmarks5 = tuple[tuple[float, float], ...]

# The 5-point template of ArcFace / InsightFace 112×112 crops: eye centres, nose tip, mouth corners,
# in image order (the subject's right eye is the first point, on the image's left).
ARCFACE_112: Landmarks5 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


@dataclass(frozen=True)
class FRModelConfig:
    """What one needs to run an FR model correctly, and where it comes from.

    Attributes:
        name: registry name, e.g. ``"dlib-resnet"``.
        embedding_dim: length of the returned embedding.
        input_size: side S of the square aligned crop, pixels.
        template: 5 landmarks (x, y) in crop pixels that alignment maps the face's landmarks onto
            (order: image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner).
        mean, std: per-channel normalisation applied to [0, 1] input in the network's channel order:
            ``(x - mean) / std``.
        channel_order: ``"RGB"`` or ``"BGR"``, what the network was trained on.
        assets: names of the model files in :mod:`faceshield.models.catalog`.
        licence: licence of the weights.
        source: where the network comes from (repository, package).
        reference: the reference implementation it is validated against.
    """

    name: str
    embedding_dim: int
    input_size: int
    template: Landmarks5
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str
    assets: tuple[str, ...]
    licence: str
    source: str
    reference: str
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def weights_asset(self) -> str | None:
        """The asset holding the weights when the user supplies them by path (``extra["weights_asset"]``), else None."""
        return self.extra.get("weights_asset")

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"{self.name}: channel_order must be RGB or BGR, got {self.channel_order!r}")
        if len(self.template) != 5:
            raise ValueError(f"{self.name}: template needs 5 landmarks, got {len(self.template)}")


class FaceRecognizer(nn.Module):
    """An FR network behind the zoo's common contract.

    ``forward(x)``: ``x`` is ``B×3×S×S`` float RGB in [0, 1]; returns ``B×D`` L2-normalised embeddings.
    Differentiable with respect to ``x``.
    """

    def __init__(self, config: FRModelConfig, network: nn.Module):
        super().__init__()
        self.config = config
        self.network = network
        flush_subnormals_(network)  # exported weights can hold them: same outputs, much faster on CPU
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        return self.config.name

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The network's own output for ``x`` (``B×3×S×S`` RGB in [0, 1]), before L2 normalisation."""
        s = self.config.input_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ShapeError(f"{self.name} expects aligned faces B×3×{s}×{s}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ShapeError(f"{self.name} expects float input in [0, 1], got {x.dtype}")
        if self.config.channel_order == "BGR":
            x = x.flip(1)
        return self.network((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(x).flatten(1), dim=1)


RESEARCH_ENV = "FACESHIELD_ALLOW_RESEARCH_MODELS"


class ResearchLicenceError(FaceshieldError):
    """A model whose licence allows research use only was requested without the user's opt-in."""


def research_models_allowed() -> bool:
    """Whether the user opted in to research-only models (``FACESHIELD_ALLOW_RESEARCH_MODELS=1``)."""
    return os.environ.get(RESEARCH_ENV, "").strip().lower() in {"1", "true", "yes"}


def require_research_opt_in(name: str, licence: str) -> None:
    """Raise :class:`ResearchLicenceError` (one line: model, licence, opt-in) unless the user opted in."""
    if not research_models_allowed():
        raise ResearchLicenceError(f"FR model {name} is licensed for {licence}; set {RESEARCH_ENV}=1 to use it "
                                   f"for research")


NetworkBuilder = Callable[..., nn.Module]  # builder(config) or, for by-path weights, builder(config, weights_path)
_REGISTRY: dict[str, tuple[FRModelConfig, NetworkBuilder]] = {}


def register_fr_model(config: FRModelConfig) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Decorator: register ``builder(config) -> nn.Module`` (the bare network, weights loaded) under config.name."""

    def decorate(builder: NetworkBuilder) -> NetworkBuilder:
        if config.name in _REGISTRY:
            raise ValueError(f"FR model {config.name!r} registered twice")
        _REGISTRY[config.name] = (config, builder)
        return builder

    return decorate


def _load_zoo() -> None:
    import faceshield.models.zoo  # noqa: F401  (registers every model on import)


def list_fr_models(by_path: bool = False) -> list[str]:
    """Zoo models faceshield can fetch itself; with ``by_path`` also those whose weights the user supplies."""
    _load_zoo()
    return sorted(n for n, (cfg, _) in _REGISTRY.items() if by_path or cfg.weights_asset is None)


def get_fr_config(name: str) -> FRModelConfig:
    _load_zoo()
    if name not in _REGISTRY:
        raise FaceshieldError(f"unknown FR model {name!r}; choose from: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]


def create_fr_model(name: str, device: str | torch.device = "cpu", weights: str | None = None) -> FaceRecognizer:
    """Build FR model ``name`` with its weights (fetched and verified through the asset cache), in eval mode.

    ``weights``: path of the weights file of a model whose weights the user supplies (``config.weights_asset``);
    None = look for it as an asset (``$FACESHIELD_WEIGHTS``, mirror folders, cache).
    """
    config = get_fr_config(name)
    builder = _REGISTRY[name][1]
    if config.weights_asset is None:
        if weights:
            raise FaceshieldError(f"FR model {name} ships its own weights; a weights path applies only to "
                                  f"{', '.join(n for n in sorted(_REGISTRY) if _REGISTRY[n][0].weights_asset)}")
        network = builder(config)
    else:
        network = builder(config, weights)
    model = FaceRecognizer(config, network).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def cached_fr_model(name: str, device: str = "cpu", weights: str | None = None) -> FaceRecognizer:
    """:func:`create_fr_model`, built once per process, device and weights path (the models are frozen, so
    sharing is safe)."""
    return create_fr_model(name, device, weights)
