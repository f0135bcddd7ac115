"""Calibration maths on synthetic scores (exact expectations), and the shipped table's consistency."""

import numpy as np
import pytest

from faceshield.eval.calibration import (
    CalibrationTable, calibrate_scores, pair_scores, roc_auc, shipped_table, threshold_at_far,
)


def _brute_auc(genuine, impostor):
    g = genuine[:, None]
    i = impostor[None, :]
    return float(((g > i) + 0.5 * (g == i)).mean())


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    genuine = np.round(rng.normal(0.6, 0.2, 300), 2)
    impostor = np.round(rng.normal(0.1, 0.2, 2000), 2)  # rounding creates ties
    assert roc_auc(genuine, impostor) == pytest.approx(_brute_auc(genuine, impostor), abs=1e-12)
    assert roc_auc(np.array([1.0, 2.0]), np.array([0.0, 0.5])) == 1.0
    assert roc_auc(np.array([0.0]), np.array([1.0])) == 0.0


def test_threshold_at_far_bounds_false_accepts():
    rng = np.random.default_rng(1)
    impostor = rng.normal(size=10_000)
    for far in (1e-1, 1e-2, 1e-3):
        t = threshold_at_far(impostor, far)
        assert (impostor > t).mean() <= far
        # and it is the smallest such observed score: one step lower admits too many
        lower = np.sort(impostor)[np.searchsorted(np.sort(impostor), t) - 1]
        assert (impostor > lower).mean() > far


def test_pair_scores_and_calibration_on_separable_embeddings():
    rng = np.random.default_rng(2)
    ids = rng.normal(size=(50, 16))
    train = ids + 0.1 * rng.normal(size=ids.shape)
    test = ids + 0.1 * rng.normal(size=ids.shape)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    genuine, impostor = pair_scores(train, test)
    assert genuine.shape == (50,) and impostor.shape == (50 * 49,)
    cal = calibrate_scores("toy", genuine, impostor)
    assert cal.auc > 0.99 and not cal.weak and cal.tar["0.01"] > 0.95
    noise = calibrate_scores("noise", rng.normal(size=50), rng.normal(size=2450))
    assert noise.weak


def test_table_json_roundtrip_and_markdown():
    rng = np.random.default_rng(3)
    cal = calibrate_scores("m", rng.normal(1, 1, 100), rng.normal(0, 1, 1000))
    table = CalibrationTable({"m": cal}, {"command": "x"})
    again = CalibrationTable.from_json(table.to_json())
    assert again.models["m"] == cal
    assert "| m |" in table.markdown()


def test_shipped_table_covers_the_zoo():
    from faceshield.models.registry import list_fr_models

    table = shipped_table()
    import json
    from importlib import resources

    research = set(json.loads(resources.files("faceshield").joinpath("data/calibration.json").read_text())
                   .get("research_models", {}))
    assert set(table.models) | research == set(list_fr_models())
    assert table.meta["command"].startswith("faceshield calibrate")
    assert table.strong_models(), "at least one model must separate identities well"
    for cal in table.models.values():
        assert cal.threshold(1e-3) >= cal.threshold(1e-2)
        assert cal.n_impostor == cal.n_genuine * (cal.n_genuine - 1)
