"""The photo-scale evaluation set (faceshield.eval.photoscale): real faces at the requested size inside large JPEG
photos, reproducible from a seed, and an evaluation that protects whole photos and judges them both ways."""

import json

import numpy as np
import pytest

from faceshield.eval.photoscale import PhotoScaleConfig, build_photo_set, evaluate_photo_set, load_manifest, markdown
from faceshield.faces.detect import default_detector, detect_faces
from faceshield.images import load_image


@pytest.fixture(scope="module")
def photo_set(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("photo-set")
    return out, build_photo_set(shared_data, out, n_celeba=2, include=("celeba",))


def test_faces_are_rendered_at_the_requested_size_inside_large_jpegs(photo_set, shared_data):
    out, entries = photo_set
    assert [e.face_px for e in entries] == [150, 250]
    for e in entries:
        path = out / e.photo
        assert path.suffix == ".jpg" and path.read_bytes()[:2] == b"\xff\xd8"
        rgb = load_image(path).rgb
        assert rgb.shape[0] * rgb.shape[1] >= 1.9e6  # ≥ 2 MP
        faces = detect_faces(rgb, default_detector())
        assert len(faces) == 1
        x0, y0, x1, y1 = e.face_box
        cx, cy = (faces[0].box[0] + faces[0].box[2]) / 2, (faces[0].box[1] + faces[0].box[3]) / 2
        assert x0 < cx < x1 and y0 < cy < y1  # the face found is the one pasted
        assert 0.75 * e.face_px < faces[0].width < 1.25 * e.face_px
        # judged against the *other* photo of the same person
        assert e.reference.endswith(f"test/{e.identity.removeprefix('celeba-')}.png") and e.reference != e.source
    assert load_manifest(out) == entries


def test_the_set_is_reproducible_from_its_seed(photo_set, shared_data, tmp_path):
    out, entries = photo_set
    again = build_photo_set(shared_data, tmp_path, n_celeba=1, include=("celeba",))
    assert (tmp_path / again[0].photo).read_bytes() == (out / entries[0].photo).read_bytes()
    other = build_photo_set(shared_data, tmp_path / "seed1", n_celeba=1, include=("celeba",), seed=1)
    assert (tmp_path / "seed1" / other[0].photo).read_bytes() != (out / entries[0].photo).read_bytes()


def test_evaluation_protects_whole_photos_and_judges_both_pipelines(photo_set, tmp_path, monkeypatch):
    """One photo, one held-out judge, a 2-step cloak: the output is the full photo as written, judged by the
    protection's pipeline and the independent one; the unprotected photo (the floor) is still matched."""
    out, _ = photo_set
    config = PhotoScaleConfig(method="cloak@low", judges=("dlib-resnet",), surrogates=("mobilefacenet-ms1m",),
                              settings={"steps": 2}, limit=1)
    result = evaluate_photo_set(out, config, tmp_path, progress=False)
    row = result["photos"][0]
    assert row["status"] in ("protected", "weak") and row["megapixels"] >= 1.9
    for key in ("same_before", "same_after", "independent_before", "independent_after"):
        assert isinstance(row[key], float)
    judged = result["judges"]["dlib-resnet"]
    assert judged["floor"] == {"same": 0.0, "independent": 0.0}  # the same person, unprotected: matched
    assert 0.9 < row["face_ssim"] <= 1 and row["face_psnr"] > 25
    written = load_image(tmp_path / "heldout-dlib-resnet" / row["photo"].split("/")[-1]).rgb
    assert written.shape == load_image(out / row["photo"]).rgb.shape
    assert "| dlib-resnet |" in markdown(result)
    json.dumps(result)
    assert np.isfinite(judged["seconds"])
    # a rerun resumes: the photos already protected are judged again, never protected again
    from faceshield.protect import Protector

    monkeypatch.setattr(Protector, "protect_files", lambda *a, **k: pytest.fail("protected again"))
    again = evaluate_photo_set(out, config, tmp_path, progress=False)
    assert again["photos"][0]["independent_after"] == row["independent_after"]
    assert again["photos"][0]["seconds"] == row["seconds"]
