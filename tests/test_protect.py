"""Protecting photos: the attack works on a real face, outputs are safe, bad inputs are reported and skipped."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.eval.quality import ssim
from faceshield.images import load_image, to_tensor
from faceshield.methods.base import create_method
from faceshield.protect import Protector, protect_paths

FAST = "mobilefacenet-ms1m"  # the cheapest strong surrogate: keeps these tests to seconds


@pytest.fixture(scope="module")
def protector():
    method = create_method("cloak", surrogates=(FAST,), steps=15, eot=False, margin=0.3)
    return Protector(method)


@pytest.fixture
def photos(tmp_path, shared_data):
    folder = tmp_path / "in"
    folder.mkdir()
    face = load_image(PAIRS / "train" / f"{pair_ids(1)[0]}.png").rgb
    Image.fromarray(face).save(folder / "face.jpg", quality=97)
    return folder, face


def test_cloak_fools_the_surrogate_and_stays_invisible(shared_data):
    method = create_method("cloak", surrogates=(FAST,), steps=20, eot=False, margin=0.3)
    photo = load_image(PAIRS / "train" / f"{pair_ids(2)[1]}.png")
    from faceshield.faces.detect import detect_faces

    landmarks = torch.from_numpy(detect_faces(photo.rgb)[0].landmarks[None]).float()
    image = to_tensor(photo.rgb)
    result = method.protect(image, landmarks)
    original = method.ensemble(image, landmarks)[FAST]
    protected = method.ensemble(result.image, landmarks)[FAST]
    similarity = float((original * protected).sum())
    assert similarity < method.thresholds[FAST], f"surrogate still matches: {similarity:.3f}"
    assert float(ssim(result.image, image)) > 0.97
    assert float((result.image - image).abs().max()) <= method.config.epsilon + 1e-6


def test_protect_folder_writes_safe_outputs(tmp_path, photos, protector):
    folder, face = photos
    exif = Image.Exif()
    exif[0x8825] = {2: (48.0, 51.0, 24.0)}  # GPS
    Image.fromarray(face).save(folder / "gps.png", exif=exif.tobytes())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "out"
    records = protect_paths([folder], protector, out, log_path=out / "log.jsonl", progress=False).records
    assert [r.status for r in records] == ["protected", "protected"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # inputs untouched
    for r in records:
        written = load_image(r.output)
        assert written.size == (256, 256) and written.format == ("JPEG" if r.input.endswith(".jpg") else "PNG")
        with Image.open(r.output) as img:
            assert len(img.getexif()) == 0
        sims = r.similarity[FAST]
        assert sims["before"][0] == pytest.approx(1.0, abs=1e-4) and sims["after"][0] < sims["before"][0]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[0]["method"] == "cloak" and log[0]["parameters"]["surrogates"] == [FAST]
    # a re-run with the same photos and settings reuses the finished outputs, verdicts included
    again = protect_paths([folder], protector, out, log_path=out / "log.jsonl", progress=False).records
    assert [(r.status, r.resumed) for r in again] == [("protected", True), ("protected", True)]
    assert [r.similarity for r in again] == [r.similarity for r in records]


def test_bad_files_are_reported_and_the_rest_goes_on(tmp_path, photos, protector):
    folder, face = photos
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(folder / "noface.png")
    tiny = np.full((400, 400, 3), 200, np.uint8)
    tiny[190:202, 190:202] = np.array(Image.fromarray(face).resize((12, 12)))
    Image.fromarray(tiny).save(folder / "tiny.png")
    run = protect_paths([folder], protector, tmp_path / "o", progress=False)
    records = {os.path.basename(r.input): r for r in run.records}
    assert records["face.jpg"].status == "protected"
    assert records["corrupt.jpg"].status == "failed" and "corrupt.jpg" in records["corrupt.jpg"].error
    assert records["noface.png"].status == "no-face" and "no face found" in records["noface.png"].note
    assert records["tiny.png"].status == "no-face" and "no face found" in records["tiny.png"].note
    assert not (tmp_path / "o" / "corrupt_protected.jpg").exists()
    assert run.counts() == {"protected": 1, "weak": 0, "no-face": 2, "failed": 1, "resumed": 0}


def test_every_face_of_a_group_photo_is_protected(tmp_path, shared_data, protector):
    faces = [load_image(PAIRS / "train" / f"{i}.png").rgb for i in pair_ids(4)]
    grid = np.concatenate([np.concatenate(faces[:2], 1), np.concatenate(faces[2:], 1)], 0)
    Image.fromarray(grid).save(tmp_path / "group.png")
    (record,) = protect_paths([tmp_path / "group.png"], protector, tmp_path / "o", progress=False).records
    assert record.status == "protected" and record.faces == 4
    assert len(record.similarity[FAST]["after"]) == 4 and len(record.verdicts) == 4
