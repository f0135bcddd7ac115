"""Imports every FR model module so that each registers itself with :mod:`faceshield.models.registry`."""

from faceshield.models.fr import dlib_resnet, human, mobilefacenet_ms1m  # noqa: F401
