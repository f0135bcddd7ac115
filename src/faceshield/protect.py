"""Protect photos on disk: the batch job behind ``faceshield protect`` and the Python API for platforms.

For each photo: read it (any format), find every face, protect them with a method, write the result (beside it,
or under an output folder) as ``<name>_protected.<ext>`` in the same format, size and channels (grayscale stays
grayscale), metadata stripped, atomically; then judge it on the file as written. Every photo ends with one
honest status:

- ``protected``: every face is past every attacked model's threshold (FAR 1e-2): no longer matched to the
  original, and, when impersonating, matched to the target;
- ``weak``: some model still recognises some face; the record names them;
- ``no-face``: nothing to protect (with an output folder, a metadata-free copy is written there so that the
  folder is complete);
- ``failed``: the record's ``error`` says why, in one line.

The verdict is about the models faceshield attacked; it cannot promise anything about models it never saw.
A bad photo never stops the others. See :mod:`faceshield.jobs` for naming, resuming and the run log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from faceshield import __version__
from faceshield.errors import FaceshieldError, NoFaceError
from faceshield.faces.detect import FaceDetector, create_detector, detect_faces, landmark_tensor
from faceshield.images import LoadedImage, check_writable_size, load_image, save_image, to_tensor, to_uint8
from faceshield.fileio import sha256_file
from faceshield.jobs import Job, Plan, append_record, plan_jobs
from faceshield.methods.base import ProtectionMethod

log = logging.getLogger(__name__)

STATUSES = ("protected", "weak", "no-face", "failed")
FAR = 1e-2  # verdicts use each model's calibrated threshold at this false-accept rate
SET_NOTE = ("anti-customization set method: 'protected' means perturbed within the L∞ budget together with the "
            "rest of the set; how well it stops DreamBooth/LoRA is measured by `faceshield attack customize`, "
            "not per photo (FR models are meant to still recognise the photo itself)")


@dataclass
class PhotoRecord:
    """What happened to one photo (one line of the JSON-lines run log).

    Attributes:
        input, output: paths; ``output`` is None when nothing was written.
        status: one of :data:`STATUSES`.
        resumed: the output was reused from an earlier run (same input bytes, same settings, output intact).
        faces: faces found and protected.
        similarity: per attacked model, the cosine of each protected face to the original face ``before``
            (1.0) and ``after`` protection (measured on the file as written), and the model's ``threshold``.
        target_similarity: when impersonating, the same against the target identity.
        verdicts: per face, ``{"status": "protected" | "weak", "unfooled": [{"model", "reason"}]}``.
        input_sha256, output_sha256, settings_sha256: what a re-run checks before reusing the output.
        error: why it failed (one line naming the file); note: anything else the user should know.
    """

    input: str
    output: str | None
    status: str
    resumed: bool = False
    faces: int = 0
    method: str = ""
    parameters: dict = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0
    similarity: dict = field(default_factory=dict)
    target_similarity: dict = field(default_factory=dict)
    verdicts: list = field(default_factory=list)
    input_sha256: str | None = None
    output_sha256: str | None = None
    settings_sha256: str | None = None
    error: str | None = None
    note: str | None = None

    @property
    def unfooled_models(self) -> list[str]:
        """Models that still recognise (or, impersonating, do not yet mistake) some face, in order."""
        return list(dict.fromkeys(u["model"] for v in self.verdicts for u in v["unfooled"]))

    @classmethod
    def from_dict(cls, data: dict) -> "PhotoRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def face_verdicts(similarity: dict, target_similarity: dict | None = None) -> list[dict]:
    """Per face, whether every model is fooled, from the ``after`` cosines and thresholds of a record.

    A model is fooled by a face when its cosine to the original is at most the threshold (it would say
    "different person"), and, when impersonating, its cosine to the target is above it ("same person").
    A model without a calibrated threshold cannot be judged and counts as not fooled.
    """
    faces = len(next(iter(similarity.values()))["after"]) if similarity else 0
    verdicts = []
    for i in range(faces):
        unfooled = []
        for model, s in similarity.items():
            t = s["threshold"]
            if t is None:
                unfooled.append({"model": model, "reason": "no calibrated threshold, cannot be judged"})
            elif s["after"][i] > t:
                unfooled.append({"model": model, "reason": f"still matches the original ({s['after'][i]:.2f} > {t:.2f})"})
            elif target_similarity and target_similarity[model]["after"][i] <= t:
                value = target_similarity[model]["after"][i]
                unfooled.append({"model": model, "reason": f"does not match the target ({value:.2f} ≤ {t:.2f})"})
        verdicts.append({"status": "weak" if unfooled else "protected", "unfooled": unfooled})
    return verdicts


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
        from faceshield.eval.calibration import shipped_table

        self.method = method
        self.detector = detector or create_detector()
        self.keep_metadata = keep_metadata
        self.jpeg_quality = jpeg_quality
        self.ensemble = method.ensemble
        table = shipped_table()
        self.thresholds = {n: (table.models[n].threshold(FAR) if n in table.models else None)
                           for n in self.ensemble.names}
        self.target = self._target_embeddings(Path(target)) if target else None
        identity = {
            "faceshield": __version__, "method": method.config_dict(), "detector": getattr(self.detector, "name", ""),
            "target": sha256_file(Path(target)) if target else None, "keep_metadata": keep_metadata,
            "jpeg_quality": jpeg_quality,
        }
        # what an output depends on besides the input's bytes: a re-run reuses an output only when this matches
        self.settings_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def _faces(self, path: Path, rgb) -> torch.Tensor:
        faces = detect_faces(rgb, self.detector)
        if not faces:
            raise NoFaceError(f"{path}: no face found; nothing to protect (faces under 20 px are ignored)")
        return landmark_tensor(faces)

    def _target_embeddings(self, path: Path) -> dict[str, torch.Tensor]:
        photo = load_image(path)
        landmarks = self._faces(path, photo.rgb)[:1]
        return self.ensemble.embed(to_tensor(photo.rgb), landmarks)

    def _cosines(self, image: torch.Tensor, landmarks: torch.Tensor, original: dict) -> tuple[dict, dict]:
        """Per model, each face's cosine to its original embedding, and to the target (empty when dodging)."""
        emb = self.ensemble.embed(image, landmarks)
        own = {n: (e * original[n]).sum(-1) for n, e in emb.items()}
        target = {} if self.target is None else {n: (e @ self.target[n].T).squeeze(1) for n, e in emb.items()}
        return own, target

    def protect_files(self, jobs: list[tuple[Path, Path]], progress: Callable[[int, int], None] | None = None,
                      copy_no_face: bool = False) -> list[PhotoRecord]:
        """Protect several photos ``[(photo, out), ...]`` in one call of the method, so that a method that batches
        (adv-latent) runs every face of every photo together. A bad photo gets a "failed" record, the rest go on;
        ``seconds`` is the batch's time shared out among its photos. A photo without a face gets a "no-face"
        record, and with ``copy_no_face`` a metadata-free copy at ``out``."""
        records: dict[int, PhotoRecord] = {}
        prepared: list[tuple[int, _Job]] = []
        for i, (photo, out) in enumerate(jobs):
            try:
                job = self._prepare(photo, out, copy_no_face)
            except (FaceshieldError, OSError) as exc:
                records[i] = _failed(photo, exc)
                continue
            if isinstance(job, PhotoRecord):  # no face: nothing to protect
                records[i] = job
            else:
                prepared.append((i, job))
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
                    except (FaceshieldError, OSError, RuntimeError, ValueError) as exc:  # disk full, encoder limits
                        records[i] = _failed(job.photo, exc)
        return [records[i] for i in range(len(jobs))]

    def _record(self, job_photo: Path, out: Path | None, status: str, **fields) -> PhotoRecord:
        return PhotoRecord(str(job_photo), str(out) if out else None, status, method=self.method.name,
                           parameters=self.method.config_dict(), settings_sha256=self.settings_sha256, **fields)

    def _no_face(self, photo: Path, out: Path, loaded: LoadedImage, digest: str, exc: NoFaceError,
                 copy: bool) -> PhotoRecord:
        if not copy:
            return self._record(photo, None, "no-face", input_sha256=digest, note=str(exc))
        try:
            save_image(out, loaded.rgb, loaded.alpha, loaded, self.keep_metadata, self.jpeg_quality, loaded.grayscale)
        except (FaceshieldError, OSError, ValueError) as exc2:  # nothing to protect; only the copy failed
            return self._record(photo, None, "no-face", input_sha256=digest,
                                note=f"{exc}; not copied: {_one_line(exc2)}")
        return self._record(photo, out, "no-face", input_sha256=digest, output_sha256=sha256_file(out),
                            note=f"{exc}; copied unchanged to the output folder")

    def _prepare(self, photo: Path, out: Path, copy_no_face: bool) -> "_Job | PhotoRecord":
        """The photo read, its faces found and embedded; or, without a face, its "no-face" record."""
        start = time.perf_counter()
        if out.resolve() == photo.resolve():
            raise FaceshieldError(f"{photo}: output would overwrite the input; choose another output folder")
        digest = sha256_file(photo)
        loaded = load_image(photo)
        try:
            landmarks = self._faces(photo, loaded.rgb)
        except NoFaceError as exc:
            return self._no_face(photo, out, loaded, digest, exc, copy_no_face)
        check_writable_size(photo, out.suffix, *loaded.size)  # before the protection, not after
        image = to_tensor(loaded.rgb)
        original = self.ensemble.embed(image, landmarks)
        before = self._cosines(image, landmarks, original)
        return _Job(photo, out, digest, loaded, image, landmarks, original, before, time.perf_counter() - start)

    def _finish(self, job: "_Job", result, seconds: float) -> PhotoRecord:
        start = time.perf_counter()
        # a grayscale source is written back as its luma (save_image), and judged as such below
        save_image(job.out, to_uint8(result.image), job.loaded.alpha, job.loaded, self.keep_metadata, self.jpeg_quality,
                   job.loaded.grayscale)
        written = to_tensor(load_image(job.out).rgb)  # judged on what the user gets, after rounding and JPEG
        after = self._cosines(written, job.landmarks, job.original)

        def table(before: dict, after: dict) -> dict:
            return {name: {"before": [round(float(v), 4) for v in before[name]],
                           "after": [round(float(v), 4) for v in after[name]],
                           "threshold": None if self.thresholds[name] is None else round(self.thresholds[name], 4)}
                    for name in before}

        similarity, target_similarity = table(job.before[0], after[0]), table(job.before[1], after[1])
        if getattr(self.method, "set_method", False):  # anti-customization: FR similarities are informational only
            return self._record(
                job.photo, job.out, "protected", faces=len(job.landmarks),
                seconds=round(seconds + time.perf_counter() - start, 2), steps=result.steps, similarity=similarity,
                input_sha256=job.digest, output_sha256=sha256_file(job.out), note=SET_NOTE)
        verdicts = face_verdicts(similarity, target_similarity)
        weak = any(v["status"] == "weak" for v in verdicts)
        return self._record(
            job.photo, job.out, "weak" if weak else "protected", faces=len(job.landmarks),
            seconds=round(seconds + time.perf_counter() - start, 2), steps=result.steps, similarity=similarity,
            target_similarity=target_similarity, verdicts=verdicts, input_sha256=job.digest,
            output_sha256=sha256_file(job.out), note=self.method.weak_advice if weak else None,
        )


@dataclass
class _Job:
    """A photo read and analysed, waiting for its protection."""

    photo: Path
    out: Path
    digest: str
    loaded: LoadedImage
    image: torch.Tensor
    landmarks: torch.Tensor
    original: dict
    before: tuple[dict, dict]
    seconds: float  # spent preparing


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _failed(photo: Path, exc: Exception) -> PhotoRecord:
    message = _one_line(exc) if isinstance(exc, FaceshieldError) else f"{photo}: {_one_line(exc)}"
    log.info("%s", message)  # the caller reports failures once (the CLI's FAIL line)
    return PhotoRecord(str(photo), None, "failed", error=message)


@dataclass
class ProtectRun:
    """The outcome of :func:`protect_paths`.

    Attributes:
        records: one per photo, in input order.
        unsupported: files inside the input folders that are not photos faceshield reads (not processed).
        earlier_outputs: files inside the input folders that the run log records as faceshield outputs.
    """

    records: list[PhotoRecord]
    unsupported: list[str] = field(default_factory=list)
    earlier_outputs: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {status: sum(r.status == status for r in self.records) for status in STATUSES}
        counts["resumed"] = sum(r.resumed for r in self.records)
        return counts

    def to_dict(self) -> dict:
        return {"photos": [asdict(r) for r in self.records], "counts": self.counts(),
                "unsupported": self.unsupported, "earlier_outputs": self.earlier_outputs}


def _reusable(earlier: dict | None, photo: Path, out: Path, protector: Protector) -> PhotoRecord | None:
    """The earlier record of ``out``, if it was made from these input bytes with these settings and is intact."""
    if not earlier or earlier.get("status") not in ("protected", "weak", "no-face"):
        return None
    if earlier.get("settings_sha256") != protector.settings_sha256 or not out.is_file():
        return None
    if earlier.get("input_sha256") != sha256_file(photo) or earlier.get("output_sha256") != sha256_file(out):
        return None
    record = PhotoRecord.from_dict(earlier)
    record.input, record.output, record.resumed = str(photo), str(out), True
    return record


def protect_paths(
    inputs: list[str | Path] | Plan,
    protector: Protector,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    log_path: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 1,
    copy_no_face: bool = True,
) -> ProtectRun:
    """Protect every photo in ``inputs`` (files, or folders searched recursively); never raises for one bad photo.

    Args:
        inputs: paths, or a :class:`faceshield.jobs.Plan` already made by :func:`faceshield.jobs.plan_jobs`
            (then ``out_dir``, ``log_path`` and ``overwrite`` are the plan's).
        out_dir: output folder, or None for beside each photo.
        overwrite: redo photos even when an earlier run's output could be reused.
        log_path: the JSON-lines run log (default: ``faceshield-log.jsonl`` in the output folder, or beside
            each output); each record is appended as it completes.
        batch_size: photos given to the method together (:meth:`Protector.protect_files`); methods that batch
            faces (adv-latent, on a GPU) are faster per photo that way.
        copy_no_face: with ``out_dir``, write a metadata-free copy of photos without a face there.

    Raises:
        faceshield.jobs.InputError: before any work, for inputs or outputs that make the run impossible.
    """
    from tqdm import tqdm

    plan = inputs if isinstance(inputs, Plan) else plan_jobs(list(inputs), out_dir, log_path, overwrite)
    if getattr(getattr(protector, "method", None), "set_method", False):
        batch_size = max(len(plan.jobs), 1)  # a set method protects the person's photos together, in one call
    copy_no_face = copy_no_face and plan.out_dir is not None
    records: dict[int, PhotoRecord] = {}  # by plan index: input order at the end, whatever the completion order

    def keep(record: PhotoRecord, index: int, job: Job) -> None:
        records[index] = record
        if not record.resumed:
            resolved = {"input_resolved": str(job.photo.resolve()),
                        "output_resolved": str(job.out.resolve()) if record.output else None}
            append_record(job.log, {**asdict(record), **resolved})

    bar = tqdm(total=len(plan.jobs), desc="photos", unit="photo", disable=not progress, position=0)
    pending = []
    for index, job in enumerate(plan.jobs):
        reused = _reusable(plan.earlier_record(job), job.photo, job.out, protector)
        if reused is not None:
            keep(reused, index, job)
            bar.update()
        else:
            pending.append((index, job))
        if pending and (len(pending) == batch_size or index == len(plan.jobs) - 1):
            first = pending[0][1].photo.name[-30:]
            bar.set_postfix_str(first + (f" +{len(pending) - 1}" if len(pending) > 1 else ""))
            steps_bar = tqdm(total=0, desc="  steps", unit="step", disable=not progress, position=1, leave=False)

            def on_step(step: int, total: int, steps_bar=steps_bar) -> None:
                steps_bar.total = total
                steps_bar.n = step
                steps_bar.refresh()

            extra = {}
            if getattr(protector, "streams_records", False):  # e.g. the Ray protector: log each photo as it finishes

                def on_record(k: int, record: PhotoRecord, pending=pending) -> None:
                    keep(record, *pending[k])
                    bar.update()

                extra["on_record"] = on_record
            try:
                done = protector.protect_files([(j.photo, j.out) for _, j in pending], on_step, copy_no_face, **extra)
            finally:
                steps_bar.close()
            for (i, job), record in zip(pending, done):
                if i not in records:  # not streamed
                    keep(record, i, job)
                    bar.update()
            pending = []
    bar.close()
    return ProtectRun([records[i] for i in sorted(records)], [str(p) for p in plan.unsupported],
                      [str(p) for p in plan.earlier_outputs])
