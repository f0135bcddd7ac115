"""adv-latent (Weakening Diffusion Purification) end to end: tiny Stable Diffusion, real zoo model, real photos.

The diffusion model here has random weights, so these tests are the only proof that each paper mechanism is in the
code. Rule for this file and every diffusion method added later: each mechanism of the paper has a test that
fails when the mechanism is removed or reversed, and its docstring says which (the table: docs/mechanisms.md).
"""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from faceshield.diffusion.loading import load_stable_diffusion  # noqa: E402
from faceshield.diffusion.testing import save_tiny_stable_diffusion  # noqa: E402
from faceshield.diffusion.inversion import ddim_invert, denoise, learn_unconditional_embeddings  # noqa: E402
from faceshield.faces.align import CELEBAHQ_256, crop_transform, warp_back, warp_to_crop  # noqa: E402
from faceshield.faces.detect import create_detector, detect_faces, landmark_tensor  # noqa: E402
from faceshield.faces.masks import face_mask_from_landmarks  # noqa: E402
from faceshield.images import to_tensor  # noqa: E402
from faceshield.methods.adv_latent import AdvLatent, AdvLatentConfig  # noqa: E402
from faceshield.methods.base import create_method  # noqa: E402

from conftest import PAIRS, pair_ids  # noqa: E402

FAST = {"surrogates": ("mobilefacenet-ms1m",), "null_steps": 2, "steps": 6}


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return str(save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def photo(face_rgb):
    return to_tensor(face_rgb), landmark_tensor(detect_faces(face_rgb, create_detector()))


@pytest.fixture(scope="module")
def crop(photo):
    """The photo's face aligned to adv-latent's 256² template, as ``protect`` crops it."""
    image, landmarks = photo
    matrix = crop_transform(landmarks, torch.tensor(CELEBAHQ_256))
    return warp_to_crop(image, matrix, 256, padding_mode="border", antialias=True)


def capture_faces(method) -> list:
    """Make ``method.protect_faces`` also append ``(aligned input faces, protected faces)`` to the returned list."""
    captured = []
    protect_faces = method.protect_faces

    def capture(faces, *args, **kwargs):
        out = protect_faces(faces, *args, **kwargs)
        captured.append((faces, out[0]))
        return out

    method.protect_faces = capture
    return captured


def fr_cosines(method, faces, reference):
    """{model: cosine of each face to ``reference`` (a {model: 1×D} embedding)}, computed outside the method."""
    with torch.no_grad():
        embeddings = method.ensemble(faces, method.template.expand(len(faces), 5, 2))
    return {k: (e * reference[k]).sum(-1) for k, e in embeddings.items()}


def test_fr_loss_falls_and_the_face_is_pasted_back_through_its_mask(tiny_sd_dir, photo):
    """Mechanisms: the FR loss (dodging lowers the surrogate's similarity to the person, measured here outside the
    method) and the paste-back (outside the feathered face mask the photo is untouched; inside it is exactly the
    protected crop warped back, blended by that mask)."""
    image, landmarks = photo
    method = create_method("adv-latent", diffusion_model=tiny_sd_dir, **FAST)
    crops = capture_faces(method)
    result = method.protect(image, landmarks)
    history = result.history
    assert len(history["adversarial"]) == FAST["steps"] == result.steps
    # dodging: history["adversarial"] is the mean cosine to the face's own embedding, per latent step
    assert history["adversarial"][-1] < history["adversarial"][0] - 0.1, history["adversarial"]
    (original, protected), = crops
    with torch.no_grad():
        reference = method.ensemble(original, method.template[None])
    after = fr_cosines(method, protected, reference)["mobilefacenet-ms1m"]
    assert float(after) < history["adversarial"][0] - 0.1, (float(after), history["adversarial"])
    assert history["reconstruction_mse_learned"][0] < history["reconstruction_mse_plain"][0]

    out = result.image
    assert out.shape == image.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    mask = face_mask_from_landmarks(landmarks, tuple(image.shape[-2:]), scale=method.config.mask_scale,
                                    softness=0.25)
    matrix = crop_transform(landmarks, method.template)
    warped = warp_back(protected.to(image), matrix, tuple(image.shape[-2:]))
    coverage = warp_back(torch.ones_like(protected[:, :1]), matrix, tuple(image.shape[-2:]))
    expected = image * (1 - mask * coverage) + mask * warped
    assert (out - expected).abs().max() < 1e-5
    outside = (mask == 0).expand_as(image)
    assert outside.float().mean() > 0.3
    assert torch.equal(out[outside], image[outside])
    inside = (mask == 1).expand_as(image)
    assert inside.float().mean() > 0.1 and (out - image)[inside].abs().mean() > 0.05  # the face was replaced


def test_the_protected_trajectory_starts_at_the_start_step_and_always_uses_the_learned_embeddings(
        tiny_sd_dir, crop):
    """Mechanisms: DDIM inversion to the start step (timestep 101 of 20 steps, sampled through 101, 51, 1: the
    paper's start step 17), the learned unconditional embeddings in every generation of the protected face (the
    original branch's attention maps, each optimisation step, the final decoding), and the FR term's value
    (``adv_weight`` × the sum over surrogates, the authors' weighting).

    With a vanishing learning rate the latent never moves, so the result must be exactly the reconstruction
    computed here from the library's inversion and embedding learning along that path; the plain empty-prompt
    embeddings give a clearly different face."""
    surrogates = ("mobilefacenet-ms1m", "mobileface")
    method = create_method("adv-latent", diffusion_model=tiny_sd_dir, surrogates=surrogates, null_steps=2, steps=2,
                           lr=1e-9)
    faces, _, history = method.protect_faces(crop)

    sd = method.model
    path = [101, 51, 1]
    assert sd.timesteps(20)[17:] == path
    with torch.no_grad():
        clean = sd.encode_images(crop).float()
        empty = sd.encode_prompts([""])
        trajectory = ddim_invert(sd, clean, empty, path)
        plain = sd.decode_latents(denoise(sd, trajectory[0], path, empty))
    learned = learn_unconditional_embeddings(sd, trajectory, path, empty, steps=2, lr=0.1)
    with torch.no_grad():
        expected = sd.decode_latents(learned.reconstruction)
    assert (expected - plain).abs().mean() > 0.01  # the check below can tell the two apart
    assert (faces - expected).abs().max() < 1e-3, float((faces - expected).abs().max())

    # the original branch's maps come from the same generation as the first optimisation step
    assert history["structure"][0] == 0.0 and max(history["structure"]) < 1e-12, history["structure"]
    # step 0 generated the reconstruction: its FR term, computed here, is what was optimised
    with torch.no_grad():
        reference = method.ensemble(crop, method.template[None])
    cosines = fr_cosines(method, expected, reference)
    assert set(cosines) == set(surrogates)
    fr_sum = sum(float(c) for c in cosines.values())  # dodging: Σ_models cos, not the mean
    mean = fr_sum / len(cosines)
    assert history["adversarial"][0] == pytest.approx(mean, abs=1e-4)  # logged: the mean, for readability
    assert abs(mean - fr_sum) > 0.01
    assert history["loss"][0] == pytest.approx(0.003 * fr_sum, abs=1e-6)  # λ_adv × Σ + structure (0 at step 0)


@pytest.fixture(scope="module")
def peaked_sd(tiny_sd_dir):
    """The tiny model with its self-attention logits ×9 (queries and keys ×3): peaked maps as a trained model has,
    instead of the near-uniform ones of random weights, so that the structure loss is large enough to steer."""
    sd = load_stable_diffusion(tiny_sd_dir)
    with torch.no_grad():
        for name in sd.self_attention_layers():
            attention = sd.unet.get_submodule(name)
            attention.to_q.weight.mul_(3)
            attention.to_k.weight.mul_(3)
    return sd


def test_the_structure_loss_holds_the_attention_maps_and_its_weight_matters(peaked_sd, tiny_sd_dir, crop):
    """Mechanism: the self-attention structure loss is part of the optimised objective, weighed against the FR
    term by λ_adv. With a small λ_adv it dominates (the maps stay near the original's and the FR term barely moves);
    with a large one the FR term wins (maps drift, identity moves). AdamW is invariant to the scale of the loss, so
    without the structure term in the loss both runs would be the same."""
    runs = {}
    for weight in (1e-4, 1.0):
        config = AdvLatentConfig(diffusion_model=tiny_sd_dir, surrogates=("mobilefacenet-ms1m",), null_steps=2,
                                 steps=6, adv_weight=weight)
        runs[weight] = AdvLatent(config, model=peaked_sd).protect_faces(crop)[2]
    held, free = runs[1e-4], runs[1.0]
    # observed on 4 faces: structure ratio 0.19-0.25 and FR progress ratio 0.04-0.44; without the structure term in
    # the loss both ratios are ≈ 1 (0.96-1.3)
    assert held["structure"][-1] < 0.5 * free["structure"][-1], (held["structure"], free["structure"])
    progress = {w: h["adversarial"][0] - h["adversarial"][-1] for w, h in runs.items()}
    assert progress[1.0] > 0.15 and progress[1e-4] < 0.7 * progress[1.0], progress


def test_impersonation_moves_toward_the_target(tiny_sd_dir, photo, shared_data):
    """Mechanism: the FR loss's sign for impersonation (1 − cos to the target, minimised): the protected face's
    similarity to the target, measured here outside the method, ends well above where the optimisation began."""
    from faceshield.images import load_image

    image, landmarks = photo
    method = create_method("adv-latent", diffusion_model=tiny_sd_dir, **FAST)
    other = load_image(PAIRS / "train" / f"{pair_ids(2)[1]}.png").rgb
    with torch.no_grad():
        target = method.ensemble(to_tensor(other), landmark_tensor(detect_faces(other, create_detector())[:1]))
    captured = capture_faces(method)
    result = method.protect(image, landmarks, target)
    adversarial = result.history["adversarial"]  # 1 − mean cosine to the target
    assert adversarial[-1] < adversarial[0] - 0.05, adversarial
    (_, protected), = captured
    after = float(fr_cosines(method, protected, target)["mobilefacenet-ms1m"])
    assert after > 1 - adversarial[0] + 0.1, (after, adversarial)


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
