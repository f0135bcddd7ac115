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
    """Protects photos with one method (models loaded once), a batch of photos per :meth:`protect_files` call.

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
        return self.ensemble.embed(to_tensor(photo.rgb), landmarks)

    def _similarities(self, image: torch.Tensor, landmarks: torch.Tensor, reference: dict) -> dict:
        emb = self.ensemble.embed(image, landmarks)
        if self.target is not None:
            return {n: (e @ self.target[n].T).squeeze(1) for n, e in emb.items()}
        return {n: (e * reference[n]).sum(-1) for n, e in emb.items()}

    def protect_files(self, jobs: list[tuple[Path, Path]], progress: Callable[[int, int], None] | None = None
                      ) -> list[PhotoRecord]:
        """Protect several photos ``[(photo, out), ...]`` in one call of the method, so that a method that batches
        (adv-latent) runs every face of every photo together. A bad photo gets a "failed" record, the rest go on;
        ``seconds`` is the batch's time shared out among its photos."""
        records: dict[int, PhotoRecord] = {}
        prepared: list[tuple[int, _Job]] = []
        for i, (photo, out) in enumerate(jobs):
            try:
                prepared.append((i, self._prepare(photo, out)))
            except (FaceshieldError, OSError) as exc:
                records[i] = _failed(photo, exc)
        if prepared:
            start = time.perf_counter()
            try:
                results = self.method.protect_many([(j.image, j.landmarks) for _, j in prepared], self.target,
                                                   progress=progress)
            except (FaceshieldError, RuntimeError) as exc:  # e.g. out of memory: the whole batch fails
                results = None
                records.update({i: _failed(j.photo, exc) for i, j in prepared})
            if results is not None:
                share = (time.perf_counter() - start) / len(prepared)
                for (i, job), result in zip(prepared, results):
                    try:
                        records[i] = self._finish(job, result, share + job.seconds)
                    except (FaceshieldError, OSError, RuntimeError) as exc:  # e.g. unwritable output folder
                        records[i] = _failed(job.photo, exc)
        return [records[i] for i in range(len(jobs))]

    def _prepare(self, photo: Path, out: Path) -> "_Job":
        start = time.perf_counter()
        if out.resolve() == photo.resolve():
            raise FaceshieldError(f"{photo}: output would overwrite the input; choose another output folder")
        loaded = load_image(photo)
        landmarks = self._faces(photo, loaded.rgb)
        image = to_tensor(loaded.rgb)
        original = self.ensemble.embed(image, landmarks)
        before = self._similarities(image, landmarks, original)
        return _Job(photo, out, loaded, image, landmarks, original, before, time.perf_counter() - start)

    def _finish(self, job: "_Job", result, seconds: float) -> PhotoRecord:
        start = time.perf_counter()
        save_image(job.out, to_uint8(result.image), job.loaded.alpha, job.loaded, self.keep_metadata,
                   self.jpeg_quality)
        written = to_tensor(load_image(job.out).rgb)
        after = self._similarities(written, job.landmarks, job.original)
        thresholds = getattr(self.method, "thresholds", {}) or {}
        similarity = {
            name: {"before": [round(float(v), 4) for v in job.before[name]],
                   "after": [round(float(v), 4) for v in after[name]],
                   "threshold": round(thresholds[name], 4) if name in thresholds else None}
            for name in job.before
        }
        return PhotoRecord(
            input=str(job.photo), output=str(job.out), status="protected", faces=len(job.landmarks),
            method=self.method.name, parameters=self.method.config_dict(),
            seconds=round(seconds + time.perf_counter() - start, 2), steps=result.steps, similarity=similarity,
        )


@dataclass
class _Job:
    """A photo read and analysed, waiting for its protection."""

    photo: Path
    out: Path
    loaded: object
    image: torch.Tensor
    landmarks: torch.Tensor
    original: dict
    before: dict
    seconds: float  # spent preparing


def _failed(photo: Path, exc: Exception) -> PhotoRecord:
    message = str(exc) if isinstance(exc, FaceshieldError) else f"{photo}: {exc}"
    log.warning("%s", message)
    return PhotoRecord(str(photo), None, "failed", error=message)


def protect_paths(
    inputs: list[str | Path],
    protector: Protector,
    out_dir: Path | None = None,
    overwrite: bool = False,
    log_path: Path | None = None,
    progress: bool = True,
    batch_size: int = 1,
) -> list[PhotoRecord]:
    """Protect every photo in ``inputs`` (files, or folders searched recursively); never raises for one bad photo.

    ``batch_size`` photos go to the method together (:meth:`Protector.protect_files`); methods that batch faces
    (adv-latent, on a GPU) are faster per photo that way. Returns one record per photo; the JSON-lines log (if
    ``log_path``) gets each record appended as it completes.
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

    def keep(record: PhotoRecord) -> None:
        records.append(record)
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(record)) + "\n")

    bar = tqdm(total=len(jobs), desc="photos", unit="photo", disable=not progress, position=0)
    pending: list[tuple[Path, Path]] = []
    for index, (photo, out) in enumerate(jobs):
        if out.exists() and not overwrite:
            keep(PhotoRecord(str(photo), str(out), "skipped"))
            bar.update()
        else:
            pending.append((photo, out))
        if pending and (len(pending) == batch_size or index == len(jobs) - 1):
            bar.set_postfix_str(pending[0][0].name[-30:] + (f" +{len(pending) - 1}" if len(pending) > 1 else ""))
            steps_bar = tqdm(total=0, desc="  steps", unit="step", disable=not progress, position=1, leave=False)

            def on_step(step: int, total: int, steps_bar=steps_bar) -> None:
                steps_bar.total = total
                steps_bar.n = step
                steps_bar.refresh()

            try:
                for record in protector.protect_files(pending, on_step):
                    keep(record)
            finally:
                steps_bar.close()
            bar.update(len(pending))
            pending = []
    bar.close()
    return records
