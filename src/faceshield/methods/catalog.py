"""Imports every method module so that each registers itself (see :mod:`faceshield.methods.base`)."""

from faceshield.methods import adv_latent, cloak, haa, map, pgd, tipim  # noqa: F401
