"""Several FR models behind one call: align each face to every model's template, embed, compare.

The alignment is differentiable (``grid_sample``), so a loss on any embedding reaches the photo's pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from faceshield.errors import ShapeError
from faceshield.faces.align import align_to_template
from faceshield.models.registry import FaceRecognizer, cached_fr_model


class FREnsemble(nn.Module):
    """FR models by name; ``forward(image, landmarks)`` → ``{name: F×D}`` L2-normalised embeddings.

    Args:
        models: registry names (built once per process and device, then shared), or built
            :class:`FaceRecognizer` s.
    """

    def __init__(self, models: Sequence[str | FaceRecognizer], device: str | torch.device = "cpu"):
        super().__init__()
        built = [m if isinstance(m, FaceRecognizer) else cached_fr_model(m, str(device)) for m in models]
        self.models = nn.ModuleDict({m.name: m for m in built})

    @property
    def names(self) -> list[str]:
        return list(self.models.keys())

    def align(self, image: torch.Tensor, landmarks: torch.Tensor, name: str) -> torch.Tensor:
        """Crops ``F×3×S×S`` of the faces with ``landmarks`` (``F×5×2`` pixels) in ``image`` (``1×`` or ``F×3×H×W``)."""
        config = self.models[name].config
        return align_to_template(image, landmarks, config.template, config.input_size)

    def forward(self, image: torch.Tensor, landmarks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embeddings of the F faces of one photo, or of one face in each of F photos.

        Args:
            image: ``1×3×H×W`` (one photo) or ``F×3×H×W`` (one face per photo) float RGB in [0, 1].
            landmarks: ``F×5×2`` landmark pixels (order of :mod:`faceshield.faces.detect`).
        Returns:
            ``{model name: F×D}`` L2-normalised embeddings.
        """
        if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
            raise ShapeError(f"expected landmarks F×5×2, got {tuple(landmarks.shape)}")
        if image.ndim != 4 or image.shape[0] not in (1, landmarks.shape[0]) or image.shape[1] != 3:
            raise ShapeError(f"expected 1×3×H×W or {landmarks.shape[0]}×3×H×W images for {landmarks.shape[0]} "
                             f"faces, got {tuple(image.shape)}")
        landmarks = landmarks.to(image)
        return {name: model(self.align(image, landmarks, name)) for name, model in self.models.items()}

    @torch.no_grad()
    def embed(self, image: torch.Tensor, landmarks: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward` without gradients, run where the models are; the embeddings come back on the CPU."""
        device = next(self.parameters(), torch.empty(0)).device
        return {k: v.cpu() for k, v in self(image.to(device), landmarks.to(device)).items()}
