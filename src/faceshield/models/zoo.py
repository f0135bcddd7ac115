"""Imports every FR model module so that each registers itself with :mod:`faceshield.models.registry`."""

from faceshield.models.fr import (  # noqa: F401
    dlib_resnet, faceplugin, facenet, human, insightface_y1, ir_se50, mobilefacenet_ms1m,
)
