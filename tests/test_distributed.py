"""Protecting on Ray: a local Ray instance with 2 workers gives what a local run gives; failed workers are retried
once, then reported in one line."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PAIRS, pair_ids

ray = pytest.importorskip("ray")

from faceshield.distributed import ProtectWorker, RayProtector, WorkerSpec  # noqa: E402
from faceshield.images import load_image  # noqa: E402
from faceshield.jobs import plan_jobs  # noqa: E402
from faceshield.methods.base import create_method  # noqa: E402
from faceshield.protect import Protector, protect_paths  # noqa: E402

FAST = {"surrogates": ("mobilefacenet-ms1m",), "steps": 5, "eot": False}


class FlakyWorker(ProtectWorker):
    """Injected faults, by photo name: ``crash_once`` kills its actor the first time only (a marker file on the
    shared filesystem remembers), ``crash`` kills every actor that touches it, ``raise`` makes the call raise."""

    def protect(self, jobs, copy_no_face):
        for photo, _ in jobs:
            name = Path(photo).stem
            if name == "crash_once":
                marker = Path(photo).with_suffix(".crashed")
                if not marker.exists():
                    marker.touch()
                    os._exit(1)
            elif name == "crash":
                os._exit(1)
            elif name == "raise":
                raise ValueError("injected fault")
        return super().protect(jobs, copy_no_face)


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance: no token file in ~/.ray
    # the test module travels by value: Ray workers cannot import it by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # 4 logical CPU slots on a 2-core machine: the module's 2-worker pool and a 2-worker command-line run
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_local):
    protector = RayProtector(WorkerSpec("cloak", overrides=FAST), workers=2)
    yield protector
    protector.close()


def _faces(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, pid in zip(names, pair_ids(len(names))):
        Image.fromarray(load_image(PAIRS / "train" / f"{pid}.png").rgb).save(folder / f"{name}.png")


def test_two_workers_match_a_local_run(tmp_path, shared_data, pool):
    photos = tmp_path / "in"
    _faces(photos, ["a", "b", "c"])
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(photos / "noface.png")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each CPU actor: the same float reductions, the same pixels
    try:
        local = Protector(create_method("cloak", **FAST))
        expected = protect_paths([photos], local, tmp_path / "local", progress=False).records
    finally:
        torch.set_num_threads(threads)
    assert pool.settings_sha256 == local.settings_sha256  # a local run's log is reusable by Ray, and back
    assert pool.method.name == "cloak" and pool.method.config_dict() == local.method.config_dict()

    out = tmp_path / "ray"
    plan = plan_jobs([photos], out)
    run = protect_paths(plan, pool, progress=False, batch_size=len(plan.jobs))
    got = run.records
    assert [r.status for r in got] == [r.status for r in expected]
    # 5 steps: some faces may stay weak; what matters is that both runs agree, face by face
    counts = run.counts()
    assert (counts["failed"], counts["no-face"], counts["protected"] + counts["weak"]) == (1, 1, 3)
    assert [Path(r.output).name if r.output else None for r in got] == \
           [Path(r.output).name if r.output else None for r in expected]
    assert [r.input for r in got] == [str(p) for p in sorted(photos.iterdir())]  # input order, paths as given
    for r, e in zip(got, expected):
        if r.status == "failed":
            assert r.error == e.error and "\n" not in r.error
        if r.output:
            a = np.asarray(Image.open(r.output), np.int16)
            b = np.asarray(Image.open(e.output), np.int16)
            assert np.abs(a - b).max() <= 1, r.input  # same seed: identical up to float reduction order
        if r.status in ("protected", "weak"):
            assert r.verdicts == e.verdicts and r.steps == e.steps
            assert r.similarity.keys() == e.similarity.keys()
    log = [json.loads(line) for line in (out / "faceshield-log.jsonl").read_text().splitlines()]
    assert sorted(rec["input"] for rec in log) == sorted(r.input for r in got)
    assert all(rec["settings_sha256"] == pool.settings_sha256 for rec in log if rec["status"] != "failed")

    # a re-run reuses every finished output; only the broken file is tried again
    again = protect_paths(plan_jobs([photos], out), pool, progress=False, batch_size=5).records
    assert [(r.status, r.resumed) for r in again] == [(r.status, r.status != "failed") for r in got]


def test_a_failed_worker_is_retried_once_then_reported(tmp_path, shared_data, ray_local, pool):
    pool.close()  # its 2 CPU slots, for the flaky pool
    for _ in range(100):  # ray.kill is asynchronous: wait until the slots are free again
        if ray.available_resources().get("CPU", 0) >= 2:
            break
        time.sleep(0.1)
    photos = tmp_path / "in"
    _faces(photos, ["a", "crash_once", "crash", "raise"])
    flaky = RayProtector(WorkerSpec("cloak", overrides=FAST), workers=2, worker_class=FlakyWorker)
    try:
        streamed = []
        plan = plan_jobs([photos], tmp_path / "out")
        records = flaky.protect_files([(j.photo, j.out) for j in plan.jobs], copy_no_face=True,
                                      on_record=lambda i, r: streamed.append(i))
    finally:
        flaky.close()
    status = {Path(r.input).stem: r for r in records}
    assert status["a"].status in ("protected", "weak")
    assert status["crash_once"].status in ("protected", "weak")  # its actor died, the retry on another one worked
    for name in ("crash", "raise"):
        r = status[name]
        assert r.status == "failed" and "retried once" in r.error and "\n" not in r.error, r.error
        assert r.error.startswith(str(photos / f"{name}.png"))
    assert "ValueError: injected fault" in status["raise"].error
    assert "died" in status["crash"].error
    assert sorted(streamed) == [0, 1, 2, 3]  # every record streamed back once
    assert flaky._replacements == 3  # crash_once once, crash twice: each dead actor replaced by a fresh one


def test_the_command_line_runs_on_ray_with_the_local_semantics(tmp_path, shared_data, ray_local):
    from click.testing import CliRunner

    from faceshield.cli.main import cli

    _faces(tmp_path / "in", ["a", "b"])
    args = ["protect", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--ray", "local", "--ray-workers", "2",
            "--surrogates", "mobilefacenet-ms1m", "--set", "steps=5", "--set", "eot=false", "--json"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert [Path(r["output"]).name for r in report["photos"]] == ["a_protected.png", "b_protected.png"]
    assert all(r["status"] in ("protected", "weak") and r["verdicts"] for r in report["photos"])
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)
    assert [r["resumed"] for r in again["photos"]] == [True, True]


def test_the_server_runs_its_jobs_on_ray(shared_data, ray_local):
    from fastapi.testclient import TestClient

    from faceshield.distributed import ray_runner_factory
    from faceshield.server.app import ServerSettings, create_app

    app = create_app(ServerSettings(workers=1, runner_factory=ray_runner_factory(None, workers=1), runner_cache=1))
    with TestClient(app) as client:
        photo = PAIRS / "train" / f"{pair_ids(1)[0]}.png"
        files = [("photos", ("face.png", photo.read_bytes(), "application/octet-stream"))]
        created = client.post("/api/v1/jobs", files=files,
                              data={"settings": ["surrogates=mobilefacenet-ms1m", "steps=5", "eot=false"]})
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + 300
        while (job := client.get(f"/api/v1/jobs/{created.json()['id']}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        (result,) = job["photos"]
        assert result["status"] in ("protected", "weak"), result
        assert result["record"]["similarity"]["mobilefacenet-ms1m"]["before"] == [1.0]
