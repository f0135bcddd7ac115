"""Jobs of the web server: a bounded queue, a bounded pool of worker threads, per-photo progress, TTL clean-up.

A job is one upload (one or more photos, one method and its settings, optionally a target photo). It waits in
a bounded queue (:class:`QueueFull` when the queue is full: the API answers 429) and is run by one of a fixed
number of worker threads. Each worker keeps its own small cache of *runners* — the object that runs
``protect_files`` (a :class:`faceshield.protect.Protector` by default) — one per (method, settings, target), so
that models are loaded once per worker, not once per job. The runner is built by an injectable factory
(``runner_factory``), so that a Ray-backed runner with the same ``protect_files`` interface can replace the local
one without touching the server.

Uploads and results live in one private temporary folder (mode 0700) that is removed on shutdown; a finished job's
files are deleted when it is deleted, when its TTL has passed, or (optionally) once every result was downloaded.
Nothing here logs photo names or pixels: log lines carry job ids and counts only.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from faceshield.errors import FaceshieldError

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "done", "cancelled")
PHOTO_STATES = ("queued", "running", "protected", "weak", "no-face", "failed")


class QueueFull(Exception):
    """The job queue is full; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: too many jobs waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """Raised from the progress callback to stop a job that was deleted (or the server that is shutting down).

    Deliberately not a FaceshieldError/RuntimeError, which ``Protector.protect_files`` turns into "failed"
    records: this must unwind the whole call."""


class Runner(Protocol):
    """What a worker needs from the thing that protects photos: :class:`faceshield.protect.Protector`'s API."""

    settings_sha256: str

    def protect_files(self, jobs: list[tuple[Path, Path]], progress: Callable[[int, int], None] | None = None,
                      copy_no_face: bool = False) -> list: ...


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner is built from.

    Attributes:
        method: method name (``faceshield methods``).
        config: the method's checked config dataclass (:func:`faceshield.methods.base.method_config`).
        target: path of the impersonation target photo, or None.
        target_sha256: the target's content hash (part of the cache key; the path is per job).
    """

    method: str
    config: Any
    target: Path | None = None
    target_sha256: str | None = None

    @property
    def key(self) -> str:
        """Cache key: method, every setting and the target's content."""
        settings = json.dumps(dataclasses.asdict(self.config), sort_keys=True, default=str)
        return hashlib.sha256(f"{self.method}\n{settings}\n{self.target_sha256}".encode()).hexdigest()


RunnerFactory = Callable[[RunnerSpec], Runner]


def local_runner(spec: RunnerSpec) -> Runner:
    """The default runner factory: a :class:`faceshield.protect.Protector` in this process (FR models are cached
    per process by :func:`faceshield.models.registry.cached_fr_model`, so a second runner with other settings is
    cheap)."""
    from faceshield.faces.detect import default_detector
    from faceshield.methods.base import get_method_class
    from faceshield.protect import Protector

    return Protector(get_method_class(spec.method)(spec.config), default_detector(), spec.target)


@dataclass
class PhotoState:
    """One photo of a job, as the API reports it (``record`` is the sanitised :class:`PhotoRecord`)."""

    index: int
    name: str  # the uploaded file name, sanitised; shown to the client that sent it, never logged
    upload: Path
    output: Path
    content_type: str
    width: int
    height: int
    status: str = "queued"
    step: int = 0
    total: int = 0
    boxes: list[list[float]] = field(default_factory=list)
    record: dict | None = None
    downloaded: bool = False
    result_deleted: bool = False

    @property
    def progress(self) -> float:
        """0…1: the method's steps; 1 once the photo has its final status."""
        if self.status not in ("queued", "running"):
            return 1.0
        return min(self.step / self.total, 0.99) if self.total else 0.0

    @property
    def result_name(self) -> str:
        stem, _, _ = self.name.rpartition(".")
        return f"{stem or self.name}_protected{self.output.suffix}"

    def to_dict(self) -> dict:
        has_result = self.record is not None and self.record.get("output") is not None and not self.result_deleted
        return {"index": self.index, "name": self.name, "status": self.status, "step": self.step,
                "total": self.total, "progress": round(self.progress, 3), "width": self.width, "height": self.height,
                "boxes": self.boxes, "result_available": has_result, "result_name": self.result_name,
                "record": self.record}


@dataclass
class Job:
    """One upload: its photos, its method and settings, its state and timestamps (``time.monotonic`` seconds)."""

    id: str
    folder: Path
    spec: RunnerSpec
    strength: str | None
    photos: list[PhotoState]
    state: str = "queued"
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_dict(self, ttl: float) -> dict:
        expires = None if self.finished is None else max(0.0, self.finished + ttl - time.monotonic())
        counts = collections.Counter(p.status for p in self.photos)
        return {"id": self.id, "state": self.state, "method": self.spec.method, "strength": self.strength,
                "settings": dataclasses.asdict(self.spec.config), "impersonating": self.spec.target is not None,
                "progress": round(sum(p.progress for p in self.photos) / len(self.photos), 3),
                "counts": {s: counts.get(s, 0) for s in PHOTO_STATES},
                "expires_in_s": None if expires is None else round(expires, 1),
                "photos": [p.to_dict() for p in self.photos]}


def summary(record: dict) -> str:
    """The verdict in words, e.g. ``weak: model dlib-resnet still recognises face 1 (0.95 > 0.91)``."""
    status = record.get("status")
    if status == "protected":
        n = record.get("faces", 0)
        return f"protected: {n} face{'s' if n != 1 else ''}, every model fooled"
    if status == "no-face":
        return "no face found: nothing to protect"
    if status == "failed":
        return f"failed: {record.get('error') or 'unknown error'}"
    parts = []
    for i, verdict in enumerate(record.get("verdicts") or []):
        for u in verdict["unfooled"]:
            parts.append(f"model {u['model']} {u['reason'].replace('still matches the original', 'still recognises')}"
                         f" on face {i + 1}")
    return "weak: " + ("; ".join(parts) or "some model still recognises a face")


class JobManager:
    """Owns the private folder, the queue, the workers and the jobs.

    Args:
        workers: worker threads (each caches its own runners); default 1, as one job already uses every core.
        queue_size: jobs that may wait beyond those running; more → :class:`QueueFull`.
        ttl: seconds a finished job (and its files) is kept; default 900 (15 min).
        runner_factory: builds the runner of a :class:`RunnerSpec` (default :func:`local_runner`).
        runner_cache: runners each worker keeps (least recently used dropped first), bounding memory when
            clients use many different settings; default 2.
        delete_after_download: delete a photo's result file once it was downloaded (default True).
        root: parent of the private folder (default the system temp folder).
    """

    def __init__(self, workers: int = 1, queue_size: int = 8, ttl: float = 900.0,
                 runner_factory: RunnerFactory = local_runner, runner_cache: int = 2,
                 delete_after_download: bool = True, root: str | Path | None = None):
        if workers < 1 or queue_size < 1:
            raise ValueError(f"need at least one worker and a queue of at least 1, got {workers} and {queue_size}")
        self.workers, self.queue_size, self.ttl = workers, queue_size, ttl
        self.runner_factory, self.runner_cache = runner_factory, runner_cache
        self.delete_after_download = delete_after_download
        # mkdtemp creates the folder with mode 0700: other local users cannot read the uploads
        self.folder = Path(tempfile.mkdtemp(prefix="faceshield-serve-", dir=root))
        os.chmod(self.folder, 0o700)
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seconds_per_job = collections.deque(maxlen=20)  # for Retry-After
        self._started = False

    # --- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker threads and the TTL reaper (idempotent)."""
        if self._started:
            return
        self._started = True
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"faceshield-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        reaper = threading.Thread(target=self._reap_loop, name="faceshield-reaper", daemon=True)
        reaper.start()
        self._threads.append(reaper)
        log.info("job pool started: %d worker(s), queue %d, ttl %.0f s", self.workers, self.queue_size, self.ttl)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (running jobs are cancelled at their next step) and delete every upload and result."""
        self._stop.set()
        with self._lock:
            for job in self.jobs.values():
                job.cancel.set()
        for _ in range(self.workers):
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # the workers see _stop anyway once they take the next job
                pass
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self.jobs.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        log.info("job pool stopped; private folder removed")

    # --- jobs ---------------------------------------------------------------------------------------------------
    def new_job_folder(self) -> tuple[str, Path]:
        """A fresh job id (unguessable: it is the only key to a job's photos without a token) and its folder."""
        job_id = secrets.token_urlsafe(16)
        folder = self.folder / job_id
        folder.mkdir(mode=0o700)
        return job_id, folder

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying: the recent time per job times the jobs ahead, ≥ 1."""
        per_job = sum(self._seconds_per_job) / len(self._seconds_per_job) if self._seconds_per_job else 10.0
        return max(1, int(per_job * (self._queue.qsize() + 1) / max(1, self.workers) + 0.999))

    def has_room(self) -> bool:
        return not self._queue.full()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` (and deletes its files) when the queue is full."""
        if self._stop.is_set():
            shutil.rmtree(job.folder, ignore_errors=True)
            raise QueueFull(5)
        with self._lock:
            self.jobs[job.id] = job
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.jobs.pop(job.id, None)
            shutil.rmtree(job.folder, ignore_errors=True)
            raise QueueFull(self.retry_after()) from None
        log.info("job %s queued: %d photo(s), method %s", job.id, len(job.photos), job.spec.method)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Delete a job and its files; a running job stops at its next step. False when there is no such job."""
        with self._lock:
            job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        job.cancel.set()
        if job.state != "running":  # a running job's worker removes the folder when it stops
            shutil.rmtree(job.folder, ignore_errors=True)
        log.info("job %s deleted", job_id)
        return True

    def mark_downloaded(self, job: Job, photos: list[PhotoState]) -> None:
        """Record downloads; with ``delete_after_download`` the result files go at once (the record stays)."""
        for photo in photos:
            photo.downloaded = True
            if self.delete_after_download and not photo.result_deleted:
                photo.output.unlink(missing_ok=True)
                photo.result_deleted = True

    def reap(self, now: float | None = None) -> int:
        """Delete finished jobs older than the TTL; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [j.id for j in self.jobs.values() if j.finished is not None and now - j.finished >= self.ttl]
        for job_id in expired:
            self.delete(job_id)
        if expired:
            log.info("%d expired job(s) deleted", len(expired))
        return len(expired)

    def _reap_loop(self) -> None:
        interval = max(0.2, min(30.0, self.ttl / 4))
        while not self._stop.wait(interval):
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad clean-up
                log.exception("reaper failed")

    # --- workers ------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        runners: collections.OrderedDict[str, Runner] = collections.OrderedDict()
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None or self._stop.is_set():
                break
            if job.cancel.is_set():
                shutil.rmtree(job.folder, ignore_errors=True)
                continue
            start = time.monotonic()
            job.state = "running"
            try:
                self._run(job, runners)
            except JobCancelled:
                job.state = "cancelled"
            except Exception as exc:  # noqa: BLE001 - one bad job must not kill the worker; no traceback to clients
                log.error("job %s: unexpected %s", job.id, type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
                # FaceshieldError messages are one line meant for users (e.g. a target photo without a face);
                # anything else is a bug: its type only. Server paths never reach the client.
                message = (str(exc).replace(str(job.folder) + os.sep, "").replace(str(job.folder), "")
                           if isinstance(exc, FaceshieldError) else f"internal error ({type(exc).__name__})")
                for p in job.photos:
                    if p.status in ("queued", "running"):
                        p.status, p.record = "failed", {"status": "failed", "error": message.strip() or
                                                        type(exc).__name__}
                        p.record["summary"] = summary(p.record)
                job.state = "done"
            finally:
                job.finished = time.monotonic()
                self._seconds_per_job.append(job.finished - start)
                if job.cancel.is_set():
                    shutil.rmtree(job.folder, ignore_errors=True)
            log.info("job %s %s in %.1f s", job.id, job.state, job.finished - start)

    def _runner(self, spec: RunnerSpec, runners: collections.OrderedDict) -> Runner:
        key = spec.key
        if key in runners:
            runners.move_to_end(key)
            return runners[key]  # a target's embeddings are keyed by its content, so reuse is safe too
        runner = self.runner_factory(spec)
        runners[key] = runner
        while len(runners) > self.runner_cache:
            runners.popitem(last=False)
        return runner

    def _run(self, job: Job, runners: collections.OrderedDict) -> None:
        from faceshield.faces.detect import default_detector, detect_faces
        from faceshield.images import load_image

        runner = self._runner(job.spec, runners)
        for photo in job.photos:
            if job.cancel.is_set():
                raise JobCancelled()
            photo.status = "running"
            try:  # boxes for the page, from the same detector as the protection (same faces, same order)
                rgb = load_image(photo.upload).rgb
                faces = detect_faces(rgb, getattr(runner, "detector", None) or default_detector())
                photo.boxes = [[round(float(v), 1) for v in f.box] for f in faces]
            except Exception:  # noqa: BLE001 - protect_files reports an unreadable photo itself
                photo.boxes = []

            def progress(step: int, total: int, photo: PhotoState = photo) -> None:
                if job.cancel.is_set():
                    raise JobCancelled()
                photo.step, photo.total = step, total

            record = runner.protect_files([(photo.upload, photo.output)], progress=progress, copy_no_face=False)[0]
            photo.record = self._public_record(record, photo, job.folder)
            photo.status = photo.record["status"]
        job.state = "done"

    @staticmethod
    def _public_record(record: Any, photo: PhotoState, folder: Path) -> dict:
        """The record without server paths (messages name the uploaded file instead), plus the verdict in words."""
        data = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)
        for key in ("error", "note"):
            if data.get(key):
                data[key] = data[key].replace(str(photo.upload), photo.name).replace(str(folder), "")
        data["input"] = photo.name
        data["output"] = photo.result_name if data.get("output") else None
        data["summary"] = summary(data)
        return data
