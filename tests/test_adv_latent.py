"""adv-latent (Weakening Diffusion Purification) end to end: tiny Stable Diffusion, real zoo model, real photos."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from faceshield.diffusion.adapter import save_tiny_stable_diffusion  # noqa: E402
from faceshield.faces.detect import create_detector, detect_faces, landmark_tensor  # noqa: E402
from faceshield.faces.masks import face_mask_from_landmarks  # noqa: E402
from faceshield.images import to_tensor  # noqa: E402
from faceshield.methods.base import create_method  # noqa: E402

from conftest import PAIRS, pair_ids  # noqa: E402

FAST = {"surrogates": ("mobilefacenet-ms1m",), "null_steps": 2, "steps": 6}


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return str(save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def photo(face_rgb):
    return to_tensor(face_rgb), landmark_tensor(detect_faces(face_rgb, create_detector()))


def test_fr_loss_falls_and_pixels_outside_the_face_mask_are_untouched(tiny_sd_dir, photo):
    image, landmarks = photo
    method = create_method("adv-latent", diffusion_model=tiny_sd_dir, **FAST)
    result = method.protect(image, landmarks)
    history = result.history
    # dodging: mean cosine to the face's own embedding, per latent step
    assert len(history["adversarial"]) == FAST["steps"] == result.steps
    assert history["adversarial"][-1] < history["adversarial"][0] - 0.05, history["adversarial"]
    assert history["structure"][0] == 0.0 and max(history["structure"]) > 0  # starts at the original's maps
    assert history["reconstruction_mse_learned"][0] < history["reconstruction_mse_plain"][0]
    out = result.image
    assert out.shape == image.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    mask = face_mask_from_landmarks(landmarks, tuple(image.shape[-2:]), scale=method.config.mask_scale,
                                    softness=0.25).amax(0, keepdim=True)
    outside = (mask == 0).expand_as(image)
    assert outside.float().mean() > 0.3
    assert torch.equal(out[outside], image[outside])
    assert (out - image)[~outside].abs().max() > 0.05  # and the face did change


def test_impersonation_moves_toward_the_target(tiny_sd_dir, photo, shared_data):
    from faceshield.images import load_image

    image, landmarks = photo
    method = create_method("adv-latent", diffusion_model=tiny_sd_dir, **FAST)
    other = load_image(PAIRS / "train" / f"{pair_ids(2)[1]}.png").rgb
    with torch.no_grad():
        target = method.ensemble(to_tensor(other), landmark_tensor(detect_faces(other, create_detector())[:1]))
    result = method.protect(image, landmarks, target)
    adversarial = result.history["adversarial"]  # 1 − mean cosine to the target
    assert adversarial[-1] < adversarial[0] - 0.05, adversarial


def test_a_face_result_does_not_depend_on_the_other_faces_in_its_batch(tiny_sd_dir, shared_data):
    """Faces of several photos are protected in one batch. Float rounding differs between batch sizes and the
    FR gradients amplify it, so compare two batches of the same size that differ only in their other face."""
    from faceshield.faces.align import crop_transform, warp_to_crop
    from faceshield.images import load_image

    method = create_method("adv-latent", diffusion_model=tiny_sd_dir, **{**FAST, "steps": 3})
    crops = []
    for pid in pair_ids(3):
        rgb = load_image(PAIRS / "train" / f"{pid}.png").rgb
        lm = landmark_tensor(detect_faces(rgb, create_detector())[:1])
        crops.append(warp_to_crop(to_tensor(rgb), crop_transform(lm, method.template), 256))
    first, _, _ = method.protect_faces(torch.cat([crops[0], crops[1]]))
    second, _, _ = method.protect_faces(torch.cat([crops[0], crops[2]]))
    assert (first[0] - second[0]).abs().max() < 1e-5
    assert (first[1] - second[1]).abs().mean() > 0.01


def test_cli_protects_with_a_local_model_folder(tiny_sd_dir, tmp_path, shared_data):
    from click.testing import CliRunner

    from faceshield.cli.main import cli

    photo = PAIRS / "train" / f"{pair_ids(1)[0]}.png"
    args = ["protect", str(photo), "-o", str(tmp_path), "--method", "adv-latent", "--diffusion-model", tiny_sd_dir,
            "--surrogates", "mobilefacenet-ms1m", "--set", "steps=2", "--set", "null_steps=1", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)["photos"][0]
    assert record["status"] == "protected" and record["method"] == "adv-latent"
    assert record["parameters"]["diffusion_model"] == tiny_sd_dir and record["steps"] == 2
    assert (tmp_path / f"{photo.stem}_protected.png").is_file()

    wrong = CliRunner().invoke(cli, ["protect", str(photo), "-o", str(tmp_path), "--diffusion-model", tiny_sd_dir])
    assert wrong.exit_code != 0 and "uses no diffusion model" in wrong.output
    missing = CliRunner().invoke(cli, ["protect", str(photo), "-o", str(tmp_path / "x"), "--method", "adv-latent",
                                       "--diffusion-model", str(tmp_path / "no-model")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert not list((tmp_path / "x").glob("*.png"))


def test_faces_of_several_photos_run_in_one_batch_and_a_bad_photo_is_skipped(tiny_sd_dir, tmp_path, shared_data):
    import shutil

    from faceshield.protect import Protector, protect_paths

    folder = tmp_path / "in"
    folder.mkdir()
    for pid in pair_ids(2):
        shutil.copy(PAIRS / "train" / f"{pid}.png", folder / f"{pid}.png")
    (folder / "broken.png").write_bytes(b"not a picture")
    method = create_method("adv-latent", diffusion_model=tiny_sd_dir, **{**FAST, "steps": 2})
    batches = []
    protect_faces = method.protect_faces

    def counting(crops, *args, **kwargs):
        batches.append(len(crops))
        return protect_faces(crops, *args, **kwargs)

    method.protect_faces = counting
    records = protect_paths([folder], Protector(method), tmp_path / "out", batch_size=3, progress=False).records
    assert sorted(r.status == "failed" for r in records) == [False, False, True]
    assert all(r.status in ("protected", "weak") and r.verdicts for r in records if r.status != "failed")
    assert batches == [2]  # both faces together, the broken file left out
    assert all((tmp_path / "out" / f"{pid}_protected.png").is_file() for pid in pair_ids(2))
    assert "broken.png" in next(r.error for r in records if r.status == "failed")
