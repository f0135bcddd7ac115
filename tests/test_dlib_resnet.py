"""dlib-resnet: our parser of dlib's .dat file and PyTorch port of dlib's face-recognition ResNet, checked
against dlib itself (dlib-bin) on real faces."""

import bz2
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.errors import AssetError, ShapeError
from faceshield.models.assets import fetch
from faceshield.models.fr.dlib_resnet import (
    CONFIG,
    DLIB_AVG_RGB,
    DlibFormatError,
    DlibResNet,
    build_dlib_resnet,
    read_dlib_resnet,
    zero_padded_add,
)
from faceshield.models.registry import FaceRecognizer, create_fr_model, get_fr_config

dlib = pytest.importorskip("dlib")

N_FACES = 10
WEIGHTS = "dlib/dlib_face_recognition_resnet_model_v1.dat"


# ---------------------------------------------------------------------------------------------------------
# helpers (also the recipe behind CONFIG.template)


def chip_affine(details) -> np.ndarray:
    """2×3 matrix mapping image (x, y) to the pixel coordinates of the chip ``details`` describes.

    dlib.extract_image_chip samples the chip from the rectangle ``details.rect`` rotated by ``details.angle``
    about its centre; its top-left, top-right and bottom-right corners land on chip pixels (0, 0),
    (cols-1, 0) and (cols-1, rows-1) (dlib's get_mapping_to_chip)."""
    r = details.rect
    cx, cy = (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2
    c, s = math.cos(details.angle), math.sin(details.angle)

    def rotate(x, y):
        return c * (x - cx) - s * (y - cy) + cx, s * (x - cx) + c * (y - cy) + cy

    src = np.array([rotate(r.left(), r.top()), rotate(r.right(), r.top()), rotate(r.right(), r.bottom())])
    dst = np.array([(0, 0), (details.cols - 1, 0), (details.cols - 1, details.rows - 1)], dtype=float)
    return np.linalg.solve(np.c_[src, np.ones(3)], dst).T


def derive_dlib_chip_template(paths, detector, sp5, sp68, size: int = 150, padding: float = 0.25):
    """Mean and spread (5×2 each) of the 5 standard landmarks in dlib.get_face_chip(…, size, padding) chips.

    Landmarks from the 68-point predictor: eye centres = mean of each eye's 6 points (36–41 image-left,
    42–47 image-right), nose tip = 30, mouth corners = 48, 54; the chip itself is placed by the 5-point
    predictor, as dlib.get_face_chip does. Faces with other than one HOG detection are skipped.
    CONFIG.template = derive_dlib_chip_template(the first 50 celebahq-pairs/train faces in pair_ids order)."""
    points = []
    for path in paths:
        img = np.asarray(Image.open(path).convert("RGB"))
        dets = detector(img, 1)
        if len(dets) != 1:
            continue
        details = dlib.get_face_chip_details(sp5(img, dets[0]), size, padding)
        shape = sp68(img, dets[0])
        p = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=float)
        five = np.array([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
        a = chip_affine(details)
        points.append(five @ a[:, :2].T + a[:, 2])
    points = np.array(points)
    return points.mean(0), points.std(0), len(points)


@pytest.fixture(scope="module")
def dlib_models():
    return {
        "detector": dlib.get_frontal_face_detector(),
        "sp5": dlib.shape_predictor(str(fetch("dlib/shape_predictor_5_face_landmarks.dat"))),
        "rec": dlib.face_recognition_model_v1(str(fetch(WEIGHTS))),
    }


def _chip(path, models) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    dets = models["detector"](img, 1)
    assert len(dets) >= 1, f"no face found in {path}"
    return dlib.get_face_chip(img, models["sp5"](img, dets[0]), size=150, padding=0.25)


@pytest.fixture(scope="module")
def chips(shared_data, dlib_models) -> dict[str, np.ndarray]:
    """dlib's own 150×150 chips (uint8 RGB) of N_FACES identity pairs: ``train`` and ``test`` stacks."""
    ids = pair_ids(N_FACES)
    return {
        split: np.stack([_chip(PAIRS / split / f"{i}.png", dlib_models) for i in ids]) for split in ("train", "test")
    }


@pytest.fixture(scope="module")
def model() -> FaceRecognizer:
    return FaceRecognizer(CONFIG, build_dlib_resnet(CONFIG)).eval()


def _tensor(chips_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips_uint8).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------------------------------------------
# agreement with dlib


def test_matches_dlib_descriptors_on_real_chips(model, dlib_models, chips):
    x = chips["train"]
    reference = np.array([np.array(dlib_models["rec"].compute_face_descriptor(c, 0)) for c in x])
    with torch.no_grad():
        ours = model.raw(_tensor(x)).double().numpy()
    assert ours.shape == (len(x), 128)
    assert np.abs(ours - reference).max() <= 1e-4
    # and the normalised embeddings the zoo returns (forward = normalize(raw), test_registered_and_normalised)
    ours_unit = F.normalize(torch.from_numpy(ours), dim=1).numpy()
    reference_unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert np.abs(ours_unit - reference_unit).max() <= 1e-4


def test_input_scaling_reproduces_dlib_exactly():
    pixels = torch.arange(256, dtype=torch.float32)
    ours = (pixels.view(1, 256) / 255.0 - torch.tensor(CONFIG.mean).view(3, 1)) / torch.tensor(CONFIG.std).view(3, 1)
    dlib_way = (pixels.view(1, 256) - torch.tensor(DLIB_AVG_RGB).view(3, 1)) / 256.0
    assert torch.allclose(ours, dlib_way, atol=1e-6, rtol=0)


def test_file_contents():
    weights = read_dlib_resnet(fetch(WEIGHTS))
    assert weights.input_size == (150, 150)
    assert np.allclose(weights.avg_rgb, DLIB_AVG_RGB, atol=1e-4)
    assert weights.loss_distance_threshold == pytest.approx(0.6)
    kinds = [layer.kind for layer in weights.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("add_prev") == 14
    first = weights.layers[0]
    assert first.arrays["weight"].shape == (32, 3, 7, 7) and first.stride == (2, 2) and first.padding == (0, 0)
    assert weights.layers[-1].arrays["weight"].shape == (128, 256)


# ---------------------------------------------------------------------------------------------------------
# the zoo contract


def test_registered_and_normalised(model, chips):
    assert get_fr_config("dlib-resnet") is CONFIG
    assert create_fr_model("dlib-resnet").config.embedding_dim == 128
    x = _tensor(chips["train"][:3])
    with torch.no_grad():
        raw, unit = model.raw(x), model(x)
    assert unit.shape == (3, 128)
    assert torch.allclose(unit.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (raw.norm(dim=1) - 1).abs().min() > 0.1  # dlib's raw descriptors are not unit length
    assert torch.allclose(unit, F.normalize(raw, dim=1), atol=1e-6)


def test_gradient_reaches_input(model, chips):
    x = _tensor(chips["train"][:1]).requires_grad_(True)
    target = torch.ones(1, 128)
    (model(x) * target).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_same_person_more_similar_than_different(model, chips):
    with torch.no_grad():
        ra, rb = model.raw(_tensor(chips["train"])), model.raw(_tensor(chips["test"]))
    off_diagonal = ~torch.eye(len(ra), dtype=torch.bool)
    sim = F.normalize(ra, dim=1) @ F.normalize(rb, dim=1).T
    assert sim.diagonal().mean() > sim[off_diagonal].mean() + 0.1
    # dlib's own verification rule: same person if the raw descriptors are closer than 0.6
    dist = torch.cdist(ra, rb)
    accuracy = ((dist.diagonal() < 0.6).float().mean() + (dist[off_diagonal] >= 0.6).float().mean()) / 2
    assert accuracy > 0.8


def test_shape_errors(model):
    with pytest.raises(ShapeError):
        model(torch.rand(1, 3, 112, 112))
    with pytest.raises(ShapeError):
        model.network(torch.rand(1, 1, 150, 150))
    with pytest.raises(ShapeError):
        model.raw(torch.zeros(1, 3, 150, 150, dtype=torch.uint8))


def test_zero_padded_add_matches_dlib_semantics():
    a = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    b = torch.ones(2, 2, 3, 3)
    out = zero_padded_add(a, b)
    assert out.shape == (2, 2, 3, 3)
    assert torch.equal(out[:, :1, :2, :2], a + 1)
    assert torch.equal(out[:, 1:], b[:, 1:])
    assert torch.equal(out[:, :1, 2, :], torch.ones(2, 1, 3))


# ---------------------------------------------------------------------------------------------------------
# corrupt files


def test_truncated_file_gives_clear_error(tmp_path):
    data = fetch(WEIGHTS).read_bytes()
    for cut in (3, 5000, len(data) // 2, len(data) - 1):
        path = tmp_path / "truncated.dat"
        path.write_bytes(data[:cut])
        with pytest.raises(DlibFormatError, match=r"truncated.*while reading") as info:
            read_dlib_resnet(path)
        assert "truncated.dat" in str(info.value) and isinstance(info.value, AssetError)


def test_corrupt_file_gives_clear_error(tmp_path):
    data = fetch(WEIGHTS).read_bytes()
    bad_tag = tmp_path / "bad_tag.dat"
    bad_tag.write_bytes(data.replace(b"con_4", b"cXn_4", 1))
    with pytest.raises(DlibFormatError, match=r"'cXn_4'.*layer 0 \(con\)"):
        read_dlib_resnet(bad_tag)
    trailing = tmp_path / "trailing.dat"
    trailing.write_bytes(data + b"\x00\x01")
    with pytest.raises(DlibFormatError, match="trailing"):
        read_dlib_resnet(trailing)
    other = tmp_path / "other.dat"
    other.write_bytes(fetch("dlib/shape_predictor_5_face_landmarks.dat").read_bytes()[:100000])
    with pytest.raises(DlibFormatError, match="not a dlib metric-learning network"):
        read_dlib_resnet(other)
    compressed = tmp_path / "model.dat.bz2"
    compressed.write_bytes(bz2.compress(data[:1000]))
    with pytest.raises(DlibFormatError, match="bzip2"):
        read_dlib_resnet(compressed)


# ---------------------------------------------------------------------------------------------------------
# the alignment template


def test_template_is_where_dlib_chips_put_the_landmarks(shared_data, dlib_models):
    sp68 = dlib.shape_predictor(str(fetch("dlib/shape_predictor_68_face_landmarks.dat")))
    paths = [PAIRS / "test" / f"{i}.png" for i in pair_ids(12)]  # other photos than the derivation used
    mean, _, n = derive_dlib_chip_template(paths, dlib_models["detector"], dlib_models["sp5"], sp68)
    assert n >= 8
    assert np.abs(mean - np.array(CONFIG.template)).max() < 4.0
    # eyes level and mouth below nose below eyes, in image order
    t = np.array(CONFIG.template)
    assert t[0, 0] < t[1, 0] and t[3, 0] < t[4, 0] and t[0, 1] < t[2, 1] < t[3, 1]
