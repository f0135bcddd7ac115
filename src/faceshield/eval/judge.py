"""An independent judging pipeline: face recognition as a system outside faceshield would run it.

Protection finds faces with RetinaFace, aligns them with faceshield's own differentiable warp (``grid_sample``,
bilinear with an anti-aliasing blur) and attacks models through exactly that crop. A perturbation tuned to that
crop can look stronger than it is: a real FR system meets the photo with its own detector, its own landmarks and
its own resampler. The judge here shares none of those steps with the protection:

- detection and landmarks: MTCNN (default; or dlib's HOG detector with its 5-point shape predictor);
- alignment: OpenCV's least-squares similarity (``cv2.estimateAffinePartial2D``, LMEDS) onto each model's template,
  then ``cv2.warpAffine`` with bicubic interpolation straight from the full-resolution photo, without any
  anti-aliasing (what InsightFace-style pipelines do: a large face is shrunk to the model's input in one warp);
- the crop is quantised to 8 bits before the network (as an image file would be).

Only the FR networks are shared with the zoo (the protection's leave-one-out protocol holds the judged model out
of the surrogates). Thresholds are calibrated through this same pipeline on impostor pairs
(``faceshield calibrate --pipeline independent``; shipped in ``data/judge_calibration.json``), because a different
alignment shifts every model's score distribution.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from faceshield.errors import FaceshieldError
from faceshield.eval.calibration import FARS, CalibrationTable, calibrate_pair_set, pair_ids

log = logging.getLogger(__name__)

JUDGE_DETECTORS = ("mtcnn", "dlib-hog")
PIPELINE = "{detector} landmarks → OpenCV similarity (LMEDS) → cv2.warpAffine bicubic, no anti-aliasing → uint8"


def judge_table() -> CalibrationTable:
    """Thresholds of the zoo's models through the independent pipeline (shipped with the package)."""
    return CalibrationTable.from_json(resources.files("faceshield").joinpath("data/judge_calibration.json").read_text())


def align_cv2(rgb: np.ndarray, landmarks: np.ndarray, template: Sequence[Sequence[float]], size: int) -> np.ndarray:
    """The face with 5 ``landmarks`` (pixels, faceshield's order) warped onto ``template`` in a ``size``² crop.

    Args:
        rgb: ``H×W×3`` uint8 photo; landmarks: ``5×2`` float.
    Returns:
        ``size×size×3`` uint8 crop (bicubic, border filled with black).
    """
    import cv2

    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float32), np.asarray(template, np.float32),
                                            method=cv2.LMEDS)
    if matrix is None:
        raise FaceshieldError("the 5 landmarks are degenerate; no similarity transform fits them")
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


class IndependentJudge:
    """FR judges that see photos through a pipeline the protection never used (see the module docstring).

    Args:
        models: FR model names; empty = the models the shipped judge calibration rates strong (AUC ≥ 0.95).
        detector: ``"mtcnn"`` (default) or ``"dlib-hog"``; never the protection's RetinaFace.
        device: where the FR networks run.
    """

    def __init__(self, models: Sequence[str] = (), detector: str = "mtcnn", device: str = "cpu"):
        from faceshield.faces.detect import create_detector
        from faceshield.models.registry import cached_fr_model

        if detector not in JUDGE_DETECTORS:
            raise FaceshieldError(f"independent judge: detector {detector!r} is not independent of the protection; "
                                  f"choose from {', '.join(JUDGE_DETECTORS)}")
        table = judge_table()
        self.models = list(models) or table.strong_models()
        uncalibrated = [m for m in self.models if m not in table.models]
        self.thresholds = {m: table.models[m].threshold(1e-2) for m in self.models if m in table.models}
        if uncalibrated:
            log.warning("independent judge: %s not calibrated through this pipeline; similarities only, no verdict",
                        ", ".join(uncalibrated))
        self.detector_name = detector
        self.detector = create_detector(detector, device=device)
        self.networks = {m: cached_fr_model(m, device) for m in self.models}
        self.device = device
        self.name = PIPELINE.format(detector=detector)

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """``5×2`` landmarks of the most confident face this judge's detector finds, or None."""
        from faceshield.faces.detect import detect_faces

        faces = detect_faces(rgb, self.detector)
        if not faces:
            return None
        best = max(faces, key=lambda f: f.score)
        return np.asarray(best.landmarks, np.float32)

    @torch.no_grad()
    def embed(self, rgb: np.ndarray, landmarks: np.ndarray | None = None,
              models: Sequence[str] | None = None) -> dict[str, np.ndarray] | None:
        """Unit-norm embeddings ``{model: (D,)}`` of the photo's best face (found by this judge), or None.

        Args:
            rgb: ``H×W×3`` uint8 photo, any size.
            landmarks: reuse this judge's own landmarks (from :meth:`landmarks`) instead of detecting again.
            models: a subset of :attr:`models` (default all).
        """
        if landmarks is None:
            landmarks = self.landmarks(rgb)
            if landmarks is None:
                return None
        out = {}
        for name in models or self.models:
            network = self.networks[name]
            config = network.config
            crop = align_cv2(rgb, landmarks, config.template, config.input_size)
            x = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255).to(self.device)
            out[name] = network(x)[0].cpu().numpy()
        return out

    def similarity(self, rgb: np.ndarray, reference: dict[str, np.ndarray],
                   models: Sequence[str] | None = None) -> dict[str, float] | None:
        """Cosine of the photo's best face to ``reference`` embeddings per model (default all of :attr:`models`),
        or None when this judge's detector finds no face."""
        embeddings = self.embed(rgb, models=models)
        if embeddings is None:
            return None
        return {m: float(e @ reference[m]) for m, e in embeddings.items()}


def calibrate_judge(pairs_dir: Path, models: Sequence[str], detector: str = "mtcnn", limit: int | None = None,
                    fars: Sequence[float] = FARS, progress: bool = False, command: str = "") -> CalibrationTable:
    """Genuine/impostor scores of ``models`` through the independent pipeline on a pairs folder → thresholds."""
    judge = IndependentJudge(models, detector)
    ids = pair_ids(Path(pairs_dir))
    return calibrate_pair_set(pairs_dir, judge.embed, ids[:limit] if limit else ids, fars, progress,
                              pipeline=judge.name, detector=detector, command=command)
