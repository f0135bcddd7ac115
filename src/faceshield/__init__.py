"""faceshield: protect faces in photos from face recognition and diffusion models."""

import logging

__version__ = "0.1.0"

# Library code logs through this logger and never prints; the CLI configures handlers.
logging.getLogger(__name__).addHandler(logging.NullHandler())
