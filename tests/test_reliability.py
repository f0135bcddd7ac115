"""What a user relies on when faceshield says a photo is protected: every photo processed and honestly judged,
nothing lost, nothing skipped in silence, every error one line before any work. One test per case of
docs/reliability.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.cli.main import cli

FAST = ("--surrogates", "mobilefacenet-ms1m", "--set", "eot=false", "--quiet")  # seconds per photo


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def run_json(*args, code=0) -> dict:
    result = run(*args, "--json", code=code)
    return json.loads(result.stdout)  # one document on stdout, whatever went wrong


@pytest.fixture
def faces(tmp_path, shared_data) -> list[Path]:
    """Two real photos of two people, as PNG files in tmp_path."""
    paths = []
    for i, pid in enumerate(pair_ids(2)):
        path = tmp_path / f"face{i}.png"
        Image.open(PAIRS / "train" / f"{pid}.png").save(path)
        paths.append(path)
    return paths


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- every input is processed, every output distinct -----------------------------------------------------------
def test_same_file_name_in_two_folders_both_protected(tmp_path, faces):
    for name, face in zip("AB", faces):
        (tmp_path / "col" / name).mkdir(parents=True)
        (tmp_path / "col" / name / "x.png").write_bytes(face.read_bytes())
    files = run_json("protect", tmp_path / "col/A/x.png", tmp_path / "col/B/x.png", "-o", tmp_path / "out", *FAST,
                     "--set", "steps=10")
    folders = run_json("protect", tmp_path / "col/A", tmp_path / "col/B", "-o", tmp_path / "out2", *FAST,
                       "--set", "steps=10")
    for report in (files, folders):
        outputs = [r["output"] for r in report["photos"]]
        assert len(set(outputs)) == 2 and all(Path(o).is_file() for o in outputs)
        assert [r["status"] for r in report["photos"]] == ["protected", "protected"]
        assert not any(r["resumed"] for r in report["photos"])
    # the two outputs hold the two different people
    a, b = (np.asarray(Image.open(r["output"]), int) for r in files["photos"])
    assert np.abs(a - b).mean() > 20


def test_photo_named_like_an_output_is_protected_like_any_other(tmp_path, faces):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "jane_protected.png").write_bytes(faces[0].read_bytes())
    named = run_json("protect", folder / "jane_protected.png", "-o", tmp_path / "o1", *FAST, "--set", "steps=10")
    inside = run_json("protect", folder, "-o", tmp_path / "o2", *FAST, "--set", "steps=10")
    for report in (named, inside):
        assert report["counts"]["protected"] == 1 and report["photos"][0]["input"].endswith("jane_protected.png")


def test_rerun_reuses_only_an_intact_output_of_the_same_photo_and_settings(tmp_path, faces):
    out = tmp_path / "out"
    args = ("protect", faces[0], "-o", out, *FAST)
    first = run_json(*args, "--strength", "low", "--set", "steps=2")["photos"][0]
    assert not first["resumed"]
    same = run_json(*args, "--strength", "low", "--set", "steps=2")["photos"][0]
    assert same["resumed"] and same["status"] == first["status"] and same["similarity"] == first["similarity"]
    other = run_json(*args, "--strength", "high", "--set", "steps=2")["photos"][0]  # other settings: redone
    assert not other["resumed"] and other["parameters"]["epsilon"] == pytest.approx(16 / 255)
    Path(other["output"]).write_bytes(b"")  # an output emptied (a crash, a full disk): redone
    redone = run_json(*args, "--strength", "high", "--set", "steps=2")["photos"][0]
    assert not redone["resumed"] and Path(redone["output"]).stat().st_size > 1000
    faces[0].write_bytes(faces[1].read_bytes())  # the photo itself changed: redone
    assert not run_json(*args, "--strength", "high", "--set", "steps=2")["photos"][0]["resumed"]


def test_a_file_faceshield_did_not_write_is_never_replaced(tmp_path, faces):
    out = tmp_path / "out"
    out.mkdir()
    (out / "face0_protected.png").write_bytes(b"the user's own file")
    (record,) = run_json("protect", faces[0], "-o", out, *FAST, "--set", "steps=2")["photos"]
    assert (out / "face0_protected.png").read_bytes() == b"the user's own file"
    assert record["output"].endswith("face0_protected-2.png")


def test_beside_mode_rerun_does_not_protect_its_own_outputs(tmp_path, faces):
    folder = tmp_path / "album"
    folder.mkdir()
    (folder / "me.png").write_bytes(faces[0].read_bytes())
    run_json("protect", folder, *FAST, "--set", "steps=2")
    again = run_json("protect", folder, *FAST, "--set", "steps=2")
    assert [r["resumed"] for r in again["photos"]] == [True]
    assert again["earlier_outputs"] == [str(folder / "me_protected.png")]
    assert sorted(p.name for p in folder.iterdir()) == ["faceshield-log.jsonl", "me.png", "me_protected.png"]


# --- settings checked before any work --------------------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ("steps=0", "steps=0 is out of range; allowed: [1, inf)"),
    ("epsilon=-8/255", "is out of range; allowed: (0, 1]"),
    ("epsilon=1/0", "epsilon needs a number (division by zero)"),
    ("epsilon=__import__('os').getcwd()", "only numbers and + - * / are allowed"),
    ("steps=2.5", "steps needs a whole number"),
    ("eot=maybe", "eot needs true or false"),
    ("device=tpu", "device='tpu'"),
    ("nonsense=1", "expected KEY=VALUE with KEY one of"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, faces, setting, message):
    result = run("protect", faces[0], "-o", tmp_path / "out", "--set", setting, code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing was done


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, faces):
    result = run("protect", faces[0], "--set", "device=cuda", code=2)
    assert "CUDA is not available here" in result.output and "device=cpu" in result.output


# --- never touch an input --------------------------------------------------------------------------------------
def test_detect_show_never_overwrites_the_input(tmp_path, faces, monkeypatch):
    photo = tmp_path / "me.jpg"
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    Image.open(faces[0]).save(photo, exif=exif.tobytes(), quality=95)
    original = photo.read_bytes()
    monkeypatch.chdir(tmp_path)
    for show in (photo, "me.jpg", "./sub/../me.jpg"):
        assert "is an input of this command" in run("detect", photo, "--show", show, code=1).output
    (tmp_path / "link.jpg").symlink_to(photo)
    assert "is an input of this command" in run("detect", photo, "--show", "link.jpg", code=1).output
    assert "is a folder" in run("detect", photo, "--show", tmp_path, code=1).output
    assert "is a folder" in run("detect", photo, "--show", "newdir/", code=1).output
    assert photo.read_bytes() == original
    run("detect", photo, "--show", "new/dir/boxes.jpg")  # a missing folder is created; the format follows the name
    with Image.open(tmp_path / "new/dir/boxes.jpg") as img:
        assert img.format == "JPEG" and len(img.getexif()) == 0


# --- outputs and log checked before any work -------------------------------------------------------------------
def test_unwritable_output_or_log_fails_before_any_work(tmp_path, faces, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    assert "is a file, not a folder" in run("protect", faces[0], "-o", blocked, code=1).output
    assert "--log needs a file path" in run("protect", faces[0], "-o", tmp_path / "o", "--log", tmp_path,
                                           code=1).output
    # a folder the OS refuses to write into (as root, chmod cannot make one, so the refusal is simulated)
    import tempfile

    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "readonly":
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    result = run("protect", faces[0], faces[1], "-o", tmp_path / "readonly", code=1)
    assert result.output.strip() == f"Error: {tmp_path / 'readonly'}: cannot write here (Permission denied); " \
                                    "choose another output folder (-o)"
    assert not list((tmp_path / "readonly").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_for_real(tmp_path, faces):
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o555)
    assert "cannot write here" in run("protect", faces[0], "-o", folder, code=1).output


# --- unsupported files -----------------------------------------------------------------------------------------
def test_unsupported_files_are_listed_or_rejected_by_name(tmp_path, faces):
    folder = tmp_path / "album"
    folder.mkdir()
    (folder / "me.png").write_bytes(faces[0].read_bytes())
    Image.open(faces[0]).save(folder / "anim.gif")
    Image.open(faces[0]).save(folder / "phone.avif")
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    report = run_json("protect", folder, "-o", tmp_path / "out", *FAST, "--set", "steps=2")
    assert [Path(p).name for p in report["unsupported"]] == ["anim.gif", "phone.avif", "phone.heic"]
    human = run("protect", folder, "-o", tmp_path / "out", *FAST, "--set", "steps=2").output
    assert "skipped: 3 file(s) of unsupported type" in human
    # named on the command line: rejected before any work, naming the input
    result = run("protect", faces[0], folder / "anim.gif", "-o", tmp_path / "o2", *FAST, code=1)
    assert f"{folder / 'anim.gif'}: unsupported type '.gif'" in result.output and "nothing was done" in result.output
    assert not (tmp_path / "o2").exists()
    assert "no such file" in run("protect", tmp_path / "typo.png", code=1).output


def test_empty_path_is_an_error_not_the_current_folder(tmp_path, faces, monkeypatch):
    monkeypatch.chdir(faces[0].parent)
    assert "empty path" in run("protect", "", code=1).output
    assert not list(tmp_path.glob("*_protected*"))


# --- one JSON document, one line per error ---------------------------------------------------------------------
@pytest.mark.parametrize("args, code", [
    (["protect", "missing.png"], 1),
    (["protect", "face0.png", "--surrogates", "no-such-model"], 1),
    (["protect", "face0.png", "--set", "steps=0"], 2),
    (["protect"], 2),
    (["verify", "face0.png", "wall.png"], 1),
    (["detect", "missing.png"], 1),
])
def test_json_errors_are_one_document_on_stdout(tmp_path, faces, monkeypatch, args, code):
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "wall.png")
    monkeypatch.chdir(tmp_path)
    report = run_json(*args, code=code)
    assert report["exit_code"] == code and "\n" not in report["error"] and report["error"]


def test_unexpected_errors_are_one_line_with_a_way_to_report_them(faces, monkeypatch):
    import faceshield.faces.detect as detect

    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(detect, "detect_faces", broken)
    result = run("detect", faces[0], code=3)
    assert "internal error (ZeroDivisionError: planted bug); please report it" in result.output
    assert json.loads(run("detect", faces[0], "--json", code=3).stdout)["exit_code"] == 3


def test_each_failure_is_printed_once(tmp_path, faces):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a photo")
    result = run("protect", faces[0], tmp_path / "broken.jpg", "-o", tmp_path / "out", *FAST, "--set", "steps=2",
                 code=1)
    assert result.output.count("broken.jpg") == 1 and "FAIL" in result.output


# --- no-face, huge and grayscale photos ------------------------------------------------------------------------
def test_a_photo_without_a_face_is_reported_and_copied_to_the_output_folder(tmp_path, faces):
    exif = Image.Exif()
    exif[0x8825] = {2: (48.0, 51.0, 24.0)}  # GPS
    Image.new("RGB", (120, 80), (90, 120, 200)).save(tmp_path / "sky.jpg", exif=exif.tobytes())
    report = run_json("protect", tmp_path / "sky.jpg", faces[0], "-o", tmp_path / "out", *FAST, "--set", "steps=2")
    sky = report["photos"][0]
    assert sky["status"] == "no-face" and report["counts"]["no-face"] == 1 and report["counts"]["failed"] == 0
    with Image.open(sky["output"]) as copy:
        assert copy.size == (120, 80) and len(copy.getexif()) == 0
    bare = run_json("protect", tmp_path / "sky.jpg", "-o", tmp_path / "bare", "--no-copy-unprotected", *FAST)
    assert bare["photos"][0]["output"] is None and not list((tmp_path / "bare").glob("*.jpg"))


def test_more_pixels_than_the_limit_get_our_own_message(tmp_path):
    import warnings
    import zlib

    from faceshield.errors import ImageReadError
    from faceshield.images import load_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    # a valid header of a 16,000 × 16,000 (256 MP) PNG; the pixels are never decoded
    header = (16000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's raw DecompressionBombWarning would fail here
        with pytest.raises(ImageReadError, match=r"huge.png: 16000×16000 is 256.0 megapixels, more than the 250 MP"):
            load_image(tmp_path / "huge.png")


def test_grayscale_photo_stays_grayscale_and_is_judged_as_written(tmp_path, faces):
    Image.open(faces[0]).convert("L").save(tmp_path / "bw.png")
    (record,) = run_json("protect", tmp_path / "bw.png", "-o", tmp_path / "out", *FAST, "--set", "steps=10")["photos"]
    with Image.open(record["output"]) as img:
        assert img.mode == "L"
        written = np.asarray(img, np.float64)
    assert np.abs(written - np.asarray(Image.open(tmp_path / "bw.png"), np.float64)).max() > 0  # perturbed
    assert record["status"] == "protected"


# --- the verdict -----------------------------------------------------------------------------------------------
def test_weak_protection_is_called_out_and_strict_makes_it_a_failure(tmp_path, faces):
    weak = ("protect", faces[0], "-o", tmp_path / "out", *FAST, "--set", "steps=1", "--set", "epsilon=1/255")
    human = run(*weak).output
    assert "weak" in human and "mobilefacenet-ms1m still matches the original" in human
    assert "try --strength high" in human and "0 protected, 1 weak" in human
    report = run_json(*weak, "--strict", code=1)
    (record,) = report["photos"]
    assert record["status"] == "weak" and record["verdicts"][0]["unfooled"][0]["model"] == "mobilefacenet-ms1m"


def test_verdict_is_measured_on_the_file_as_written(tmp_path, faces):
    from faceshield.faces.detect import detect_faces
    from faceshield.images import load_image, to_tensor
    from faceshield.models.ensemble import FREnsemble

    (record,) = run_json("protect", faces[0], "-o", tmp_path / "out", *FAST, "--set", "steps=5",
                         "--jpeg-quality", "60")["photos"]
    original = load_image(faces[0]).rgb
    landmarks = torch.from_numpy(detect_faces(original)[0].landmarks[None]).float()
    ensemble = FREnsemble(["mobilefacenet-ms1m"])
    before = ensemble.embed(to_tensor(original), landmarks)["mobilefacenet-ms1m"]
    after = ensemble.embed(to_tensor(load_image(record["output"]).rgb), landmarks)["mobilefacenet-ms1m"]
    assert record["similarity"]["mobilefacenet-ms1m"]["after"][0] == pytest.approx(float(before @ after.T), abs=1e-3)


def test_face_verdicts_dodging_impersonation_and_uncalibrated():
    from faceshield.protect import face_verdicts

    sims = {"a": {"after": [0.1, 0.5], "threshold": 0.3}, "b": {"after": [0.2, 0.2], "threshold": 0.3}}
    verdicts = face_verdicts(sims)
    assert [v["status"] for v in verdicts] == ["protected", "weak"]
    assert [u["model"] for u in verdicts[1]["unfooled"]] == ["a"]
    # at the threshold a model says "different" (it says "same" only above it)
    assert face_verdicts({"a": {"after": [0.3], "threshold": 0.3}})[0]["status"] == "protected"
    target = {"a": {"after": [0.9, 0.9], "threshold": 0.3}, "b": {"after": [0.9, 0.25], "threshold": 0.3}}
    impersonation = face_verdicts({"a": sims["a"], "b": sims["b"]}, target)
    assert impersonation[0]["status"] == "protected"
    assert [u["model"] for u in impersonation[1]["unfooled"]] == ["a", "b"]  # a still you, b not yet the target
    assert face_verdicts({"x": {"after": [0.0], "threshold": None}})[0]["status"] == "weak"


# --- entry points ----------------------------------------------------------------------------------------------
def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "faceshield", "methods", "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cloak" in json.loads(result.stdout)
