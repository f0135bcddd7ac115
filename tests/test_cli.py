"""The command line as a user runs it: --json output, verdicts on real pairs, clear errors and exit codes."""

import json

import pytest
from click.testing import CliRunner

from conftest import PAIRS, pair_ids
from faceshield.cli.main import cli
from faceshield.eval.calibration import shipped_table


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_help_shows_defaults():
    out = run("protect", "--help").output
    assert "--strength" in out and "[default: mid]" in out and "--keep-metadata" in out
    assert "verify" in run("--help").output


def test_verify_same_and_different_people(shared_data):
    # pairs beyond the first 100, so not the photos any template was derived from
    ids = pair_ids(130)[120:126]
    for a in ids:
        report = json.loads(run("verify", PAIRS / "train" / f"{a}.png", PAIRS / "test" / f"{a}.png", "--json").output)
        assert report["verdict"] == "same person", report
    for a, b in zip(ids, ids[1:]):
        report = json.loads(run("verify", PAIRS / "train" / f"{a}.png", PAIRS / "test" / f"{b}.png", "--json").output)
        assert report["verdict"] == "different", report
        assert set(report["models"]) == set(shipped_table().strong_models())  # the calibrated strong models


def test_verify_no_face_is_one_clear_error(tmp_path, shared_data):
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "wall.png")
    result = run("verify", tmp_path / "wall.png", PAIRS / "test" / f"{pair_ids(1)[0]}.png", ok=False)
    assert result.exit_code == 1 and "wall.png: no face found" in result.output
    assert "Traceback" not in result.output


def test_detect_json_and_show(tmp_path, shared_data):
    report = json.loads(run("detect", PAIRS / "train" / f"{pair_ids(1)[0]}.png", "--json",
                            "--show", tmp_path / "faces.png").output)
    assert len(report["faces"]) == 1 and len(report["faces"][0]["landmarks"]) == 5
    assert (tmp_path / "faces.png").stat().st_size > 1000


def test_models_list_and_verify():
    listing = json.loads(run("models", "list", "--json").output)
    names = {m["name"] for m in listing["fr_models"]}
    assert {"dlib-resnet", "mobilefacenet-ms1m", "mobilefacenet", "mobileface", "faceres", "faceres-deep"} <= names
    assert all(len(f["sha256"]) == 64 for f in listing["files"])
    status = json.loads(run("models", "verify", "--json").output)["files"]
    assert status["retinaface-mnet025/mobilenet0.25_Final.pth"] == "ok"


def test_calibrate_small_subset(tmp_path, shared_data):
    out = tmp_path / "cal.json"
    table = json.loads(run("calibrate", PAIRS, "--models", "mobilefacenet-ms1m", "--limit", "12", "--quiet",
                           "--json", "--output", out).output)
    cal = table["models"]["mobilefacenet-ms1m"]
    assert cal["n_genuine"] == 12 and cal["n_impostor"] == 12 * 11 and 0.8 < cal["auc"] <= 1.0
    assert json.loads(out.read_text())["meta"]["command"].startswith("faceshield calibrate")


def test_protect_cli_exit_code_and_json(tmp_path, shared_data):
    from PIL import Image

    from faceshield.images import load_image

    Image.fromarray(load_image(PAIRS / "train" / f"{pair_ids(1)[0]}.png").rgb).save(tmp_path / "me.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    result = run("protect", tmp_path / "me.png", tmp_path / "broken.jpg", "-o", tmp_path / "out", "--json",
                 "--surrogates", "mobilefacenet-ms1m", "--set", "steps=3", "--set", "eot=false", ok=False)
    assert result.exit_code == 1
    report = json.loads(result.output)
    statuses = {r["input"].split("/")[-1]: r["status"] for r in report["photos"]}
    assert statuses == {"me.png": "protected", "broken.jpg": "failed"}
    assert report["photos"][0]["parameters"]["steps"] == 3
    assert (tmp_path / "out" / "me_protected.png").exists() and (tmp_path / "out" / "faceshield-log.jsonl").exists()


def test_protect_rejects_unknown_setting(tmp_path):
    result = run("protect", tmp_path, "--set", "nonsense=1", ok=False)
    assert result.exit_code == 2 and "nonsense=1" in result.output


def test_the_command_line_starts_without_importing_torch():
    """`faceshield --help` and typos answer at once: no command module imports torch or diffusers at load time
    (each imports them inside its command)."""
    import subprocess
    import sys

    code = "import sys, faceshield.cli.main; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
