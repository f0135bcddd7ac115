"""Exceptions with one-line messages that name the file or model and the fix."""


class FaceshieldError(Exception):
    """Base class: every error faceshield raises on purpose."""


class AssetError(FaceshieldError):
    """A model file is missing, unreachable or corrupt."""


class ImageReadError(FaceshieldError):
    """An input photo cannot be read."""


class NoFaceError(FaceshieldError):
    """No face was found where one was required."""


class ShapeError(FaceshieldError, ValueError):
    """A tensor argument has the wrong shape, dtype or range."""


class InputError(FaceshieldError):
    """Inputs or outputs that make a command impossible; raised before any photo is touched."""


class DiffusionModelError(FaceshieldError):
    """A diffusion model (or a part of one) cannot be loaded or used."""
