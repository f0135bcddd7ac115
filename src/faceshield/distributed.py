"""Protect photos on a Ray cluster: the engine behind ``faceshield protect --ray``.

A pool of Ray actors, one per GPU (or per CPU slot when the cluster has no GPU), each holding one real
:class:`faceshield.protect.Protector` built once from a :class:`WorkerSpec` (method name, preset, overrides,
detector, target, ...; specs travel, never built models). :class:`RayProtector` has the interface
:func:`faceshield.protect.protect_paths` uses (``method``, ``settings_sha256``, ``protect_files``), so planning,
output names, the run log, verdicts, resuming and skipping are the local run's by construction: only the
protection of each photo runs remotely. Records stream back as each photo finishes (the log is appended at once),
and a photo whose worker fails (the actor died, or the call raised) is retried once on another actor, then reported
as "failed" with a one-line error.

Actors read the photos and write the outputs themselves: on a multi-node cluster the inputs, the outputs and the
``--target`` photo must be on a filesystem every node mounts at the same path (NFS, say). Paths are resolved to
absolute paths on the driver, and every actor checks that it sees them before any work.

Ray is an optional dependency (``pip install 'faceshield[ray]'``); it is imported only here, lazily.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from faceshield.errors import FaceshieldError
from faceshield.jobs import Plan
from faceshield.protect import PhotoRecord, ProtectRun, protect_paths

log = logging.getLogger(__name__)

# environment variables forwarded to the actors (model mirror, offline switches): remote nodes do not inherit
# the driver's environment
FORWARDED_ENV = ("FACESHIELD_MIRROR", "FACESHIELD_OFFLINE", "FACESHIELD_CACHE", "HF_HUB_OFFLINE", "HF_HOME")


def _ray():
    try:
        import ray
    except ImportError:
        raise FaceshieldError("--ray needs Ray: pip install 'faceshield[ray]' (ray>=2.9)") from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """How each actor builds its :class:`~faceshield.protect.Protector` (small and picklable).

    Attributes:
        method: method name (e.g. "cloak").
        preset: strength preset of the method, or None (default None).
        overrides: method settings on top of the preset (default none).
        detector: face detector name, or None for the project's default (default None).
        target: absolute path of the photo to impersonate, or None for dodging (default None).
        keep_metadata: keep EXIF/ICC (default False).
        jpeg_quality: quality of JPEG outputs (default 95).
        torch_threads: torch CPU threads per actor, or None to leave torch's default (default None).
        config: a checked method config dataclass to use instead of ``preset`` and ``overrides`` (default None;
            what the server's :class:`faceshield.server.worker.RunnerSpec` carries).
    """

    method: str
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    detector: str | None = None
    target: str | None = None
    keep_metadata: bool = False
    jpeg_quality: int = 95
    torch_threads: int | None = None
    config: Any = None

    def build(self):
        """The :class:`~faceshield.protect.Protector` this spec describes (loads the models)."""
        from faceshield.faces.detect import create_detector
        from faceshield.methods.base import create_method
        from faceshield.protect import Protector

        if self.config is not None:
            from faceshield.methods.base import get_method_class

            method = get_method_class(self.method)(self.config)
        else:
            method = create_method(self.method, self.preset, **self.overrides)
        detector = create_detector(self.detector) if self.detector else None
        target = Path(self.target) if self.target else None
        return Protector(method, detector, target, self.keep_metadata, self.jpeg_quality)


class ProtectWorker:
    """The body of one Ray actor: a Protector built once, then batches of ``(photo, out)`` absolute paths.

    Errors while building (a missing model file, say) are kept and reported by :meth:`identity` as one line,
    so that the driver can stop with the same message a local run would give.
    """

    def __init__(self, spec: WorkerSpec):
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)  # one CPU slot per actor: no oversubscription
        self.error: str | None = None
        self.protector = None
        try:
            self.protector = spec.build()
        except Exception as exc:  # noqa: BLE001 (reported to the driver as one line)
            self.error = str(exc) if isinstance(exc, FaceshieldError) else f"{type(exc).__name__}: {exc}"

    def identity(self) -> dict:
        """What the driver needs: settings hash, method name and config, surrogate names, where it runs."""
        where = {"host": socket.gethostname(), "pid": os.getpid()}
        if self.protector is None:
            return {"error": self.error, **where}
        p = self.protector
        return {"settings_sha256": p.settings_sha256, "method": p.method.name, "config": p.method.config_dict(),
                "ensemble": list(p.ensemble.names), **where}

    def sees(self, paths: list[str]) -> list[str]:
        """The ``paths`` this actor cannot see (files or folders): a filesystem that is not shared."""
        return [p for p in paths if not os.path.exists(p)]

    def protect(self, jobs: list[tuple[str, str]], copy_no_face: bool) -> list[PhotoRecord]:
        """:meth:`Protector.protect_files` on absolute paths; step progress is not forwarded."""
        if self.protector is None:  # a replacement actor that could not build its method
            raise FaceshieldError(self.error or "the Ray worker has no method")
        return self.protector.protect_files([(Path(a), Path(b)) for a, b in jobs], None, copy_no_face)


@dataclass
class _MethodInfo:
    """The method as the driver knows it (the models live in the actors)."""

    name: str
    config: dict

    def config_dict(self) -> dict:
        return dict(self.config)


@dataclass
class _Task:
    indices: tuple[int, ...]
    attempt: int = 0  # 0: first try; 1: the retry
    avoid: int | None = None  # the slot whose actor failed it: retried elsewhere when possible


class RayProtector:
    """Protects photos on a pool of Ray actors; a drop-in for :class:`faceshield.protect.Protector` in
    :func:`faceshield.protect.protect_paths`.

    Ray must already be initialised (see :func:`connect`).

    Args:
        spec: how each actor builds its Protector.
        workers: number of actors; default one per GPU of the cluster (GPUs ÷ ``gpus_per_worker``) or, without
            GPUs, one per CPU slot (CPUs ÷ ``cpus_per_worker``).
        gpus_per_worker: GPUs per actor; default 1 when the cluster has GPUs, else 0 (CPU actors). With GPUs the
            method runs on ``device=cuda`` unless ``spec.overrides`` says otherwise.
        cpus_per_worker: CPU slots (and torch threads) per CPU actor (default 1).
        batch_size: photos per actor call (default 1; more for methods that batch faces on a GPU, adv-latent).
        worker_class: the actor's class (default :class:`ProtectWorker`; tests inject faults with a subclass).
        startup_timeout: seconds to wait for the actors to load their models (default 900).

    Raises:
        FaceshieldError: Ray missing, not enough resources for ``workers``, an actor that cannot build its
            method (the reason in one line), or actors that disagree on the settings (mixed versions).
    """

    # protect_paths passes ``on_record`` so that each record reaches the log as soon as it is done
    streams_records = True

    def __init__(self, spec: WorkerSpec, workers: int | None = None, gpus_per_worker: float | None = None,
                 cpus_per_worker: int = 1, batch_size: int = 1, worker_class: type = ProtectWorker,
                 startup_timeout: float = 900.0):
        ray = _ray()
        if not ray.is_initialized():
            raise FaceshieldError("Ray is not initialised; call faceshield.distributed.connect() first")
        # what is free now (other pools' actors hold theirs): asking for more would wait forever for resources
        resources = ray.available_resources()
        gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus >= 1 else 0.0
        if gpus_per_worker > 0:
            capacity = int(gpus // gpus_per_worker)
            spec = self._on_cuda(spec)
            options = {"num_gpus": gpus_per_worker, "num_cpus": 1}
        else:
            capacity = int(cpus // cpus_per_worker)
            spec = dataclasses.replace(spec, torch_threads=spec.torch_threads or cpus_per_worker)
            options = {"num_cpus": cpus_per_worker}
        workers = workers or capacity
        if workers < 1 or workers > capacity:
            what = f"{gpus:g} GPUs" if gpus_per_worker > 0 else f"{cpus:g} CPUs"
            raise FaceshieldError(f"Ray cluster has {what} free: room for {capacity} workers, {workers} asked; "
                                  "use fewer --ray-workers or add nodes")
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
        self.spec, self.batch_size = spec, max(1, batch_size)
        # max_restarts=0: a dead actor is replaced by us (a fresh one), so that its photos can be retried elsewhere
        self._options, self._free_at_start = options, float(resources.get("GPU" if gpus_per_worker > 0 else "CPU", 0))
        self._actor_class = ray.remote(worker_class).options(max_restarts=0, **options)
        self.actors: list[Any] = [self._actor_class.remote(spec) for _ in range(workers)]
        self._replacements = 0
        try:
            identities = ray.get([a.identity.remote() for a in self.actors], timeout=startup_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise FaceshieldError(f"Ray workers did not start within {startup_timeout:g} s") from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise FaceshieldError(f"a Ray worker could not start: {_one_line(exc)}") from None
        for identity in identities:
            if identity.get("error"):
                self.close()
                raise FaceshieldError(f"{identity['error']} (on Ray node {identity['host']})")
        digests = {i["settings_sha256"] for i in identities}
        if len(digests) != 1:
            self.close()
            raise FaceshieldError("Ray workers disagree on the settings hash; install the same faceshield and model "
                                  "files on every node")
        first = identities[0]
        self.settings_sha256: str = first["settings_sha256"]
        self.method = _MethodInfo(first["method"], first["config"])
        self.ensemble_names: list[str] = first["ensemble"]
        self.hosts = sorted({i["host"] for i in identities})
        log.info("%d Ray workers on %s (%s)", workers, ", ".join(self.hosts),
                 f"{gpus_per_worker:g} GPU each" if gpus_per_worker > 0 else f"{cpus_per_worker} CPU each")

    @staticmethod
    def _on_cuda(spec: WorkerSpec) -> WorkerSpec:
        from faceshield.methods.base import get_method_class

        fields = get_method_class(spec.method).Config.__dataclass_fields__
        if spec.config is not None:
            if getattr(spec.config, "device", None) == "cpu":  # the default: a GPU worker should use its GPU
                return dataclasses.replace(spec, config=dataclasses.replace(spec.config, device="cuda"))
            return spec
        if "device" in fields and "device" not in spec.overrides:
            return dataclasses.replace(spec, overrides={**spec.overrides, "device": "cuda"})
        return spec

    def close(self, wait: float = 10.0) -> None:
        """End the actors (the models' memory is freed); the Ray connection stays. Waits up to ``wait`` seconds
        for Ray to hand their CPUs/GPUs back (killing is asynchronous), so that a next pool finds them free."""
        ray = _ray()
        alive = [a for a in self.actors if a is not None]
        for actor in alive:
            ray.kill(actor)
        self.actors = []
        key = "GPU" if self._options.get("num_gpus") else "CPU"
        held = len(alive) * float(self._options.get("num_gpus") or self._options.get("num_cpus", 1))
        expected = min(float(ray.cluster_resources().get(key, 0)), self._free_at_start)
        deadline = time.monotonic() + wait
        while held and float(ray.available_resources().get(key, 0)) < expected and time.monotonic() < deadline:
            time.sleep(0.05)

    def _replace(self, slot: int) -> None:
        ray = _ray()
        try:
            ray.kill(self.actors[slot])
        except Exception:  # noqa: BLE001 (already gone)
            pass
        # bounded: a method that kills every actor it touches must not respawn forever
        if self._replacements >= 2 * len(self.actors) + 2:
            self.actors[slot] = None
            return
        self._replacements += 1
        self.actors[slot] = self._actor_class.remote(self.spec)

    def check_shared(self, paths: list[Path]) -> None:
        """Raise when some actor cannot see ``paths`` (absolute): inputs and outputs must be on a shared filesystem."""
        ray = _ray()
        names = [str(p) for p in paths]
        missing = ray.get([a.sees.remote(names) for a in self.actors if a is not None])
        for lost in missing:
            if lost:
                raise FaceshieldError(f"{lost[0]}: not visible on every Ray node; on a multi-node cluster put the "
                                      "photos and the output folder on a shared filesystem (NFS) mounted at the same "
                                      "path everywhere")

    def protect_files(self, jobs: list[tuple[Path, Path]], progress: Callable[[int, int], None] | None = None,
                      copy_no_face: bool = False,
                      on_record: Callable[[int, PhotoRecord], None] | None = None) -> list[PhotoRecord]:
        """Protect ``[(photo, out), ...]`` on the actors, ``batch_size`` photos per call, all actors busy.

        Args:
            jobs: photos and their outputs (as planned by :func:`faceshield.jobs.plan_jobs`).
            progress: ignored (step progress stays in the actors); photo progress comes through ``on_record``.
            copy_no_face: write a metadata-free copy of photos without a face (default False).
            on_record: called as ``on_record(index, record)`` as each photo finishes, in completion order.

        Returns:
            One record per job, in input order, as a local :class:`~faceshield.protect.Protector` makes them
            (paths as given); a photo whose worker failed twice is "failed" with a one-line error.
        """
        ray = _ray()
        if not jobs:
            return []
        resolved = [(photo.resolve(), out.resolve()) for photo, out in jobs]
        self.check_shared([resolved[0][0], resolved[0][1].parent])
        records: dict[int, PhotoRecord] = {}

        def deliver(i: int, record: PhotoRecord) -> None:
            record = _as_given(record, jobs[i], resolved[i])
            records[i] = record
            if on_record is not None:
                on_record(i, record)

        queue = collections.deque(_Task(tuple(range(s, min(s + self.batch_size, len(jobs)))))
                                  for s in range(0, len(jobs), self.batch_size))
        idle = [slot for slot, a in enumerate(self.actors) if a is not None]
        inflight: dict[Any, tuple[int, _Task]] = {}
        while queue or inflight:
            self._dispatch(queue, idle, inflight, resolved, copy_no_face)
            if not inflight:  # no actor left to run what remains
                for task in queue:
                    for i in task.indices:
                        deliver(i, _failed_record(jobs[i][0], "no Ray worker left"))
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                slot, task = inflight.pop(ref)
                try:
                    done = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the actor's process (or node) is gone
                    log.warning("Ray worker %d died on %s: %s", slot, jobs[task.indices[0]][0], _one_line(exc))
                    self._replace(slot)
                    reason = f"the Ray worker died ({_one_line(exc)})"
                except ray.exceptions.RayError as exc:  # the call raised: a bug, the actor itself is fine
                    log.warning("Ray worker %d failed on %s: %s", slot, jobs[task.indices[0]][0], _one_line(exc))
                    reason = f"the Ray worker failed ({_one_line(exc)})"
                else:
                    for i, record in zip(task.indices, done):
                        deliver(i, record)
                    reason = None
                if self.actors[slot] is not None:
                    idle.append(slot)
                if reason is None:
                    continue
                if task.attempt == 0:  # retry once, photo by photo (a bad photo must not sink its batch mates)
                    queue.extendleft(_Task((i,), 1, slot) for i in reversed(task.indices))
                else:
                    for i in task.indices:
                        deliver(i, _failed_record(jobs[i][0], f"{reason}; retried once"))
        return [records[i] for i in range(len(jobs))]

    def _dispatch(self, queue: collections.deque, idle: list[int], inflight: dict, resolved: list,
                  copy_no_face: bool) -> None:
        """Start queued tasks on idle actors; a retry goes to another actor than the one that failed it."""
        alive = sum(a is not None for a in self.actors)
        waiting = []
        while queue and idle:
            task = queue.popleft()
            choices = [s for s in idle if s != task.avoid] or (idle if alive == 1 else [])
            if not choices:
                waiting.append(task)
                continue
            slot = choices[0]
            idle.remove(slot)
            jobs = [(str(resolved[i][0]), str(resolved[i][1])) for i in task.indices]
            inflight[self.actors[slot].protect.remote(jobs, copy_no_face)] = (slot, task)
        if not inflight and waiting:  # only the failed actor's replacement is free: better there than nowhere
            task = waiting.pop(0)
            slot = idle.pop(0)
            jobs = [(str(resolved[i][0]), str(resolved[i][1])) for i in task.indices]
            inflight[self.actors[slot].protect.remote(jobs, copy_no_face)] = (slot, task)
        queue.extendleft(reversed(waiting))


def _one_line(exc: BaseException) -> str:
    """A Ray error as one short line: the original exception when Ray kept it, else the first line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, type(exc)):
        text = str(cause) if isinstance(cause, FaceshieldError) else f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _failed_record(photo: Path, reason: str) -> PhotoRecord:
    message = f"{photo}: {reason}"
    log.info("%s", message)  # the caller reports failures once (the CLI's FAIL line)
    return PhotoRecord(str(photo), None, "failed", error=message)


def _as_given(record: PhotoRecord, job: tuple[Path, Path], resolved: tuple[Path, Path]) -> PhotoRecord:
    """The record with the paths as the user gave them (actors saw absolute paths), as a local run writes it."""
    photo, out = job
    record.input = str(photo)
    if record.output is not None:
        record.output = str(out)
    for name in ("error", "note"):
        text = getattr(record, name)
        if text:
            setattr(record, name, text.replace(str(resolved[0]), str(photo)).replace(str(resolved[1]), str(out)))
    return record


def connect(address: str | None = None) -> bool:
    """Initialise Ray: ``address`` "auto" (the cluster this machine belongs to), "HOST:PORT", or None to start a
    local instance. Returns whether this call initialised Ray (the caller then shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = address or "a local instance"
        raise FaceshieldError(f"cannot connect to Ray at {where}: {_one_line(exc)}; start it with `ray start --head` "
                              "or check --ray ADDRESS") from None
    return True


def protect_with_ray(plan: Plan, method_name: str, preset: str | None = None, overrides: dict | None = None, *,
                     address: str | None = "auto", workers: int | None = None, gpus_per_worker: float | None = None,
                     detector: str | None = None, target: str | Path | None = None, keep_metadata: bool = False,
                     jpeg_quality: int = 95, copy_no_face: bool = True, progress: bool = True,
                     batch_size: int = 1, config: Any = None) -> ProtectRun:
    """Run ``plan`` (from :func:`faceshield.jobs.plan_jobs`) on a Ray cluster: the same outputs, log, verdicts,
    resume and skip semantics as :func:`faceshield.protect.protect_paths` with a local Protector.

    Args:
        plan: the checked plan.
        method_name, preset, overrides: the method, as for :func:`faceshield.methods.base.create_method`
            (checked on the driver before any Ray work; default no preset, no overrides).
        address: Ray address: "auto" (default; the running cluster), "HOST:PORT", or None for a local instance.
        workers: actors; default one per GPU, or one per CPU slot.
        gpus_per_worker: GPUs per actor (default 1 with GPUs, else CPU actors).
        detector: face detector name (default the project's default).
        target: photo to impersonate (on the shared filesystem), or None.
        keep_metadata, jpeg_quality: as for the local Protector (default False, 95).
        copy_no_face: with an output folder, copy photos without a face there (default True).
        progress: show a progress bar (default True).
        batch_size: photos per actor call (default 1).
        config: the method's checked config (:func:`faceshield.methods.base.method_config`) instead of ``preset``
            and ``overrides`` (default None); with GPU workers a ``device`` of "cpu" becomes "cuda".

    Raises:
        FaceshieldError: bad settings, Ray missing or unreachable, workers that cannot start.
    """
    from faceshield.methods.base import method_config

    overrides = dict(overrides or {})
    if config is None:
        method_config(method_name, preset, **overrides)  # bad settings stop here, before any Ray work
    spec = WorkerSpec(method_name, preset, overrides, detector, str(Path(target).resolve()) if target else None,
                      keep_metadata, jpeg_quality, config=config)
    started = connect(address)
    ray = _ray()
    protector = None
    try:
        protector = RayProtector(spec, workers, gpus_per_worker, batch_size=batch_size)
        # the whole plan at once: records stream back (and into the log) as they finish, no batch barriers
        return protect_paths(plan, protector, progress=progress, batch_size=max(1, len(plan.jobs)),
                             copy_no_face=copy_no_face)
    finally:
        if protector is not None:
            protector.close()
        if started:
            ray.shutdown()


def surrogate_names(config: Any) -> list[str]:
    """The FR models a method config attacks (empty ``surrogates`` → the calibrated default), without loading
    them: what the CLI's summary counts when the models live in the Ray actors."""
    from faceshield.eval.calibration import shipped_table

    if not hasattr(config, "surrogates"):
        return []
    return list(config.surrogates) or shipped_table().surrogate_models()


def ray_runner_factory(address: str | None = "auto", workers: int | None = None,
                       gpus_per_worker: float | None = None) -> Callable[[Any], RayProtector]:
    """A ``runner_factory`` for :class:`faceshield.server.worker.WorkerPool`: each runner is a pool of Ray actors.

    The server's uploads folder (and the target photo) must then be on a filesystem every Ray node sees, and step
    progress (hence cancelling a running job mid-photo) is not forwarded; one actor pool per cached runner, so
    use ``runner_cache=1`` unless the cluster has room for several pools.

    Args:
        address: as for :func:`connect` (default "auto").
        workers, gpus_per_worker: as for :class:`RayProtector` (default: fill the cluster).
    """

    def factory(spec: Any) -> RayProtector:
        from faceshield.faces.detect import DEFAULT_DETECTOR

        connect(address)
        target = str(Path(spec.target).resolve()) if spec.target else None
        return RayProtector(WorkerSpec(spec.method, detector=DEFAULT_DETECTOR, target=target, config=spec.config),
                            workers, gpus_per_worker)

    return factory
