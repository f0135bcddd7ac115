"""Imports every FR model module so that each registers itself with :mod:`faceshield.models.registry`."""

from faceshield.models.fr import dlib_resnet, faceplugin, human, insightface_y1, mobilefacenet_ms1m  # noqa: F401
