"""`faceshield serve`: the REST API (status codes, limits, token, TTL, queue), a schemathesis fuzz run of the served
OpenAPI schema, real protection of a real face through the API, and a bounded load test on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import struct
import threading
import time
import zipfile
import zlib
from io import BytesIO

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import PAIRS, pair_ids  # noqa: E402
from server_helpers import FAST, FakeRunner, live_server, png_bytes, rss_mb  # noqa: E402

from faceshield.server.app import ServerSettings, create_app  # noqa: E402

API = "/api/v1"


def fake_app(runner: FakeRunner | None = None, **kwargs):
    runner = runner or FakeRunner()
    return create_app(ServerSettings(runner_factory=lambda spec: runner, **kwargs))


def upload(client, *photos: tuple[str, bytes], headers=None, **data):
    files = [("photos", (name, content, "application/octet-stream")) for name, content in photos]
    return client.post(f"{API}/jobs", files=files, data=data, headers=headers or {})


def wait_done(client, job_id: str, timeout: float = 120, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"{API}/jobs/{job_id}", headers=headers or {}).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


# --- plumbing ---------------------------------------------------------------------------------------------------
def test_health_version_methods_limits_and_schema():
    with TestClient(fake_app()) as client:
        assert client.get(f"{API}/health").json()["status"] == "ok"
        assert client.get(f"{API}/version").json()["api"] == "v1"
        methods = client.get(f"{API}/methods").json()
        assert {"cloak", "pgd"} <= set(methods)
        assert methods["cloak"]["defaults"]["steps"] == 40
        assert methods["cloak"]["allowed"]["steps"] == "[1, inf)"
        assert set(methods["cloak"]["strengths"]) == {"low", "mid", "high"}
        assert client.get(f"{API}/limits").json()["max_photos"] == 20
        schema = client.get("/openapi.json").json()
        assert {f"{API}/jobs", f"{API}/jobs/{{job_id}}", f"{API}/jobs/{{job_id}}/photos/{{index}}/result"} <= \
            set(schema["paths"])
        page = client.get("/")
        assert page.status_code == 200 and "faceshield" in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # no CDN, no external fonts
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/static/app.js").status_code == 200


def test_job_lifecycle_progress_download_once_zip_and_delete():
    with TestClient(fake_app()) as client:
        # a PNG named .jpg: the type comes from the bytes, and the result keeps the real format
        r = upload(client, ("me.jpg", png_bytes()), ("second.png", png_bytes(40, 40)))
        assert r.status_code == 202, r.text
        assert r.headers["location"] == f"{API}/jobs/{r.json()['id']}"
        job = wait_done(client, r.json()["id"])
        assert job["state"] == "done" and job["counts"]["protected"] == 2 and job["progress"] == 1.0
        photo = job["photos"][0]
        assert photo["boxes"] == [[16.0, 12.0, 48.0, 36.0]] and (photo["width"], photo["height"]) == (64, 48)
        assert photo["record"]["summary"].startswith("protected")
        assert photo["record"]["input"] == "me.jpg" and "/" not in str(photo["record"]["output"])
        assert photo["result_name"] == "me_protected.png"
        assert client.get(f"{API}/jobs/{job['id']}/photos/0").json()["record"]["similarity"]["fake-model"]
        result = client.get(f"{API}/jobs/{job['id']}/photos/0/result")
        assert result.status_code == 200 and result.headers["content-type"] == "image/png"
        assert "me_protected.png" in result.headers["content-disposition"]
        assert result.content == png_bytes()
        # deleted once downloaded: the second download is 410, the zip holds only the other photo
        assert client.get(f"{API}/jobs/{job['id']}/photos/0/result").status_code == 410
        archive = client.get(f"{API}/jobs/{job['id']}/results.zip")
        assert archive.status_code == 200
        assert sorted(zipfile.ZipFile(BytesIO(archive.content)).namelist()) == ["records.json",
                                                                                "second_protected.png"]
        assert client.delete(f"{API}/jobs/{job['id']}").status_code == 204
        assert client.get(f"{API}/jobs/{job['id']}").status_code == 404
        assert client.delete(f"{API}/jobs/{job['id']}").status_code == 404
        assert client.get(f"{API}/jobs/{job['id']}/photos/5").status_code == 404


@pytest.mark.parametrize("name, content", [
    ("cat.png", b"GIF89a" + b"\0" * 100),          # a GIF named .png
    ("notes.jpg", b"hello, not a photo at all"),
    ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),  # PNG magic, garbage header
    ("empty.png", b""),
])
def test_unsupported_files_are_415_with_one_line(name, content):
    with TestClient(fake_app()) as client:
        r = upload(client, (name, content))
        assert r.status_code == 415, r.text
        assert set(r.json()) == {"error"} and "\n" not in r.json()["error"] and name in r.json()["error"]


def test_limits_size_pixels_bombs_count_and_body():
    with TestClient(fake_app(max_upload_mb=0.05, max_pixels=10_000, max_photos=2)) as client:
        big = upload(client, ("big.bmp", png_bytes(200, 200, "BMP")))  # 120 kB > 50 kB
        assert big.status_code == 413 and "MB" in big.json()["error"]
        many_pixels = upload(client, ("wide.png", png_bytes(200, 60)))  # 12 000 px > 10 000
        assert many_pixels.status_code == 413 and "megapixels" in many_pixels.json()["error"]
        bomb = upload(client, ("bomb.png", png_header_only(100_000, 100_000)))  # 10 GP claimed in 100 bytes
        assert bomb.status_code == 413
        three = upload(client, *[(f"{i}.png", png_bytes(20, 20)) for i in range(3)])
        assert three.status_code == 413 and "at most 2" in three.json()["error"]
        # the whole request is limited too (here to 3 × 50 kB + 1 MB), before any multipart parsing
        body = client.post(f"{API}/jobs", content=b"x" * 2_000_000, headers={"content-type": "multipart/form-data; "
                                                                          "boundary=x"})
        assert body.status_code == 413
    with TestClient(fake_app()) as client:  # the default limit, 40 MP, is below Pillow's own guard (179 MP)
        assert upload(client, ("bomb.png", png_header_only(8_000, 8_000))).status_code == 413


def test_bad_method_settings_and_strength_are_400():
    with TestClient(fake_app()) as client:
        photo = ("a.png", png_bytes())
        assert upload(client, photo, method="nope").status_code == 400
        r = upload(client, photo, settings=["steps=0"])
        assert r.status_code == 400 and "steps" in r.json()["error"]
        assert upload(client, photo, settings=["nosuch=1"]).status_code == 400
        assert upload(client, photo, method="pgd", strength="high").status_code == 400
        assert upload(client, photo, strength="extreme").status_code == 400
        assert client.post(f"{API}/jobs", data={"method": "cloak"}).status_code == 422  # no photo
        assert upload(client, photo, settings=["steps=3\neot=false"]).status_code == 202  # one per line works too


def test_token_is_required_and_compared():
    with TestClient(fake_app(token="s3cret")) as client:
        assert client.get(f"{API}/health").status_code == 200  # health and version stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = client.get(f"{API}/methods", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert upload(client, ("a.png", png_bytes())).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.get(f"{API}/methods", headers=good).status_code == 200
        r = upload(client, ("a.png", png_bytes()), headers=good)
        assert r.status_code == 202
        assert client.get(f"{API}/jobs/{r.json()['id']}").status_code == 401


def test_ttl_deletes_finished_jobs_and_their_files():
    app = fake_app(ttl_s=0.5)
    with TestClient(app) as client:
        manager = app.state.manager
        job = wait_done(client, upload(client, ("a.png", png_bytes())).json()["id"])
        folder = manager.folder / job["id"]
        assert folder.is_dir() and 0 < job["expires_in_s"] <= 0.5
        deadline = time.monotonic() + 10  # the reaper runs every ttl/4 (≥ 0.2 s)
        while client.get(f"{API}/jobs/{job['id']}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get(f"{API}/jobs/{job['id']}").status_code == 404
        assert not folder.exists()


def test_queue_full_is_429_with_retry_after_and_delete_cancels_a_running_job():
    gate = threading.Event()
    app = fake_app(FakeRunner(gate=gate), workers=1, queue_size=1)
    with TestClient(app) as client:
        first = upload(client, ("a.png", png_bytes())).json()["id"]
        deadline = time.monotonic() + 10
        while client.get(f"{API}/jobs/{first}").json()["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        second = upload(client, ("b.png", png_bytes()))
        assert second.status_code == 202
        full = upload(client, ("c.png", png_bytes()))
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert "busy" in full.json()["error"]
        assert len(list(app.state.manager.folder.iterdir())) == 2  # the refused upload left nothing behind
        # deleting the running job stops it at its next step and removes its files
        assert client.delete(f"{API}/jobs/{first}").status_code == 204
        folder = app.state.manager.folder / first
        deadline = time.monotonic() + 10
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not folder.exists()
        gate.set()
        assert wait_done(client, second.json()["id"])["counts"]["protected"] == 1


def test_private_folder_cors_off_and_cleanup_on_shutdown():
    app = fake_app()
    folder = app.state.manager.folder
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    with TestClient(app) as client:
        r = client.get(f"{API}/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = client.options(f"{API}/jobs", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
        job = upload(client, ("a.png", png_bytes())).json()["id"]
        assert (folder / job).is_dir()
    assert not folder.exists()  # removed on shutdown, with every upload and result in it

    with TestClient(fake_app(cors_origins=("http://localhost:3000",))) as client:
        r = client.get(f"{API}/health", headers={"Origin": "http://localhost:3000"})
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_logs_hold_no_file_names(caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(fake_app()) as client:
        job = upload(client, ("Jane Doe at the beach.png", png_bytes())).json()["id"]
        wait_done(client, job)
        client.get(f"{API}/jobs/{job}/photos/0/result")
    assert "Jane Doe" not in caplog.text
    assert job in caplog.text  # the log does say what happened, by job id


def test_an_internal_error_is_a_500_without_traceback():
    class Broken(FakeRunner):
        def protect_files(self, jobs, progress=None, copy_no_face=False):
            raise ValueError("boom in /secret/path")

    with TestClient(fake_app(Broken())) as client:
        job = wait_done(client, upload(client, ("a.png", png_bytes())).json()["id"])
        assert job["photos"][0]["status"] == "failed"
        assert job["photos"][0]["record"]["summary"].startswith("failed: ")
        assert "Traceback" not in str(job) and "/secret/path" not in str(job)


# --- fuzzing the served schema ----------------------------------------------------------------------------------
def test_schemathesis_fuzz_no_server_errors():
    """Every operation of the served OpenAPI schema, with generated (mostly invalid) inputs: never a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    app = fake_app(max_upload_mb=0.5)
    with TestClient(app):  # starts the worker pool for the ASGI app schemathesis calls in-process
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        failures = []
        for operation in schema.get_all_operations():
            op = operation.ok()

            @given(case=op.as_strategy())
            @settings(max_examples=15, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call()
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:200]}")
                case.validate_response(response, checks=[not_a_server_error])

            check()
        assert not failures, failures


# --- real protection through the API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_app(shared_data):
    app = create_app(ServerSettings(workers=1, queue_size=8))
    with TestClient(app) as client:
        yield app, client


def test_real_face_is_protected_with_boxes_and_similarities(real_app):
    _, client = real_app
    photo = PAIRS / "train" / f"{pair_ids(1)[0]}.png"
    r = upload(client, ("face.png", photo.read_bytes()), ("flat.png", png_bytes(64, 64)), settings=FAST)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"], timeout=300)
    face, flat = job["photos"]
    assert face["status"] in ("protected", "weak"), face["record"]
    assert len(face["boxes"]) == 1 and face["boxes"][0][2] > face["boxes"][0][0]
    sims = face["record"]["similarity"]["mobilefacenet-ms1m"]
    assert sims["before"] == [1.0] and sims["threshold"] is not None
    assert face["record"]["summary"].split(":")[0] in ("protected", "weak")
    assert flat["status"] == "no-face" and flat["record"]["summary"] == "no face found: nothing to protect"
    assert flat["result_available"] is False
    result = client.get(f"{API}/jobs/{job['id']}/photos/0/result")
    assert result.status_code == 200 and result.content[:4] == b"\x89PNG"
    assert client.get(f"{API}/jobs/{job['id']}/photos/1/result").status_code == 404


def test_load_50_concurrent_jobs_finish_or_429_with_bounded_memory(shared_data):
    """50 clients at once on a real loopback server: every job is accepted (and finishes) or refused with 429 and
    Retry-After; never a 5xx; the server process's memory stays bounded."""
    import httpx

    photo = (PAIRS / "train" / f"{pair_ids(1)[0]}.png").read_bytes()
    app = create_app(ServerSettings(workers=1, queue_size=4))
    fast = FAST[:-2] + ["steps=1", "eot=false"]
    with live_server(app) as base:
        with httpx.Client(base_url=base, timeout=120) as warm:  # load the models once, then measure
            job = warm.post(f"{API}/jobs", files=[("photos", ("w.png", photo))], data={"settings": fast}).json()
            wait_done(warm, job["id"], timeout=300)
        rss_before = rss_mb()

        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, dict | None]:
            r = await client.post(f"{API}/jobs", files=[("photos", (f"{i}.png", photo))], data={"settings": fast})
            if r.status_code != 202:
                return r.status_code, r.headers.get("retry-after"), None
            while True:
                job = (await client.get(f"{API}/jobs/{r.json()['id']}")).json()
                if job["state"] not in ("queued", "running"):
                    return 202, None, job
                await asyncio.sleep(0.2)

        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                return await asyncio.gather(*(one(client, i) for i in range(50)))

        start = time.monotonic()
        results = asyncio.run(burst())
        seconds = time.monotonic() - start
        rss_after = rss_mb()
    codes = [code for code, _, _ in results]
    assert set(codes) <= {202, 429}, codes
    assert all(retry and int(retry) >= 1 for code, retry, _ in results if code == 429)
    accepted = [job for code, _, job in results if code == 202]
    assert 1 <= len(accepted) <= 50
    assert all(job["photos"][0]["status"] in ("protected", "weak") for job in accepted)
    logging.getLogger(__name__).warning("load: %d accepted, %d refused (429) in %.1f s; RSS %.0f → %.0f MB",
                                        len(accepted), codes.count(429), seconds, rss_before, rss_after)
    assert rss_after - rss_before < 1024, (rss_before, rss_after)
