"""Protect photos on disk: the batch job behind ``faceshield protect`` and the Python API for platforms.

For each photo: read it (any format), find every face, protect them with a method, write the result next to
it (or under an output folder) as ``<name>_protected.<ext>`` in the same format and size, metadata stripped,
atomically; then measure the surrogates' similarity before and after on the file as written. A bad photo is
recorded and skipped; the others go on. Finished outputs are skipped on a re-run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from faceshield.errors import FaceshieldError, NoFaceError
from faceshield.faces.detect import FaceDetector, create_detector, detect_faces, landmark_tensor
from faceshield.images import find_images, load_image, save_image, to_tensor, to_uint8
from faceshield.methods.base import ProtectionMethod

log = logging.getLogger(__name__)

SUFFIX = "_protected"


@dataclass
class PhotoRecord:
    """What happened to one photo (one line of the JSON-lines log).

    ``status``: "protected", "skipped" (output already there), or "failed" (``error`` says why).
    ``similarity``: per surrogate model, the cosine of the protected faces to their reference — the original
    faces when dodging, the target when impersonating — ``before`` and ``after`` protection (after = measured
    on the written file), the model's ``threshold`` at FAR 1e-2, and per face lists.
    """

    input: str
    output: str | None
    status: str
    faces: int = 0
    method: str = ""
    parameters: dict = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0
    similarity: dict = field(default_factory=dict)
    error: str | None = None


def output_path(photo: Path, root: Path | None, out_dir: Path | None) -> Path:
    """``<name>_protected.<ext>`` beside the photo, or under ``out_dir`` keeping the path relative to ``root``."""
    name = f"{photo.stem}{SUFFIX}{photo.suffix}"
    if out_dir is None:
        return photo.with_name(name)
    relative = photo.parent.relative_to(root) if root is not None and photo.is_relative_to(root) else Path()
    return out_dir / relative / name


class Protector:
    """Protects photos one after another with one method (models loaded once).

    Args:
        method: a built method (see :func:`faceshield.methods.base.create_method`).
        detector: face detector; default the project's default detector.
        target: path of a photo of the identity to impersonate, or None for dodging.
        keep_metadata: keep EXIF/ICC (default: stripped).
        jpeg_quality: quality of JPEG outputs (≥ 95 recommended).
    """

    def __init__(self, method: ProtectionMethod, detector: FaceDetector | None = None, target: Path | None = None,
                 keep_metadata: bool = False, jpeg_quality: int = 95):
        self.method = method
        self.detector = detector or create_detector()
        self.keep_metadata = keep_metadata
        self.jpeg_quality = jpeg_quality
        self.ensemble = method.ensemble
        self.target = self._target_embeddings(Path(target)) if target else None

    def _faces(self, path: Path, rgb) -> torch.Tensor:
        faces = detect_faces(rgb, self.detector)
        if not faces:
            raise NoFaceError(f"{path}: no face found; nothing to protect (faces under 20 px are ignored)")
        return landmark_tensor(faces)

    def _target_embeddings(self, path: Path) -> dict[str, torch.Tensor]:
        photo = load_image(path)
        landmarks = self._faces(path, photo.rgb)[:1]
        with torch.no_grad():
            return self.ensemble(to_tensor(photo.rgb), landmarks)

    def _similarities(self, image: torch.Tensor, landmarks: torch.Tensor, reference: dict) -> dict:
        with torch.no_grad():
            emb = self.ensemble(image, landmarks)
        if self.target is not None:
            return {n: (e @ self.target[n].T).squeeze(1) for n, e in emb.items()}
        return {n: (e * reference[n]).sum(-1) for n, e in emb.items()}

    def protect_file(self, photo: Path, out: Path, progress: Callable[[int, int], None] | None = None) -> PhotoRecord:
        """Protect one photo into ``out``; raises FaceshieldError on a bad photo (nothing written then)."""
        start = time.perf_counter()
        if out.resolve() == photo.resolve():
            raise FaceshieldError(f"{photo}: output would overwrite the input; choose another output folder")
        loaded = load_image(photo)
        landmarks = self._faces(photo, loaded.rgb)
        image = to_tensor(loaded.rgb)
        with torch.no_grad():
            original = self.ensemble(image, landmarks)
        before = self._similarities(image, landmarks, original)
        result = self.method.protect(image, landmarks, self.target, progress=progress)
        save_image(out, to_uint8(result.image), loaded.alpha, loaded, self.keep_metadata, self.jpeg_quality)
        written = to_tensor(load_image(out).rgb)
        after = self._similarities(written, landmarks, original)
        thresholds = getattr(self.method, "thresholds", {}) or {}
        similarity = {
            name: {"before": [round(float(v), 4) for v in before[name]],
                   "after": [round(float(v), 4) for v in after[name]],
                   "threshold": round(thresholds[name], 4) if name in thresholds else None}
            for name in before
        }
        return PhotoRecord(
            input=str(photo), output=str(out), status="protected", faces=len(landmarks), method=self.method.name,
            parameters=self.method.config_dict(), seconds=round(time.perf_counter() - start, 2),
            steps=result.steps, similarity=similarity,
        )


def protect_paths(
    inputs: list[str | Path],
    protector: Protector,
    out_dir: Path | None = None,
    overwrite: bool = False,
    log_path: Path | None = None,
    progress: bool = True,
) -> list[PhotoRecord]:
    """Protect every photo in ``inputs`` (files, or folders searched recursively); never raises for one bad photo.

    Returns one record per photo; the JSON-lines log (if ``log_path``) gets each record appended as it completes.
    """
    from tqdm import tqdm

    jobs: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        root = item if item.is_dir() else None
        for photo in find_images([item]):
            if photo.stem.endswith(SUFFIX):
                continue  # an output of an earlier run inside the input folder
            jobs.append((photo, output_path(photo, root, out_dir)))
    records: list[PhotoRecord] = []
    bar = tqdm(jobs, desc="photos", unit="photo", disable=not progress, position=0)
    for photo, out in bar:
        bar.set_postfix_str(photo.name[-30:])
        if out.exists() and not overwrite:
            record = PhotoRecord(str(photo), str(out), "skipped")
        else:
            steps_bar = tqdm(total=0, desc="  steps", unit="step", disable=not progress, position=1, leave=False)

            def on_step(step: int, total: int, steps_bar=steps_bar) -> None:
                steps_bar.total = total
                steps_bar.n = step
                steps_bar.refresh()

            try:
                record = protector.protect_file(photo, out, on_step)
            except FaceshieldError as exc:
                record = PhotoRecord(str(photo), None, "failed", error=str(exc))
                log.warning("%s", exc)
            except (OSError, RuntimeError) as exc:  # e.g. unwritable output folder, out of memory
                record = PhotoRecord(str(photo), None, "failed", error=f"{photo}: {exc}")
                log.warning("%s: %s", photo, exc)
            finally:
                steps_bar.close()
        records.append(record)
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(record)) + "\n")
    return records
