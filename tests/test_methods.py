"""Method registry and the budgets each method promises."""

import pytest
import torch

from conftest import PAIRS, pair_ids
from faceshield.errors import FaceshieldError, ShapeError
from faceshield.faces.detect import detect_faces
from faceshield.images import load_image, to_tensor
from faceshield.methods.base import create_method, list_methods

FAST = "mobilefacenet-ms1m"


@pytest.fixture(scope="module")
def photo(shared_data):
    rgb = load_image(PAIRS / "train" / f"{pair_ids(3)[2]}.png").rgb
    return to_tensor(rgb), torch.from_numpy(detect_faces(rgb)[0].landmarks[None]).float()


def test_registry_lists_methods_and_rejects_unknown_settings():
    assert {"cloak", "pgd", "tip-im"} <= set(list_methods())
    with pytest.raises(FaceshieldError, match="unknown setting"):
        create_method("pgd", epsilonn=0.1)
    with pytest.raises(FaceshieldError, match="unknown method"):
        create_method("nope")


@pytest.mark.parametrize("name", ["pgd", "tip-im"])
def test_baselines_respect_their_linf_budget_and_lower_similarity(photo, name):
    image, landmarks = photo
    method = create_method(name, surrogates=(FAST,), steps=5)
    result = method.protect(image, landmarks)
    assert float((result.image - image).abs().max()) <= 8 / 255 + 1e-6
    assert result.steps == 5 and len(result.history["loss"]) == 5
    before = method.ensemble(image, landmarks)[FAST]
    after = method.ensemble(result.image, landmarks)[FAST]
    assert float((before * after).sum()) < 0.9


def test_cloak_leaves_pixels_outside_the_face_untouched(photo):
    image, landmarks = photo
    method = create_method("cloak", surrogates=(FAST,), steps=3)
    out = method.protect(image, landmarks).image
    changed = (out - image).abs().amax(1)[0] > 0
    ys, xs = torch.nonzero(changed, as_tuple=True)
    lm = landmarks[0]
    span = float((lm[:, 1].max() - lm[:, 1].min()))
    assert changed.any()
    assert float(ys.min()) > float(lm[:, 1].min()) - 2.5 * span and float(ys.max()) < float(lm[:, 1].max()) + 2.5 * span
    assert not changed[:, :5].any() and not changed[:, -5:].any()  # image borders far from the face


def test_impersonation_moves_toward_the_target(photo, shared_data):
    image, landmarks = photo
    target_rgb = load_image(PAIRS / "test" / f"{pair_ids(4)[3]}.png").rgb
    target_lm = torch.from_numpy(detect_faces(target_rgb)[0].landmarks[None]).float()
    method = create_method("cloak", surrogates=(FAST,), steps=10, eot=False)
    target = method.ensemble(to_tensor(target_rgb), target_lm)
    before = float((method.ensemble(image, landmarks)[FAST] * target[FAST]).sum())
    out = method.protect(image, landmarks, target).image
    after = float((method.ensemble(out, landmarks)[FAST] * target[FAST]).sum())
    assert after > before + 0.1


def test_bad_shapes(photo):
    image, landmarks = photo
    method = create_method("pgd", surrogates=(FAST,), steps=1)
    with pytest.raises(ShapeError):
        method.protect(image[0], landmarks)
    with pytest.raises(ShapeError):
        method.protect(image, landmarks[:, :3])
