"""The evaluation protocol end to end on a tiny subset: structure, leave-one-out, floors and the report."""

import json

import pytest

from conftest import DATA, PAIRS
from faceshield.eval.protocol import EvalConfig, degrade, evaluate
from faceshield.eval.report import write_report


@pytest.fixture(scope="module")
def result(shared_data):
    config = EvalConfig(methods=("pgd",), pairs_dir=PAIRS, targets_dir=DATA / "targets", n_pairs=2,
                        n_per_target=1, judges=("dlib-resnet", "mobilefacenet-ms1m"),
                        surrogates=("dlib-resnet", "mobilefacenet-ms1m"), settings={"steps": 2})
    return evaluate(config, progress=False)


def test_leave_one_out_results_are_complete(result):
    assert result["judges"] == ["dlib-resnet", "mobilefacenet-ms1m"]
    assert result["n_dodging"] == 2 and result["n_impersonation_per_target"] == 1 and len(result["targets"]) == 4
    pgd = result["methods"]["pgd"]
    for judge, entry in pgd["judges"].items():
        assert set(entry["dodging"]) == {"0.01", "0.001"}
        assert all(0.0 <= v <= 1.0 for v in entry["dodging"].values())
        assert set(entry["robustness"]) == {"jpeg75", "resize0.5", "blur1"}
        assert set(entry["impersonation"]) == set(result["targets"])
    q = pgd["quality"]
    assert 25 < q["psnr"] < 60 and 0.5 < q["ssim"] <= 1.0 and q["seconds"] > 0 and q["brisque"] == q["brisque"]
    # the floor: unprotected same-person pairs are matched by these strong judges
    assert result["floor"]["dodging"]["dlib-resnet"]["0.01"] == 0.0


def test_report_files(result, tmp_path):
    json_path, html_path = write_report(result, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["methods"]["pgd"]["judges"]["dlib-resnet"]["dodging"]["0.01"] == \
        result["methods"]["pgd"]["judges"]["dlib-resnet"]["dodging"]["0.01"]
    assert "<html" in html_path.read_text().lower()


def test_degradations_keep_size(face_rgb):
    for kind in ("jpeg75", "resize0.5", "blur1"):
        out = degrade(face_rgb, kind)
        assert out.shape == face_rgb.shape and out.dtype == face_rgb.dtype
        assert (out != face_rgb).any()
    with pytest.raises(ValueError):
        degrade(face_rgb, "sepia")
