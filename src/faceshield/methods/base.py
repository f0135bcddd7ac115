"""The common interface of every protection method, and the method registry.

A method is one class with a typed config dataclass (the paper's or our documented defaults) and
``protect(image, landmarks, target=None) -> ProtectionResult``. Methods import the core (faces, models,
augment, diffusion), never each other. ``create_method(name, **overrides)`` builds one by name.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from faceshield.errors import FaceshieldError, ShapeError
from faceshield.settings import SettingError


@dataclass
class ProtectionResult:
    """What a method returns for one photo.

    Attributes:
        image: ``1×3×H×W`` float RGB in [0, 1], the protected photo (same size as the input).
        steps: optimisation steps run.
        history: per-step scalars worth logging (loss, similarities), small.
    """

    image: torch.Tensor
    steps: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)


class ProtectionMethod(ABC):
    """Base class: subclasses set ``name``, ``Config`` and implement :meth:`protect`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # threats a method addresses (see METHODS.md), e.g. ("fr-dodging", "fr-impersonation")
    goals: ClassVar[tuple[str, ...]] = ()
    # named strength presets: setting overrides on top of Config's defaults
    presets: ClassVar[dict[str, dict]] = {}
    # what to tell the user when a protected photo is still matched ("weak")
    weak_advice: ClassVar[str] = "try --strength high or more steps (--set steps=N)"
    # a set method (haa, aspl) protects all photos of a run together, in one protect_many call; its verdict is the
    # budget, not FR (faceshield.protect.SET_NOTE)
    set_method: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name}: config must be {self.Config.__name__}, got {type(self.config).__name__}")

    @abstractmethod
    def protect(
        self,
        image: torch.Tensor,
        landmarks: torch.Tensor,
        target: dict[str, torch.Tensor] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ProtectionResult:
        """Protect every face of one photo.

        Args:
            image: ``1×3×H×W`` float RGB in [0, 1].
            landmarks: ``F×5×2`` landmark pixels of the F faces to protect.
            target: for impersonation, the target identity's embeddings ``{surrogate name: 1×D}``
                (from the method's own surrogate models); None for dodging.
            progress: called as ``progress(step, total)`` after each optimisation step.
        """

    def protect_many(
        self,
        photos: Sequence[tuple[torch.Tensor, torch.Tensor]],
        target: dict[str, torch.Tensor] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[ProtectionResult]:
        """Protect several photos ``[(image 1×3×H×W, landmarks F×5×2), ...]``.

        One after another here; a method that can run the faces of several photos in one batch overrides this.
        """
        return [self.protect(image, landmarks, target, progress) for image, landmarks in photos]

    def config_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self.config)}


class FRAttackMethod(ProtectionMethod):
    """A method that attacks a surrogate FR ensemble: its config has ``surrogates`` and ``device``.

    Builds ``self.ensemble`` (empty ``surrogates`` → every calibrated model with AUC ≥ 0.9) and
    ``self.thresholds`` (``{model: cosine threshold at FAR 1e-2}``).
    """

    goals = ("fr-dodging", "fr-impersonation")

    def __init__(self, config: Any = None):
        from faceshield.adversarial import surrogate_ensemble

        super().__init__(config)
        self.ensemble, self.thresholds = surrogate_ensemble(self.config.surrogates, self.config.device)


def check_photo(image: torch.Tensor, landmarks: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3 or not image.is_floating_point():
        raise ShapeError(f"expected one photo 1×3×H×W float, got {tuple(image.shape)} {image.dtype}")
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2) or landmarks.shape[0] == 0:
        raise ShapeError(f"expected landmarks F×5×2 with F ≥ 1, got {tuple(landmarks.shape)}")


_METHODS: dict[str, type[ProtectionMethod]] = {}


def register_method(cls: type[ProtectionMethod]) -> type[ProtectionMethod]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_methods() -> None:
    import faceshield.methods.catalog  # noqa: F401  (each method module registers itself)


def list_methods() -> list[str]:
    _load_methods()
    return sorted(_METHODS)


def get_method_class(name: str) -> type[ProtectionMethod]:
    _load_methods()
    if name not in _METHODS:
        raise FaceshieldError(f"unknown method {name!r}; choose from: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_config(name: str, preset: str | None = None, **overrides: Any) -> Any:
    """The config of method ``name``: its defaults, then preset ``preset`` (e.g. cloak's "high"), then ``overrides``.

    Every value is checked against its type and range here, before any model is loaded.

    Raises:
        FaceshieldError: unknown method, preset or setting; :class:`faceshield.settings.SettingError` for a bad
            value. One line each, naming the method and what is allowed.
    """
    cls = get_method_class(name)
    if preset is not None:
        if preset not in cls.presets:
            known = ", ".join(cls.presets) or "none"
            raise FaceshieldError(f"{name}: unknown strength {preset!r}; its presets: {known}")
        overrides = {**cls.presets[preset], **overrides}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise FaceshieldError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    try:
        return cls.Config(**overrides)
    except SettingError as exc:
        raise SettingError(f"{name}: {exc}") from None


def create_method(name: str, preset: str | None = None, **overrides: Any) -> ProtectionMethod:
    """Build method ``name`` from :func:`method_config` (same arguments); unknown or bad settings are rejected."""
    return get_method_class(name)(method_config(name, preset, **overrides))


def describe_methods() -> dict:
    """Every method, JSON-ready: goals, one-line summary, default settings, allowed ranges/choices and strength
    presets (what ``faceshield methods --json`` and the server's ``/methods`` show)."""
    import json
    import sys

    info = {}
    for name in list_methods():
        cls = get_method_class(name)
        summary = (sys.modules[cls.__module__].__doc__ or name).strip().splitlines()[0]
        allowed = {f.name: f.metadata.get("interval") or list(f.metadata.get("choices") or ()) or None
                   for f in dataclasses.fields(cls.Config)}
        info[name] = {"goals": list(cls.goals), "summary": summary,
                      "defaults": json.loads(json.dumps(dataclasses.asdict(cls.Config()), default=str)),
                      "allowed": {k: v for k, v in allowed.items() if v},
                      "strengths": {k: json.loads(json.dumps(v, default=str)) for k, v in cls.presets.items()}}
    return info
