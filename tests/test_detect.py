"""Face detection: real photos, several faces, no face, large photos, and the decoding / NMS maths."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceshield.errors import FaceshieldError, ShapeError
from faceshield.faces import retinaface as rf
from faceshield.faces.detect import (
    DEFAULT_DETECTOR,
    Face,
    FaceDetector,
    box_iou,
    create_detector,
    detect_faces,
    five_from_68,
    list_detectors,
    nms,
)

CELEB = ["celebahq-pairs/train/1.png", "celebahq-pairs/test/1.png", "celebahq-pairs/train/10.png",
         "celebahq-pairs/test/100.png"]
TARGET = "targets/test/008793.jpg"


def load(data: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(data / rel).convert("RGB"))


def iod_error(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(pred - ref, axis=1).mean() / np.linalg.norm(ref[0] - ref[1]))


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return create_detector(DEFAULT_DETECTOR)


@pytest.fixture(scope="module")
def photos(shared_data) -> dict[str, np.ndarray]:
    return {rel: load(shared_data, rel) for rel in CELEB + [TARGET]}


def assert_plausible(face: Face, image: np.ndarray) -> None:
    le, re, nose, lm, rm = face.landmarks
    x0, y0, x1, y1 = face.box
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    assert 0.0 <= face.score <= 1.0
    assert le[0] < nose[0] < re[0], "eyes must straddle the nose, image-left eye first"
    assert lm[0] < rm[0], "image-left mouth corner first"
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1]), "eyes above nose above mouth"
    assert np.all(face.landmarks[:, 0] > x0) and np.all(face.landmarks[:, 0] < x1)
    assert np.all(face.landmarks[:, 1] > y0) and np.all(face.landmarks[:, 1] < y1)
    h, w = image.shape[:2]
    assert -0.1 * w < x0 < x1 < 1.1 * w and -0.1 * h < y0 < y1 < 1.1 * h
    # A single-face portrait: the face is a sizeable part of the photo and the eyes are well apart.
    assert (x1 - x0) > 0.25 * w
    assert np.linalg.norm(re - le) > 0.25 * (x1 - x0)


@pytest.mark.parametrize("rel", CELEB + [TARGET])
def test_one_face_with_plausible_landmarks(detector, photos, rel):
    image = photos[rel]
    faces = detect_faces(image, detector)
    assert len(faces) == 1, [f.score for f in faces]
    assert faces[0].score >= 0.9
    assert_plausible(faces[0], image)


def test_landmark_order_follows_the_image_when_mirrored(detector, photos):
    image = photos[CELEB[0]]
    face = detect_faces(image, detector)[0]
    mirrored = detect_faces(np.ascontiguousarray(image[:, ::-1]), detector)[0]
    w = image.shape[1]
    # Mirroring swaps left/right: mirrored point k is the original's partner, reflected (x → w − x).
    partner = [1, 0, 2, 4, 3]
    expected = face.landmarks[partner] * np.array([-1, 1], dtype=np.float32) + np.array([w, 0], dtype=np.float32)
    assert iod_error(mirrored.landmarks, expected) < 0.06


def test_landmarks_agree_with_dlib_68(detector, photos):
    pytest.importorskip("dlib")
    dlib_hog = create_detector("dlib-hog")
    errors = []
    for rel in CELEB + [TARGET]:
        ref = detect_faces(photos[rel], dlib_hog)
        assert len(ref) == 1
        errors.append(iod_error(detect_faces(photos[rel], detector)[0].landmarks, ref[0].landmarks))
    # Different annotation conventions put the two about 0.03–0.06 inter-ocular distances apart; a wrong
    # order or a decoding error would give ≥ 0.3.
    assert max(errors) < 0.1, errors


def tile(images: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)], axis=0)


def test_four_faces_in_a_2x2_grid(detector, photos):
    grid = tile([photos[rel] for rel in CELEB])  # 512×512
    faces = detect_faces(grid, detector)
    assert len(faces) == 4
    quadrants = sorted((int((f.box[0] + f.box[2]) / 2 >= 256), int((f.box[1] + f.box[3]) / 2 >= 256)) for f in faces)
    assert quadrants == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for face in faces:
        # Check each face against its own quadrant, in that quadrant's coordinates.
        dx, dy = 256 * int(face.box[0] >= 200), 256 * int(face.box[1] >= 200)
        local = Face(box=(face.box[0] - dx, face.box[1] - dy, face.box[2] - dx, face.box[3] - dy), score=face.score,
                     landmarks=face.landmarks - np.array([dx, dy], dtype=np.float32))
        assert_plausible(local, grid[dy:dy + 256, dx:dx + 256])


def test_a_face_larger_than_the_anchors_is_found_whole(detector, photos):
    # At 1280² this face is ~750 px wide, beyond RetinaFace's 512-px anchors: a single-resolution search
    # returns fragments; the coarse pass must return the whole face, matching the 256² detection × 5.
    small = detect_faces(photos[CELEB[2]], detector)
    big = detect_faces(np.asarray(Image.fromarray(photos[CELEB[2]]).resize((1280, 1280), Image.BICUBIC)), detector)
    assert len(small) == 1 and len(big) == 1
    iou = box_iou(torch.tensor([big[0].box]), torch.tensor([small[0].box]) * 5).item()
    assert iou > 0.75  # measured 0.81 (scale noise); a single-resolution search gives ≤ 0.5
    assert iod_error(big[0].landmarks, small[0].landmarks * 5) < 0.05


def test_no_face_in_blank_or_noise(detector):
    rng = np.random.default_rng(0)
    assert detect_faces(np.full((240, 320, 3), 180, dtype=np.uint8), detector) == []
    assert detect_faces(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8), detector) == []


class Recording:
    """Wraps a detector and remembers the image sizes it was given."""

    def __init__(self, inner: FaceDetector):
        self.inner, self.name, self.shapes = inner, inner.name, []

    def detect(self, image):
        self.shapes.append(image.shape)
        return self.inner.detect(image)


def test_large_canvas_goes_through_max_side_and_maps_back(detector, photos):
    face = photos[CELEB[1]]
    crop = np.asarray(Image.fromarray(face).resize((768, 768), Image.BICUBIC))
    canvas = np.full((3000, 4000, 3), 90, dtype=np.uint8)
    dx, dy = 2100, 1300
    canvas[dy:dy + 768, dx:dx + 768] = crop
    recording = Recording(detector)
    found = detect_faces(canvas, recording, max_side=1280)
    assert recording.shapes == [(960, 1280, 3)]
    expected = detect_faces(crop, detector, max_side=1280)
    assert len(found) == 1 and len(expected) == 1
    shifted = expected[0].box[0] + dx, expected[0].box[1] + dy, expected[0].box[2] + dx, expected[0].box[3] + dy
    iou = box_iou(torch.tensor([found[0].box]), torch.tensor([shifted])).item()
    # The detector sees the face at 245 px here and at 350 px in the crop's own coarse pass: the results
    # differ by the network's scale noise (measured IoU 0.97, landmarks 0.055 IOD); a mapping error would
    # be off by hundreds of pixels.
    assert iou > 0.9
    assert iod_error(found[0].landmarks, expected[0].landmarks + np.array([dx, dy], dtype=np.float32)) < 0.08
    # The canvas keeps its resolution for the caller and min_size is measured in its pixels.
    assert detect_faces(canvas, detector, max_side=1280, min_size=800) == []


def test_min_score_and_min_size_filter(detector, photos):
    image = photos[CELEB[0]]
    assert detect_faces(image, detector, min_score=1.01) == []
    assert detect_faces(image, detector, min_size=300) == []
    assert len(detect_faces(image, detector, min_size=50)) == 1


def test_rejects_wrong_input(detector):
    with pytest.raises(ShapeError):
        detect_faces(np.zeros((64, 64, 3), dtype=np.float32), detector)
    with pytest.raises(ShapeError):
        detect_faces(np.zeros((64, 64), dtype=np.uint8), detector)
    with pytest.raises(ShapeError):
        detector.model(torch.zeros(1, 1, 64, 64))


def test_dlib_hog_without_dlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(FaceshieldError, match="pip install dlib-bin"):
        create_detector("dlib-hog")


def test_registry():
    assert {"retinaface", "mtcnn", "dlib-hog"} <= set(list_detectors())
    assert DEFAULT_DETECTOR in list_detectors()
    with pytest.raises(FaceshieldError, match="unknown face detector"):
        create_detector("no-such-detector")


# --- maths ----------------------------------------------------------------------------------------------------
def test_nms_keeps_the_best_of_two_overlapping_boxes():
    boxes = torch.tensor([[10.0, 10, 110, 110], [12, 8, 112, 108], [300, 300, 350, 350]])
    scores = torch.tensor([0.80, 0.95, 0.60])
    assert nms(boxes, scores, 0.4).tolist() == [1, 2]
    # Below the overlap threshold both survive, best first.
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.4).numel() == 0


def test_nms_min_overlap_removes_nested_boxes():
    boxes = torch.tensor([[0.0, 0, 100, 100], [40, 40, 60, 60]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]  # IoU = 0.04
    assert nms(boxes, scores, 0.5, overlap="min").tolist() == [0]  # inside: overlap over min area = 1


def test_box_iou_values():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0]]))


def test_anchor_layout():
    priors = rf.anchors(64, 100)
    expected = sum(2 * math.ceil(64 / s) * math.ceil(100 / s) for s in rf.STEPS)
    assert priors.shape == (expected, 3)
    # Level 1 (stride 8): row-major cells, two sizes per cell.
    assert priors[:4].tolist() == [[4, 4, 16], [4, 4, 32], [12, 4, 16], [12, 4, 32]]
    first_of_level2 = 2 * 8 * 13
    assert priors[first_of_level2].tolist() == [8, 8, 64]
    assert priors[-1].tolist() == [16 + 32 * 3, 16 + 32 * 1, 512]


def test_decode_inverts_the_encoding():
    prior = torch.tensor([[100.0, 50.0, 32.0]])
    box = torch.tensor([80.0, 30.0, 130.0, 90.0])  # centre (105, 60), size (50, 60)
    v0, v1 = rf.VARIANCES
    loc = torch.tensor([[(105 - 100) / (v0 * 32), (60 - 50) / (v0 * 32),
                         math.log(50 / 32) / v1, math.log(60 / 32) / v1]])
    assert torch.allclose(rf.decode_boxes(loc, prior)[0], box, atol=1e-4)
    points = torch.tensor([[90.0, 40], [110, 41], [100, 55], [92, 70], [108, 71]])
    pre = ((points - prior[0, :2]) / (v0 * 32)).reshape(1, 10)
    assert torch.allclose(rf.decode_landmarks(pre, prior)[0], points, atol=1e-4)
    with pytest.raises(ShapeError):
        rf.decode_boxes(torch.zeros(3, 4), prior)


def test_network_outputs_match_anchors_and_are_differentiable(detector):
    x = torch.rand(1, 3, 70, 100, requires_grad=True)
    out = detector.model(x)
    n = rf.anchors(70, 100).shape[0]
    assert out.loc.shape == (1, n, 4) and out.logits.shape == (1, n, 2) and out.landmarks.shape == (1, n, 10)
    out.scores.max().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weights_with_module_prefix(tmp_path, detector):
    state = {f"module.{k}": v for k, v in detector.model.state_dict().items()}
    torch.save(state, tmp_path / "prefixed.pth")
    model = rf.load_retinaface(tmp_path / "prefixed.pth")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(model(x).loc, detector.model(x).loc)


def test_five_from_68():
    points = np.zeros((68, 2), dtype=np.float32)
    points[36:42] = [10, 20]
    points[42:48] = [30, 20]
    points[30] = [20, 30]
    points[48], points[54] = [12, 40], [28, 40]
    assert five_from_68(points).tolist() == [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]]


# --- alternatives ---------------------------------------------------------------------------------------------
def test_mtcnn_agrees_with_default(detector, photos):
    mtcnn = create_detector("mtcnn")
    for rel in CELEB[:2]:
        found = detect_faces(photos[rel], mtcnn)
        assert len(found) == 1
        assert_plausible(found[0], photos[rel])
        assert iod_error(found[0].landmarks, detect_faces(photos[rel], detector)[0].landmarks) < 0.1
    assert detect_faces(np.full((200, 200, 3), 180, dtype=np.uint8), mtcnn) == []
