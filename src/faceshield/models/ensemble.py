"""Several FR models behind one call: align each face to every model's template, embed, compare.

The alignment is differentiable (``grid_sample``), so a loss on any embedding reaches the photo's pixels.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

from faceshield.errors import ShapeError
from faceshield.faces.align import align_to_template
from faceshield.models.registry import FaceRecognizer, cached_fr_model

T = TypeVar("T")


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
        self._seconds: dict[str, float] = {}  # each model's last run time under map_models: longest go first

    @property
    def names(self) -> list[str]:
        return list(self.models.keys())

    def map_models(self, fn: Callable[[str], T]) -> dict[str, T]:
        """``{name: fn(name)}`` for every model, in the ensemble's order.

        On CPU the models run concurrently, one per thread of the caller's ``torch.get_num_threads()`` (each with
        its share of those threads, at least one). Small convolutions barely use a second intra-op thread (one
        step of the 7 default surrogates: 360 ms on one thread, 338 on two), while independent models fill both
        cores. ``fn`` must only read the models; the results never depend on the scheduling.
        """
        threads = torch.get_num_threads()
        device = next(self.parameters(), torch.empty(0)).device
        if device.type != "cpu" or threads < 2 or len(self.models) < 2:
            return {name: fn(name) for name in self.models}
        workers = min(threads, len(self.models))
        grad_enabled = torch.is_grad_enabled()  # thread-local: the caller's no_grad must hold in the workers too

        def timed(name: str) -> T:
            start = time.perf_counter()
            try:
                with torch.set_grad_enabled(grad_enabled):
                    return fn(name)
            finally:
                self._seconds[name] = time.perf_counter() - start

        # Longest first (the previous call's times), so that no model starts last on an otherwise idle pool.
        order = sorted(self.models, key=lambda n: -self._seconds.get(n, 0.0))
        futures = {name: _pool(workers, max(1, threads // workers)).submit(timed, name) for name in order}
        return {name: futures[name].result() for name in self.models}

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
        return self.map_models(lambda name: self.models[name](self.align(image, landmarks, name)))

    @torch.no_grad()
    def embed(self, image: torch.Tensor, landmarks: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward` without gradients, run where the models are; the embeddings come back on the CPU."""
        device = next(self.parameters(), torch.empty(0)).device
        return {k: v.cpu() for k, v in self(image.to(device), landmarks.to(device)).items()}


@functools.lru_cache(maxsize=None)
def _pool(workers: int, threads_each: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, each running torch with ``threads_each`` intra-op threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="fr-model",
                              initializer=torch.set_num_threads, initargs=(threads_each,))
