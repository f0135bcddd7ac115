"""The evaluation report: JSON without arrays, one self-contained HTML page with tables, plots and face crops."""

from __future__ import annotations

import base64
import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.errors import FaceshieldError
from faceshield.eval.report import (
    CROP_PX, DIFF_GAIN, face_crop_box, markdown_tables, merge_results, render_html, to_json, write_report,
)

pytest.importorskip("matplotlib", reason="the HTML report needs matplotlib: pip install 'faceshield[eval]'")

JUDGES = ["arcface-r100", "facenet-vgg"]
SPECS = ["cloak@low", "cloak@mid", "cloak@high", "pgd"]
TARGETS = ["target/005869.jpg", "target/085807.jpg"]
FARS = ["0.01", "0.001"]


@pytest.fixture(scope="module")
def examples(shared_data) -> list[dict]:
    """Two real photos with detected landmarks; 'protected' = original + bounded noise (±3 levels)."""
    from faceshield.faces.detect import create_detector, detect_faces
    from faceshield.images import load_image

    detector = create_detector("dlib-hog")
    rng = np.random.default_rng(0)
    out = []
    for i, pid in enumerate(pair_ids(2)):
        rgb = load_image(PAIRS / "train" / f"{pid}.png").rgb
        faces = detect_faces(rgb, detector)
        assert faces, f"no face found in {pid}"
        noise = rng.integers(-3, 4, size=rgb.shape)
        protected = np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        out.append({"method": SPECS[i], "judge": JUDGES[0], "pair": pid, "original": rgb, "protected": protected,
                    "landmarks": torch.from_numpy(faces[0].landmarks[None]).float(),
                    # the first example dodges the judge (below its threshold), the second does not
                    "before": 0.71, "after": 0.12 if i == 0 else 0.55})
    return out


def synthetic_result(examples: list[dict], impersonation: bool = True, robustness: bool = True) -> dict:
    """An evaluate()-shaped result with distinct PSR values (all multiples of 1/40, as with 40 pairs)."""
    rng = np.random.default_rng(1)

    def psr() -> float:
        return int(rng.integers(0, 41)) / 40

    methods = {}
    for k, spec in enumerate(SPECS):
        per_judge = {}
        for j in JUDGES:
            entry = {"dodging": {f: psr() for f in FARS}, "dodging_mean_similarity": 0.3}
            if robustness:
                entry["robustness"] = {kind: {f: psr() for f in FARS} for kind in ("jpeg75", "resize0.5", "blur1")}
            if impersonation:
                entry["impersonation"] = {t: {f: psr() for f in FARS} for t in TARGETS}
            per_judge[j] = entry
        methods[spec] = {
            "judges": per_judge,
            "quality": {"psnr": 40.0 - 3 * k, "ssim": 0.99 - 0.03 * k, "brisque": 20.0 + k, "seconds": 1.5 + k},
            "quality_min": {"psnr": 35.0 - 3 * k, "ssim": 0.95 - 0.03 * k},
        }
    return {
        "config": {"methods": SPECS, "pairs_dir": "../shared/data/celebahq-pairs", "targets_dir":
                   "../shared/data/targets", "n_pairs": 40, "n_per_target": 10, "judges": JUDGES,
                   "fars": [0.01, 0.001], "robustness": robustness, "settings": {"steps": 50},
                   "command": "faceshield eval --methods cloak@low,cloak@mid,cloak@high,pgd --n-pairs 40"},
        "judges": JUDGES,
        "thresholds": {JUDGES[0]: {"0.01": 0.3012, "0.001": 0.4021}, JUDGES[1]: {"0.01": 0.5501, "0.001": 0.6234}},
        "n_dodging": 40,
        "n_impersonation_per_target": 10 if impersonation else 0,
        "targets": TARGETS if impersonation else [],
        "floor": {"dodging": {j: {"0.01": 0.025, "0.001": 0.05} for j in JUDGES},
                  "impersonation": {j: {"0.01": 0.0, "0.001": 0.0} for j in JUDGES} if impersonation else {}},
        "methods": methods,
        "examples": examples,
    }


@pytest.fixture(scope="module")
def result(examples) -> dict:
    return synthetic_result(examples)


@pytest.fixture(scope="module")
def page(result) -> str:
    return render_html(result)


def _contains_array(obj) -> bool:
    if isinstance(obj, dict):
        return any(_contains_array(v) for v in obj.values())
    if isinstance(obj, list):
        return any(isinstance(v, list) or _contains_array(v) for v in obj)
    return False


def test_to_json_drops_images_and_keeps_numbers(result):
    text = to_json(result)
    data = json.loads(text)
    assert not _contains_array(data)  # no nested lists: the image arrays and landmarks are gone
    assert data["examples"] == [{k: ex[k] for k in ("method", "judge", "pair", "before", "after")}
                                for ex in result["examples"]]
    assert data["methods"]["cloak@mid"]["judges"][JUDGES[1]]["dodging"]["0.001"] == \
        result["methods"]["cloak@mid"]["judges"][JUDGES[1]]["dodging"]["0.001"]
    assert data["floor"] == result["floor"] and data["thresholds"] == result["thresholds"]
    assert "original" in result["examples"][0]  # the caller's dict is left as it was


def test_to_json_is_strict(result):
    bad = {**result, "methods": {"pgd": {**result["methods"]["pgd"],
                                         "quality": {"psnr": float("inf"), "ssim": np.float32(0.5),
                                                     "brisque": float("nan"), "seconds": np.float64(2.0)}}}}
    data = json.loads(to_json(bad))  # allow_nan=False inside: would raise on NaN
    assert data["methods"]["pgd"]["quality"] == {"psnr": None, "ssim": 0.5, "brisque": None, "seconds": 2.0}


def test_summary_table_values(result, page):
    m = result["methods"]["cloak@mid"]
    for far in FARS:
        for j in JUDGES:
            assert f"{100 * m['judges'][j]['dodging'][far]:.1f}%" in page
    # mean over judges of dodging at 1e-2, and impersonation toward one target (mean over judges)
    mean_dodge = np.mean([m["judges"][j]["dodging"]["0.01"] for j in JUDGES])
    assert f"{100 * mean_dodge:.1f}%" in page
    imp = np.mean([m["judges"][j]["impersonation"][TARGETS[1]]["0.001"] for j in JUDGES])
    assert f"{100 * imp:.1f}%" in page
    assert "unprotected (floor)" in page and "2.5%" in page  # the floor row, dodging at 1e-2
    assert ">37.0<" in page and ">0.960<" in page and ">0.920<" in page  # PSNR, SSIM mean and min of cloak@mid
    assert ">21.0<" in page and ">2.50<" in page  # BRISQUE and seconds per photo
    assert "FAR 1e-2" in page and "FAR 1e-3" in page
    assert "0.3012" in page and "0.6234" in page  # thresholds
    assert "faceshield eval --methods" in page  # the command
    assert ">40 " in page or "40 dodging pairs" in page


def test_robustness_and_impersonation_sections(result, page):
    assert "Robustness" in page and "JPEG q=75" in page and "blur σ=1" in page
    m = result["methods"]["pgd"]
    r = np.mean([m["judges"][j]["robustness"]["resize0.5"]["0.01"] for j in JUDGES])
    assert f"{100 * r:.1f}%" in page
    assert "005869" in page  # a target column

    bare = render_html(synthetic_result(result["examples"], impersonation=False, robustness=False))
    assert "Robustness" not in bare and "impersonation PSR" not in bare
    assert "not measured" in bare

    # one FAR, no floor, no examples: still a complete page (two plots: dodging bars and PSR-vs-SSIM)
    one = synthetic_result([], impersonation=False, robustness=False)
    one["thresholds"] = {j: {"0.01": t["0.01"]} for j, t in one["thresholds"].items()}
    del one["floor"]
    page = render_html(one)
    assert "FAR 1e-3" not in page and "Before and after" not in page and len(_pngs(page)) == 2


def test_self_contained(page):
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.IGNORECASE)
    assert refs and all(r.startswith("data:") for r in refs)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def _pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b)))
            for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_embedded_plots_and_crops(result, page):
    images = _pngs(page)
    crops = [im for im in images if im.size == (CROP_PX, CROP_PX)]
    plots = [im for im in images if im.size != (CROP_PX, CROP_PX)]
    assert len(crops) == 3 * len(result["examples"])  # original, protected, difference per example
    assert len(plots) == 3  # dodging bars, PSR-vs-SSIM, impersonation bars
    assert all(im.width > 400 for im in plots)
    original, protected, diff = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in crops[:3])
    # protected differs from the original by ±3 levels (+ resampling), the difference image is amplified ×10
    assert 0 < np.abs(protected - original).mean() < 4
    assert 0.5 * DIFF_GAIN < diff.mean() < 3 * DIFF_GAIN and diff.max() > 2 * DIFF_GAIN
    assert "0.710 → <b>0.120</b>" in page and "not matched: protected" in page and "still matched" in page


def test_face_crop_box(examples):
    for ex in examples:
        lm = ex["landmarks"][0].numpy()
        left, top, right, bottom = face_crop_box(ex["landmarks"], ex["original"].shape)
        assert right - left == bottom - top
        span = np.linalg.norm(lm[3:5].mean(0) - lm[:2].mean(0))
        assert abs((right - left) - 2.2 * span) <= 1
        assert 0 <= left and 0 <= top and right <= 256 and bottom <= 256
        assert (lm[:, 0] > left).all() and (lm[:, 0] < right).all()
        assert (lm[:, 1] > top).all() and (lm[:, 1] < bottom).all()
    # near a border the square slides inside the photo instead of leaving it
    lm = np.array([[10, 20], [40, 20], [25, 35], [12, 50], [38, 50]], dtype=np.float32)
    assert face_crop_box(lm, (200, 300, 3)) == (0, 2, 66, 68)  # side 2.2 × 30; centre (25, 35) → left −8 → 0
    with pytest.raises(ValueError):
        face_crop_box(lm[:4], (200, 300, 3))


def test_write_report(result, tmp_path):
    json_path, html_path = write_report(result, tmp_path / "run")
    assert json_path.name == "report.json" and html_path.name == "report.html"
    assert json.loads(json_path.read_text())["n_dodging"] == 40
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.html", "report.json"]


def test_missing_matplotlib_is_a_clear_error(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(FaceshieldError, match=r"pip install 'faceshield\[eval\]'"):
        render_html(result)


def test_examples_without_images(result):
    """A result re-read from report.json has examples without arrays: the page still renders them as text."""
    loaded = json.loads(to_json(result))
    page = render_html(loaded)
    assert "images not stored" in page
    assert len(_pngs(page)) == 3


def test_runs_of_single_methods_merge_into_one_report(result):
    def only(spec: str) -> dict:
        return {**result, "methods": {spec: result["methods"][spec]},
                "examples": [e for e in result["examples"] if e["method"] == spec]}

    # as a benchmark that runs (and resumes) one method at a time would: some runs come back from report.json
    runs = [only(s) for s in SPECS]
    runs[1] = json.loads(to_json(runs[1]))
    merged = merge_results(runs)
    assert list(merged["methods"]) == SPECS and merged["config"]["methods"] == SPECS
    assert "command" not in merged["config"]  # no single run's command made the whole
    assert merged["methods"] == result["methods"] and len(merged["examples"]) == len(result["examples"])
    assert "cloak@mid" in render_html(merged)
    other_pairs = {**only("pgd"), "n_dodging": 100}
    with pytest.raises(FaceshieldError, match="different n_dodging"):
        merge_results([only("cloak@low"), other_pairs])
    with pytest.raises(FaceshieldError, match="more than one"):
        merge_results([only("pgd"), only("pgd")])
    with pytest.raises(FaceshieldError, match="no evaluation"):
        merge_results([])


def test_markdown_tables_carry_the_numbers(result):
    text = markdown_tables(result)
    first_row = next(line for line in text.splitlines() if line.startswith("| cloak@mid | "))  # dodging
    m = result["methods"]["cloak@mid"]
    dodging = [m["judges"][j]["dodging"]["0.01"] for j in JUDGES]
    expected = [f"{100 * x:.0f} %" for x in dodging] + [f"**{100 * sum(dodging) / 2:.0f} %**"]
    assert first_row.startswith("| cloak@mid | " + " | ".join(expected) + " | ")
    assert "| unprotected (floor) | 2 % | 2 % | 2 % | 5 % |" in text  # floor by judge, mean, mean at 1e-3
    assert "| cloak@mid | 37.0 (32.0) | 0.960 (0.920) | 21.0 | 2.5 |" in text
    assert text.count("\n| pgd | ") == 3 and "005869" in text  # dodging, impersonation, quality
    no_imp = markdown_tables(synthetic_result(result["examples"], impersonation=False))
    assert "Impersonation" not in no_imp and no_imp.count("\n| pgd | ") == 2
