"""The web server's FastAPI application: REST API under ``/api/v1`` and the web page at ``/``.

``create_app(ServerSettings(...))`` builds the app; ``faceshield serve`` runs it with uvicorn. The OpenAPI schema
is at ``/openapi.json`` (interactive docs at ``/docs``, served from the CDN-free page only when asked: FastAPI's
own docs page loads its script from a CDN, so it is off by default).

Privacy: uploads are checked from their bytes (never their name), kept in a private 0700 folder and deleted with
their job (DELETE, TTL, after download, shutdown); nothing logs photo names or pixels; nothing calls the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import re
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from faceshield import __version__
from faceshield.errors import FaceshieldError
from faceshield.server.worker import Job, JobManager, PhotoState, QueueFull, RunnerFactory, RunnerSpec, local_runner

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
API = "/api/v1"

# Content sniffing: the first bytes of each format faceshield reads, and the suffix its result is written with.
MAGIC: tuple[tuple[str, bytes, int], ...] = (
    ("JPEG", b"\xff\xd8\xff", 0),
    ("PNG", b"\x89PNG\r\n\x1a\n", 0),
    ("WEBP", b"WEBP", 8),  # RIFF....WEBP
    ("BMP", b"BM", 0),
    ("TIFF", b"II*\x00", 0),
    ("TIFF", b"MM\x00*", 0),
)
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}


@dataclass
class ServerSettings:
    """Settings of ``faceshield serve`` (every default is the CLI's).

    Attributes:
        host: interface to bind; default 127.0.0.1 (this machine only). Anything else exposes the server.
        port: TCP port; default 8000.
        workers: jobs run at once (worker threads); default 1 (one job already uses every CPU core).
        queue_size: jobs that may wait beyond the running ones; more get HTTP 429 with Retry-After; default 8.
        ttl_s: seconds a finished job and its files are kept; default 900 (15 min).
        token: when set, every API call except health and version needs ``Authorization: Bearer <token>``;
            default None (no token: fine on 127.0.0.1).
        cors_origins: origins allowed by CORS; default none (CORS off: only the server's own page can call it).
        max_upload_mb: largest photo, in MB (10^6 bytes); default 25.
        max_pixels: largest photo, in pixels (width × height), checked from the header before decoding;
            default 40 000 000 (40 MP; the library's own limit is 250 MP, but a web server shares its memory).
        max_photos: photos per job; default 20.
        delete_after_download: delete a result file as soon as it has been downloaded (its record stays until
            the TTL); default True.
        runner_cache: protectors (loaded models) each worker keeps for different settings; default 2.
        runner_factory: builds what runs ``protect_files`` for a method and settings; default a local
            :class:`faceshield.protect.Protector` (a Ray-backed one can be injected).
        temp_root: parent of the private temporary folder; default the system temp folder.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    queue_size: int = 8
    ttl_s: float = 900.0
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_upload_mb: float = 25.0
    max_pixels: int = 40_000_000
    max_photos: int = 20
    delete_after_download: bool = True
    runner_cache: int = 2
    runner_factory: RunnerFactory = field(default=local_runner, repr=False)
    temp_root: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_request_bytes(self) -> int:
        """A whole request: every photo and the target at their limit, plus the form fields."""
        return self.max_upload_bytes * (self.max_photos + 1) + 1_000_000


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status`` (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuses request bodies over ``limit`` bytes with 413, from Content-Length when given and
    by counting otherwise, before the multipart parser spools them anywhere."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = JSONResponse({"error": f"request too large (limit {self.limit / 1e6:.0f} MB)"}, status_code=413)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


def safe_name(name: str | None, fallback: str = "photo") -> str:
    """A display name for an uploaded file: its base name, printable, at most 100 characters."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in unicodedata.normalize("NFC", name) if c.isprintable() and c not in '"<>|:*?')
    name = re.sub(r"\s+", " ", name).strip(" .")
    return name[-100:] or fallback


def sniff(data: bytes, settings: ServerSettings, label: str) -> tuple[str, int, int]:
    """The format (from magic bytes, confirmed by Pillow's header parser) and size of an uploaded photo.

    Raises:
        ApiError: 415 for anything but JPEG, PNG, WebP, BMP or TIFF (whatever the name says); 413 above the
            pixel limit (decompression bombs included: only the header is read).
    """
    from PIL import Image

    from faceshield.images import DECODERS

    fmt = next((f for f, magic, at in MAGIC if data[at:at + len(magic)] == magic), None)
    if fmt == "WEBP" and not data.startswith(b"RIFF"):
        fmt = None
    unsupported = f"{label}: unsupported file type; send a JPEG, PNG, WebP, BMP or TIFF photo"
    if fmt is None:
        raise ApiError(415, unsupported)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we apply our own, lower limit below
            with Image.open(io.BytesIO(data), formats=DECODERS) as img:
                width, height, opened = img.size[0], img.size[1], img.format
    except Image.DecompressionBombError:
        raise ApiError(413, f"{label}: too many pixels (limit {settings.max_pixels / 1e6:.0f} MP); downscale it")
    except Exception:  # noqa: BLE001 - a malformed header can make Pillow raise almost anything
        raise ApiError(415, f"{label}: not a readable {fmt} image; re-export it as JPEG or PNG") from None
    if opened != fmt and not (fmt == "JPEG" and opened == "MPO"):
        raise ApiError(415, unsupported)
    if width * height > settings.max_pixels:
        raise ApiError(413, f"{label}: {width}×{height} is more than {settings.max_pixels / 1e6:.0f} megapixels; "
                            "downscale it first")
    if width < 2 or height < 2:
        raise ApiError(415, f"{label}: image is only {width}×{height} pixels")
    return fmt, width, height


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app for ``settings`` (default :class:`ServerSettings`()). Its worker pool starts with the app's
    lifespan (uvicorn, or ``with TestClient(app)``) and its private folder is removed when the app stops."""
    settings = settings or ServerSettings()
    manager = JobManager(settings.workers, settings.queue_size, settings.ttl_s, settings.runner_factory,
                         settings.runner_cache, settings.delete_after_download, settings.temp_root)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        try:
            yield
        finally:
            manager.close()

    app = FastAPI(title="faceshield", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Protect the faces in photos from face recognition. Jobs: upload photos, poll the "
                              "job, download the results; results are deleted after download or after the TTL.")
    app.state.settings, app.state.manager = settings, manager
    bearer = HTTPBearer(auto_error=False, description="Needed only when the server was started with --token.")

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        # constant-time comparison: the time taken must not reveal how much of the token was right
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise ApiError(401, "missing or wrong token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})

    open_api = APIRouter(prefix=API, tags=["server"])
    api = APIRouter(prefix=API, dependencies=[Depends(check_token)], tags=["jobs"])
    errors = {400: {"description": "bad request"}, 401: {"description": "missing or wrong token"},
              404: {"description": "no such job or photo"}}

    @open_api.get("/health", summary="Is the server up; how busy is it")
    def health() -> dict:
        return {"status": "ok", "workers": settings.workers, "queue_size": settings.queue_size,
                "jobs": len(manager.jobs), "accepting": manager.has_room()}

    @open_api.get("/version", summary="Versions")
    def version() -> dict:
        return {"faceshield": __version__, "api": "v1"}

    @api.get("/methods", summary="Protection methods, their default settings, allowed ranges and strengths",
             responses=errors)
    def methods() -> dict:
        from faceshield.methods.base import describe_methods  # torch loads on first use, not at start-up

        return describe_methods()

    @api.get("/limits", summary="Upload limits of this server", responses=errors)
    def limits() -> dict:
        return {"max_upload_mb": settings.max_upload_mb, "max_pixels": settings.max_pixels,
                "max_photos": settings.max_photos, "ttl_s": settings.ttl_s,
                "formats": ["JPEG", "PNG", "WebP", "BMP", "TIFF"]}

    async def read_upload(upload: UploadFile, label: str) -> bytes:
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, f"{label}: larger than {settings.max_upload_mb:g} MB; downscale or recompress it")
        if not data:
            raise ApiError(415, f"{label}: empty file")
        return data

    @api.post("/jobs", status_code=202, summary="Create a job: upload photos to protect",
              responses={**errors, 413: {"description": "too large"}, 415: {"description": "unsupported file"},
                         429: {"description": "queue full; see Retry-After"}})
    async def create_job(
        photos: Annotated[list[UploadFile], File(description="One or more photos (JPEG, PNG, WebP, BMP, TIFF).")],
        method: Annotated[str, Form(description="Protection method (GET /methods).")] = "cloak",
        strength: Annotated[str | None, Form(description="Strength preset (low, mid, high) of methods that have "
                                                         "them; default mid.")] = None,
        settings_: Annotated[list[str] | None, Form(alias="settings", description="Method settings as KEY=VALUE, "
                                                    "e.g. steps=20 (repeatable).")] = None,
        target: Annotated[UploadFile | None, File(description="Photo of someone to impersonate (optional).")] = None,
    ) -> JSONResponse:
        from faceshield.methods.base import get_method_class, method_config
        from faceshield.settings import parse_overrides

        if not manager.has_room():  # fail fast, before writing anything
            wait = manager.retry_after()
            raise ApiError(429, f"the server is busy; retry in {wait} s", {"Retry-After": str(wait)})
        if not photos:
            raise ApiError(400, "no photo sent (form field 'photos')")
        if len(photos) > settings.max_photos:
            raise ApiError(413, f"{len(photos)} photos; at most {settings.max_photos} per job")
        cls = get_method_class(method.strip())  # FaceshieldError → 400
        items = [line.strip() for item in (settings_ or []) for line in item.splitlines() if line.strip()]
        overrides = parse_overrides(cls.Config, items)
        strength = (strength or "").strip() or None
        if strength is not None and not cls.presets:
            raise ApiError(400, f"{method}: has no strength presets; use settings instead")
        config = method_config(cls.name, preset=(strength or "mid") if cls.presets else None, **overrides)

        checked = []
        for i, upload in enumerate(photos):
            name = safe_name(upload.filename, f"photo-{i + 1}")
            data = await read_upload(upload, name)
            checked.append((name, data, *sniff(data, settings, name)))
        target_bytes = None
        if target is not None and (target.filename or target.size):
            target_name = safe_name(target.filename, "target")
            target_bytes = await read_upload(target, f"target {target_name}")
            target_fmt = sniff(target_bytes, settings, f"target {target_name}")[0]

        job_id, folder = manager.new_job_folder()
        states = []
        for i, (name, data, fmt, width, height) in enumerate(checked):
            upload_path = folder / f"photo-{i}{SUFFIX[fmt]}"  # our own name: the client's never touches the disk
            upload_path.write_bytes(data)
            states.append(PhotoState(i, name, upload_path, folder / f"result-{i}{SUFFIX[fmt]}", MEDIA[fmt],
                                     width, height))
        target_path = target_sha = None
        if target_bytes is not None:
            target_path = folder / f"target{SUFFIX[target_fmt]}"
            target_path.write_bytes(target_bytes)
            target_sha = hashlib.sha256(target_bytes).hexdigest()
        job = Job(job_id, folder, RunnerSpec(cls.name, config, target_path, target_sha),
                  (strength or "mid") if cls.presets else None, states)
        try:
            manager.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        return JSONResponse(job.to_dict(settings.ttl_s), status_code=202,
                            headers={"Location": f"{API}/jobs/{job_id}"})

    def find(job_id: str) -> Job:
        job = manager.get(job_id)
        if job is None:
            raise ApiError(404, "no such job (finished jobs are deleted after download or after the TTL)")
        return job

    def find_photo(job_id: str, index: int) -> tuple[Job, PhotoState]:
        job = find(job_id)
        if not 0 <= index < len(job.photos):
            raise ApiError(404, f"no photo {index} in this job (it has {len(job.photos)})")
        return job, job.photos[index]

    @api.get("/jobs/{job_id}", summary="Job status with per-photo progress and records", responses=errors)
    def get_job(job_id: str) -> dict:
        return find(job_id).to_dict(settings.ttl_s)

    @api.delete("/jobs/{job_id}", status_code=204, summary="Delete a job and its files (stops it if running)",
                responses=errors)
    def delete_job(job_id: str) -> Response:
        if not manager.delete(job_id):
            raise ApiError(404, "no such job")
        return Response(status_code=204)

    @api.get("/jobs/{job_id}/photos/{index}", summary="One photo's state and record (verdict, similarities, "
             "face boxes)", responses=errors)
    def get_photo(job_id: str, index: int) -> dict:
        return find_photo(job_id, index)[1].to_dict()

    def result_or_error(photo: PhotoState) -> Path:
        if photo.status in ("queued", "running"):
            raise ApiError(409, "not finished yet; poll the job")
        if photo.result_deleted:
            raise ApiError(410, "the result was already downloaded and has been deleted")
        if photo.record is None or not photo.record.get("output") or not photo.output.is_file():
            raise ApiError(404, f"no result for this photo: {photo.record.get('summary') if photo.record else ''}")
        return photo.output

    @api.get("/jobs/{job_id}/photos/{index}/result", summary="Download the protected photo (deleted after "
             "download unless the server keeps results)",
             responses={**errors, 409: {"description": "not finished"}, 410: {"description": "already downloaded"}},
             response_class=FileResponse)
    def get_result(job_id: str, index: int) -> Response:
        job, photo = find_photo(job_id, index)
        data = result_or_error(photo).read_bytes()  # read before deleting it
        manager.mark_downloaded(job, [photo])
        return _attachment(data, photo.content_type, photo.result_name)

    @api.get("/jobs/{job_id}/results.zip", summary="Download every protected photo and the records as a zip",
             responses={**errors, 409: {"description": "not finished"}}, response_class=FileResponse)
    def get_zip(job_id: str) -> Response:
        job = find(job_id)
        if job.state in ("queued", "running"):
            raise ApiError(409, "not finished yet; poll the job")
        buffer = io.BytesIO()
        sent, names = [], set()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:  # photos are compressed already
            for photo in job.photos:
                if photo.record and photo.record.get("output") and not photo.result_deleted and photo.output.is_file():
                    name, n = photo.result_name, 2
                    while name in names:
                        stem, dot, ext = photo.result_name.rpartition(".")
                        name, n = f"{stem}-{n}{dot}{ext}", n + 1
                    names.add(name)
                    zf.write(photo.output, name)
                    sent.append(photo)
            zf.writestr("records.json", json.dumps([p.record for p in job.photos], indent=2))
        manager.mark_downloaded(job, sent)
        return _attachment(buffer.getvalue(), "application/zip", "faceshield-protected.zip")

    app.include_router(open_api)
    app.include_router(api)

    # --- errors: one JSON line, never a traceback --------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(FaceshieldError)
    async def faceshield_error(request: Request, exc: FaceshieldError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")},
                            status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        return JSONResponse({"error": "internal error; see the server log"}, status_code=500)

    # --- the web page -------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        # the page loads nothing from elsewhere; results are shown from blob: URLs
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                                    "style-src 'self'; connect-src 'self'; frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.url.path.startswith(API):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization"],
                           expose_headers=["Retry-After", "Location"])
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    return app


def _attachment(data: bytes, media_type: str, filename: str) -> Response:
    from urllib.parse import quote

    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"
    return Response(data, media_type=media_type, headers={"Content-Disposition": disposition})
