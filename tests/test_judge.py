"""The independent judging pipeline (faceshield.eval.judge): it must share nothing with the protection but the FR
network — another detector, another landmark set, another resampler — and still verify real faces."""

import numpy as np
import pytest
import torch

from conftest import pair_ids
from faceshield.errors import FaceshieldError
from faceshield.eval.judge import IndependentJudge, align_cv2, calibrate_judge, judge_table
from faceshield.faces.align import align_to_template
from faceshield.faces.detect import best_face_landmarks, default_detector
from faceshield.images import load_image, to_tensor
from faceshield.models.registry import cached_fr_model

MODEL = "mobilefacenet-ms1m"


@pytest.fixture(scope="module")
def judge():
    return IndependentJudge([MODEL])


def _photo(shared_data, split, pid):
    return load_image(next((shared_data / "celebahq-pairs" / split).glob(f"{pid}.*"))).rgb


def test_cv2_alignment_puts_the_landmarks_on_the_template(face_rgb):
    """The warp really aligns: a photo with dots drawn at the landmarks comes out with the dots on the template."""
    config = cached_fr_model(MODEL).config
    landmarks = best_face_landmarks(face_rgb, default_detector())[0].numpy()
    dots = np.zeros_like(face_rgb)
    for x, y in landmarks:
        dots[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2] = 255
    crop = align_cv2(dots, landmarks, config.template, config.input_size)[..., 0].astype(float)
    for tx, ty in config.template:
        y0, x0 = int(round(ty)), int(round(tx))
        window = crop[y0 - 4:y0 + 5, x0 - 4:x0 + 5]
        assert window.max() > 40, (tx, ty)  # the dot landed within 4 px of its template point
        cy, cx = np.unravel_index(window.argmax(), window.shape)
        assert abs(cy - 4) <= 2 and abs(cx - 4) <= 2


def test_the_judge_shares_no_step_with_the_protection(face_rgb, judge):
    """Its detector is not RetinaFace, its landmarks differ from the protection's, and its crop is resampled
    differently (not the protection's grid_sample crop) — yet the embedding is of the same face."""
    ours = best_face_landmarks(face_rgb, default_detector())
    theirs = judge.landmarks(face_rgb)
    assert judge.detector.name != default_detector().name
    assert np.abs(theirs - ours[0].numpy()).max() > 0.5
    config = cached_fr_model(MODEL).config
    their_crop = align_cv2(face_rgb, theirs, config.template, config.input_size).astype(float) / 255
    our_crop = align_to_template(to_tensor(face_rgb), ours, config.template, config.input_size)[0]
    assert np.abs(their_crop - our_crop.permute(1, 2, 0).numpy()).mean() > 0.01
    with torch.no_grad():
        ours_emb = cached_fr_model(MODEL)(our_crop[None])[0].numpy()
    assert judge.embed(face_rgb)[MODEL] @ ours_emb > 0.8
    with pytest.raises(FaceshieldError, match="not independent"):
        IndependentJudge([MODEL], detector="retinaface")


def test_no_face_is_none_not_a_score(judge):
    blank = np.full((200, 200, 3), 128, np.uint8)
    assert judge.embed(blank) is None
    assert judge.similarity(blank, {MODEL: np.ones(128) / np.sqrt(128)}) is None


def test_verifies_real_pairs_with_its_own_thresholds(shared_data, judge):
    """Genuine CelebA-HQ pairs score above the pipeline's FAR-1e-2 threshold far more often than impostor pairs."""
    threshold = judge.thresholds[MODEL]
    ids = pair_ids(6)
    emb = {(s, i): judge.embed(_photo(shared_data, s, i))[MODEL] for s in ("train", "test") for i in ids}
    genuine = [emb["train", i] @ emb["test", i] for i in ids]
    impostor = [emb["train", i] @ emb["test", k] for i in ids for k in ids if i != k]
    assert np.mean(np.array(genuine) > threshold) >= 0.8
    assert np.mean(np.array(impostor) > threshold) <= 0.1


def test_shipped_thresholds_come_from_this_pipeline(shared_data):
    """The shipped table was made through the independent pipeline (its meta says so), and recalibrating on a few
    pairs through the same code gives thresholds of the same scale."""
    table = judge_table()
    assert "warpAffine bicubic" in table.meta["pipeline"] and table.meta["n_pairs"] >= 300
    assert MODEL in table.models and table.models[MODEL].auc > 0.95
    small = calibrate_judge(shared_data / "celebahq-pairs", [MODEL], limit=12)
    assert small.meta["n_pairs"] == 12 and small.models[MODEL].n_impostor == 12 * 11
    assert abs(small.models[MODEL].threshold(1e-2) - table.models[MODEL].threshold(1e-2)) < 0.25
