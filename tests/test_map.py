"""map (Machine Pareidolia): a tiny pixel-space DDPM saved and loaded back, the real FR and emotion models, real faces.

Each mechanism has a test that fails when it is removed or reversed (table: docs/mechanisms.md): the PCGrad
projection, the EMA, the Laplacian, the score-matching term, L_A and L_E (measured with the real models), the DDIM
inversion/sampling, the face-mask paste-back, the network choice per target, one-line loading errors; and the standard
evaluation of the 4 targets end to end (one network per target, trained on faces the protocol does not evaluate).
"""

import dataclasses
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from faceshield.diffusion.ddpm import (  # noqa: E402
    PixelDiffusion, ddim_invert, ddim_path, ddim_sample, load_ddpm, to_diffusion, to_images,
)
from faceshield.diffusion.testing import save_tiny_ddpm  # noqa: E402
from faceshield.errors import DiffusionModelError, FaceshieldError  # noqa: E402
from faceshield.faces.align import crop_transform, warp_back  # noqa: E402
from faceshield.faces.detect import best_face_landmarks, create_detector  # noqa: E402
from faceshield.faces.masks import face_mask_from_landmarks  # noqa: E402
from faceshield.images import load_image, to_tensor  # noqa: E402
from faceshield.methods.map import (  # noqa: E402
    MAP, MAPConfig, MAPTrainConfig, MAPTrainer, ExpressionCrop, ema_update, face_template, laplacian_energy,
    load_aligned_faces, project_conflicting,
)
from faceshield.models.ensemble import FREnsemble  # noqa: E402
from faceshield.models.human_aux import EMOTION_LABELS  # noqa: E402
from faceshield.settings import SettingError  # noqa: E402

from conftest import DATA, PAIRS, pair_ids  # noqa: E402

SIZE = 64
FR = "mobilefacenet-ms1m"
TARGET = DATA / "targets" / "target" / "005869.jpg"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("tiny-ddpm"))


@pytest.fixture(scope="module")
def pretrained(tiny_dir):
    return load_ddpm(tiny_dir)


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("faces")
    for pid in pair_ids(2):
        shutil.copy(PAIRS / "train" / f"{pid}.png", folder / f"{pid}.png")
    return folder


@pytest.fixture(scope="module")
def faces(faces_dir):
    return load_aligned_faces(faces_dir, SIZE)[0]


@pytest.fixture(scope="module")
def ensemble():
    return FREnsemble([FR])


@pytest.fixture(scope="module")
def target(ensemble, shared_data):
    rgb = load_image(TARGET).rgb
    return ensemble.embed(to_tensor(rgb), best_face_landmarks(rgb, create_detector()))


@pytest.fixture(scope="module")
def emotion():
    return ExpressionCrop(SIZE)


def flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


# ---------------------------------------------------------------------------------------------- the mechanisms


def test_projection_makes_conflicting_gradients_agree_and_leaves_agreeing_ones_alone():
    """PCGrad: conflicting gradients (⟨g1, g2⟩ < 0) come out with non-negative dot products (each orthogonal to the
    other's original), exactly as the closed form on a 2-D example spread over two "parameters"; agreeing ones are
    returned unchanged."""
    g1, g2 = [torch.tensor([1.0]), torch.tensor([0.0])], [torch.tensor([-1.0]), torch.tensor([1.0])]
    p1, p2, dot = project_conflicting(g1, g2)
    assert dot == -1.0
    assert torch.equal(flat(p1), torch.tensor([0.5, 0.5], dtype=torch.float64))  # g1 − (−1/2)·g2
    assert torch.equal(flat(p2), torch.tensor([0.0, 1.0], dtype=torch.float64))  # g2 − (−1/1)·g1

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
        b = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
        pa, pb, dot = project_conflicting(a, b)
        if dot < 0:
            assert float(flat(pa) @ flat(b)) == pytest.approx(0, abs=1e-5)
            assert float(flat(pb) @ flat(a)) == pytest.approx(0, abs=1e-5)
            assert float(flat(pa) @ flat(pb)) >= 0
        else:
            assert all(torch.equal(x, y) for x, y in zip(pa + pb, a + b))
    same = [torch.tensor([1.0, 2.0])]
    pa, pb, dot = project_conflicting(same, [torch.tensor([0.5, 0.1])])
    assert dot > 0 and torch.equal(pa[0], same[0]) and torch.equal(pb[0], torch.tensor([0.5, 0.1]))


def test_ema_update_is_the_closed_form():
    """EMA: ``ema ← d·ema + (1 − d)·θ``; with d = 0 it is θ itself."""
    ema, theta = [torch.tensor([1.0, -2.0])], [torch.tensor([3.0, 2.0])]
    ema_update(ema, theta, 0.75)
    assert torch.allclose(ema[0], torch.tensor([1.5, -1.0]))
    ema_update(ema, theta, 0.0)
    assert torch.equal(ema[0], theta[0])


def test_laplacian_energy_is_zero_on_a_constant_image_and_its_gradient_matches_finite_differences():
    """The Laplacian smoothness loss: 0 on a constant image, the hand value on an impulse (Δ = −4 at the impulse,
    1 at its 4 neighbours: (16 + 4)/25), and an analytic gradient equal to finite differences."""
    assert float(laplacian_energy(torch.full((2, 3, 8, 8), 0.37)).abs().max()) == 0.0
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1
    assert float(laplacian_energy(impulse)) == pytest.approx(20 / 25)
    x = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: laplacian_energy(t).sum(), (x,))
    noisy = torch.rand(1, 3, 16, 16)
    smooth = torch.nn.functional.avg_pool2d(noisy, 3, 1, 1)
    assert float(laplacian_energy(smooth)) < 0.2 * float(laplacian_energy(noisy))


def test_ddim_paths_and_schedule_are_diffam_s_and_diffusers():
    """DiffAM's inversion to t0 = 60 in 20 steps and 6 generative steps; ᾱ equal to diffusers' DDPMScheduler."""
    from diffusers import DDPMScheduler

    from faceshield.diffusion.ddpm import DDPM_SCHEDULER, build_random_ddpm

    assert ddim_path(60, 6) == [60, 48, 36, 24, 12, 0]
    inversion = ddim_path(60, 20)
    assert inversion[0] == 60 and inversion[-1] == 0 and len(inversion) == 20
    assert inversion == sorted(set(inversion), reverse=True)
    model = build_random_ddpm({"sample_size": 32, "block_out_channels": (8, 8), "norm_num_groups": 4,
                               "down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2})
    reference = DDPMScheduler(**DDPM_SCHEDULER).alphas_cumprod.double()
    assert torch.allclose(model.schedule.alphas_cumprod, reference, rtol=1e-6)
    assert model.schedule.alpha(None) == 1.0


def test_inversion_then_sampling_with_the_untuned_network_reconstructs_the_face(pretrained, faces):
    """DDIM inversion to t0 with the pretrained network, then sampling with the same (untuned) network, gives the
    face back (PSNR > 40 dB), while the inverted latent itself is clearly not the face (< 35 dB)."""
    x = to_diffusion(faces)
    latents = ddim_invert(pretrained, x, ddim_path(60, 20))
    with torch.no_grad():
        back = to_images(ddim_sample(pretrained, latents, ddim_path(60, 6)))

    def psnr(a, b):
        return -10 * math.log10(float((a - b).pow(2).mean()))

    assert psnr(back, faces) > 40, psnr(back, faces)
    assert psnr(to_images(latents), faces) < 35, psnr(to_images(latents), faces)


@pytest.fixture(scope="module")
def trainer(pretrained, faces, ensemble, target, emotion):
    config = MAPTrainConfig(pretrained="tiny", image_size=SIZE, batch_size=2, lr=1e-3, identity_weight=1.0,
                            expression_weight=0.7, laplacian_weight=30.0, score_weight=0.5, ema_decay=0.6,
                            surrogates=(FR,))
    return MAPTrainer(config, pretrained, faces, ensemble, target, emotion)


def test_one_step_s_gradient_is_the_projected_weighted_sum_of_the_four_losses(trainer, faces, target, emotion):
    """The whole objective of a fine-tuning step, rebuilt here from the losses' definitions with autograd:
    ``w_A·g_A' + w_E·g_E' + w_lap·∇L_lap + w_SM·∇L_SM`` with (g_A', g_E') the PCGrad projection of
    (∇L_A, ∇L_E), L_A = 1 − cos to the target on the real FR model, L_E = −log p_happy of the real emotion model,
    L_lap the mean squared Laplacian (its sign: penalised), L_SM the ε-MSE at the step's (t, ε). The two identity
    and expression gradients conflict here, so a missing or reversed projection, a dropped or negated term or
    a wrong expression class all change the result."""
    cfg = trainer.config
    indices, timesteps, noise = trainer.batch(0)
    got, values = trainer.gradients(indices, timesteps, noise)
    assert values["dot"] < 0  # the projection is exercised

    params, model = trainer.params, trainer.model
    generated = to_images(ddim_sample(model, trainer.latents[indices], ddim_path(60, 6)))
    embedding = trainer.ensemble(generated, face_template(SIZE).expand(len(indices), 5, 2))[FR]
    l_a = (1 - embedding @ target[FR][0]).mean()
    l_e = -emotion(generated)[:, EMOTION_LABELS.index("happy")].log().mean()
    d2y = generated[..., 2:, 1:-1] + generated[..., :-2, 1:-1] - 2 * generated[..., 1:-1, 1:-1]
    d2x = generated[..., 1:-1, 2:] + generated[..., 1:-1, :-2] - 2 * generated[..., 1:-1, 1:-1]
    interior = (d2x + d2y).pow(2).sum(dim=(1, 2, 3))
    # border pixels (replicate padding): recompute on the padded image for the full mean
    padded = torch.nn.functional.pad(generated, (1, 1, 1, 1), mode="replicate")
    full = (padded[..., 2:, 1:-1] + padded[..., :-2, 1:-1] + padded[..., 1:-1, 2:] + padded[..., 1:-1, :-2]
            - 4 * padded[..., 1:-1, 1:-1]).pow(2)
    assert torch.allclose(full[..., 1:-1, 1:-1].sum(dim=(1, 2, 3)), interior, rtol=1e-4)
    l_lap = full.mean()
    clean = to_diffusion(faces)[indices]
    alphas = torch.tensor([model.schedule.alpha(int(t)) for t in timesteps], dtype=torch.float32).view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * clean + (1 - alphas).sqrt() * noise
    l_sm = torch.stack([(model.predict_noise(noisy[i:i + 1], int(t)) - noise[i:i + 1]).pow(2).mean()
                        for i, t in enumerate(timesteps)]).mean()
    assert values["identity"] == pytest.approx(float(l_a.detach()), rel=1e-4)
    assert values["expression"] == pytest.approx(float(l_e.detach()), rel=1e-4)

    def grad(loss, retain=True):
        return flat([torch.zeros_like(p) if g is None else g
                     for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=retain,
                                                                 allow_unused=True))])

    g_a, g_e, g_l = grad(l_a), grad(l_e), grad(l_lap, retain=False)
    g_s = grad(l_sm, retain=False)
    dot = g_a @ g_e
    assert dot < 0
    g_a2, g_e2 = g_a - dot / (g_e @ g_e) * g_e, g_e - dot / (g_a @ g_a) * g_a
    expected = (cfg.identity_weight * g_a2 + cfg.expression_weight * g_e2 + cfg.laplacian_weight * g_l
                + cfg.score_weight * g_s)
    got = flat(got)
    assert float((got - expected).norm() / expected.norm()) < 1e-5  # observed 7e-8
    # each term weighs: without it the gradient is far off
    for term in (cfg.laplacian_weight * g_l, cfg.score_weight * g_s, g_a - g_a2):
        assert float(term.norm()) > 1e-3 * float(expected.norm())


def test_gradient_checkpointing_gives_the_same_gradient(pretrained, faces, ensemble, target, emotion, trainer):
    """Recomputing the UNet's activations in the backward pass (less memory) changes no gradient."""
    config = dataclasses.replace(trainer.config, gradient_checkpointing=True)
    other = MAPTrainer(config, pretrained, faces, ensemble, target, emotion)
    assert other.model.unet.is_gradient_checkpointing
    batch = trainer.batch(0)
    assert torch.allclose(flat(other.gradients(*batch)[0]), flat(trainer.gradients(*batch)[0]), rtol=1e-4,
                          atol=1e-7)


def test_a_step_updates_the_ema_with_its_decay(trainer):
    """The EMA after one step is ``d·θ_before + (1 − d)·θ_after`` (d = 0.6 here), not the raw weights."""
    before = [p.detach().clone() for p in trainer.params]
    ema_before = [e.detach().clone() for e in trainer.ema]
    assert all(torch.equal(a, b) for a, b in zip(before, ema_before))  # the EMA starts at the pretrained weights
    trainer.step()
    d = trainer.config.ema_decay
    after = [p.detach() for p in trainer.params]
    expected = flat([d * b + (1 - d) * a for b, a in zip(before, after)])
    assert torch.allclose(flat(trainer.ema), expected, atol=1e-7)
    assert float((flat(trainer.ema) - flat(after)).norm()) > 0.1 * float((flat(after) - flat(before)).norm())


# ------------------------------------------------------------------------------------------ training, end to end


@pytest.fixture(scope="module")
def trained(tiny_dir, faces_dir, tmp_path_factory, shared_data):
    """`faceshield map train` on 2 real faces at 64 px, interrupted after 3 steps and resumed to 6."""
    from click.testing import CliRunner

    from faceshield.cli.main import cli

    out = tmp_path_factory.mktemp("nets") / "happy-005869"
    args = ["map", "train", "--faces", str(faces_dir), "--target", str(TARGET), "--expression", "happy", "-o",
            str(out), "--pretrained", str(tiny_dir), "--surrogates", FR, "--set", f"image_size={SIZE}",
            "--set", "epochs=6", "--set", "batch_size=2", "--set", "lr=1e-3", "--set", "ema_decay=0", "--quiet"]
    first = CliRunner().invoke(cli, args + ["--max-steps", "3"])
    assert first.exit_code == 0 and "stopped at step 3 of 6" in first.output, first.output
    assert (out / "checkpoint.pt").is_file() and not (out / "map.json").exists()
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0 and "saved" in second.output, second.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already holds" in again.output
    return out


def test_training_saves_a_loadable_network_and_its_settings(trained, tiny_dir, target):
    settings = json.loads((trained / "map.json").read_text())
    assert settings["step"] == settings["total_steps"] == 6 and len(settings["history"]["identity"]) == 6
    assert settings["goal"] == "impersonation" and settings["expression"] == "happy"
    assert settings["surrogates"] == [FR] and torch.allclose(
        torch.tensor(settings["target"]["embeddings"][FR]), target[FR][0], atol=1e-5)
    assert not (trained / "checkpoint.pt").exists()
    tuned, base = load_ddpm(trained), load_ddpm(tiny_dir)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters()))


def test_fine_tuning_lowers_the_identity_and_expression_losses_of_protected_faces(trained, pretrained, faces,
                                                                                   ensemble, target, emotion):
    """L_A and L_E, measured here with the real FR and emotion models on the protected faces (inverted with the
    pretrained network, sampled with the saved fine-tuned one): both fall well below the untuned network's."""
    tuned = load_ddpm(trained)

    def measure(model: PixelDiffusion):
        with torch.no_grad():
            latents = ddim_invert(pretrained, to_diffusion(faces), ddim_path(60, 20))
            out = to_images(ddim_sample(model, latents, ddim_path(60, 6)))
            cos = ensemble(out, face_template(SIZE).expand(len(out), 5, 2))[FR] @ target[FR][0]
            p_happy = emotion(out)[:, EMOTION_LABELS.index("happy")]
        return 1 - cos, -p_happy.log()

    a0, e0 = measure(pretrained)
    a1, e1 = measure(tuned)
    # observed: L_A 0.96 → 0.63-0.69, L_E 2.9/1.4 → 0.01 per face
    assert float(a1.max()) < float(a0.min()) - 0.15, (a0, a1)
    assert float(e1.max()) < 0.5 * float(e0.min()), (e0, e1)


# ------------------------------------------------------------------------------------------------- protection


def test_protect_pastes_the_sampled_face_through_its_mask_and_nothing_outside(trained, shared_data):
    """Align, invert, sample with the fine-tuned network, paste back: outside the feathered face mask the photo is
    exactly unchanged; inside it is exactly the protected crop warped back, blended by that mask."""
    from faceshield.methods.base import create_method

    rgb = load_image(PAIRS / "test" / f"{pair_ids(3)[2]}.png").rgb
    image, landmarks = to_tensor(rgb), best_face_landmarks(rgb, create_detector())
    method = create_method("map", model=str(trained), surrogates=(FR,))
    captured = []
    protect_faces = method.protect_faces
    method.protect_faces = lambda crops, *a: captured.append(out := protect_faces(crops, *a)) or out
    result = method.protect(image, landmarks)
    (crop, _), = captured
    out = result.image
    mask = face_mask_from_landmarks(landmarks, tuple(image.shape[-2:]), scale=method.config.mask_scale, softness=0.25)
    matrix = crop_transform(landmarks, face_template(SIZE))
    warped = warp_back(crop, matrix, tuple(image.shape[-2:]))
    coverage = warp_back(torch.ones_like(crop[:, :1]), matrix, tuple(image.shape[-2:]))
    assert (out - (image * (1 - mask * coverage) + mask * warped)).abs().max() < 1e-5
    outside = (mask == 0).expand_as(image)
    assert outside.float().mean() > 0.3 and torch.equal(out[outside], image[outside])
    inside = (mask == 1).expand_as(image)
    assert (out - image)[inside].abs().mean() > 0.01
    assert method.expression == "happy"


def _fake_network(folder, goal, surrogates, embedding=None):
    folder.mkdir(parents=True)
    target = None if embedding is None else {"embeddings": {FR: embedding.tolist()}}
    (folder / "map.json").write_text(json.dumps({
        "finished": True, "goal": goal, "surrogates": surrogates, "target": target, "expression": "happy",
        "pretrained": "x", "training": {"image_size": SIZE}}))
    return folder


def test_a_folder_of_networks_gives_the_one_for_the_target_and_keeps_the_judge_black_box(tmp_path, target):
    """In a folder of networks: impersonation picks the network trained for the requested target; dodging a
    dodging network; a network trained with a model outside this run's surrogates (the held-out judge) is not used."""
    random = torch.randn(target[FR].shape[1], generator=torch.Generator().manual_seed(1))
    other = torch.nn.functional.normalize(random, dim=0)
    right = _fake_network(tmp_path / "a", "impersonation", [FR], target[FR][0])
    _fake_network(tmp_path / "b", "impersonation", [FR], other)
    white = _fake_network(tmp_path / "c", "dodging", [FR, "faceres"])
    dodge = _fake_network(tmp_path / "d", "dodging", [FR])
    method = MAP(MAPConfig(model=str(tmp_path), surrogates=(FR,)))
    assert method.select(target)[0] == right
    assert method.select({FR: other[None]})[0] == tmp_path / "b"
    assert method.select(None)[0] == dodge
    assert white not in [n[0] for n in method.networks if set(n[1]["surrogates"]) <= {FR}]


def test_missing_model_or_weights_give_one_clear_line(tmp_path, tiny_dir, shared_data):
    from click.testing import CliRunner

    from faceshield.cli.main import cli

    with pytest.raises(SettingError, match="set model=MODEL_DIR"):
        MAP(MAPConfig())
    with pytest.raises(FaceshieldError, match="no network trained by `faceshield map train`"):
        MAP(MAPConfig(model=str(tmp_path / "nothing")))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DiffusionModelError) as error:
        load_ddpm(broken)
    assert "\n" not in str(error.value) and "cannot load the unet of DDPM" in str(error.value)
    with pytest.raises(DiffusionModelError, match="does not exist"):
        load_ddpm(tmp_path / "absent")
    photo = PAIRS / "train" / f"{pair_ids(1)[0]}.png"
    result = CliRunner().invoke(cli, ["protect", str(photo), "-o", str(tmp_path / "out"), "--method", "map",
                                      "--set", f"model={tmp_path / 'nothing'}"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    result = CliRunner().invoke(cli, ["map", "train", "--faces", str(tmp_path), "-o", str(tmp_path / "n"),
                                      "--pretrained", str(broken), "--set", "image_size=64"])
    assert result.exit_code == 1 and "no photo with a face" in result.output, result.output


def test_cli_protects_a_batch_and_evaluate_reports_the_expression_success(trained, tmp_path, shared_data):
    """`faceshield protect --method map --set model=DIR --batch 2` runs both photos' faces in one batch; the evaluation
    protocol runs map and reports the expression success rate (emotion top-1 = the network's expression)."""
    from click.testing import CliRunner

    from faceshield.cli.main import cli
    from faceshield.eval.protocol import EvalConfig, evaluate

    folder = tmp_path / "in"
    folder.mkdir()
    for pid in pair_ids(4)[2:]:
        shutil.copy(PAIRS / "test" / f"{pid}.png", folder / f"{pid}.png")
    batches = []
    original = MAP.protect_faces

    def counting(self, crops, *args):
        batches.append(len(crops))
        return original(self, crops, *args)

    MAP.protect_faces = counting
    try:
        result = CliRunner().invoke(cli, ["protect", str(folder), "-o", str(tmp_path / "out"), "--method", "map",
                                          "--set", f"model={trained}", "--surrogates", FR, "--batch", "2", "--json"])
    finally:
        MAP.protect_faces = original
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)["photos"]
    assert [r["status"] in ("protected", "weak") for r in records] == [True, True] and batches == [2]
    assert records[0]["parameters"]["model"] == str(trained)

    report = evaluate(EvalConfig(methods=("map",), pairs_dir=PAIRS, targets_dir=None, n_pairs=1, n_per_target=0,
                                 judges=(FR, "dlib-resnet"), surrogates=(FR, "dlib-resnet"), robustness=False,
                                 independent=False, settings={"model": str(trained)}), progress=False)
    quality = report["methods"]["map"]["quality"]
    assert quality["expression_success"] in (0.0, 0.5, 1.0) and quality["psnr"] > 15


# ------------------------------------------------------------------ evaluation: the 4 standard targets, end to end

JUDGES = (FR, "mobilefacenet")  # the held-out judges, in turn
NET_FR = "faceplugin-mobilefacenet"  # the target networks' only surrogate: a model no judge is, so black-box for both


@pytest.fixture(scope="module")
def target_networks(tiny_dir, tmp_path_factory, shared_data):
    """One network per standard target (``targets/target/*.jpg``), trained with `train_map` on 2 celebahq-pairs faces
    far beyond the evaluated ids, and a dodging network trained with the judge ``FR`` among its surrogates (white-box
    for that judge), all in one folder. One step each (batch 2, 4 inversion / 2 generative steps): plumbing only."""
    from faceshield.eval.calibration import pair_ids as protocol_ids
    from faceshield.methods.map import train_map

    root = tmp_path_factory.mktemp("target-nets")
    faces = root / "faces"
    faces.mkdir()
    for pid in protocol_ids(PAIRS)[-2:]:  # the protocol evaluates the first ids
        shutil.copy(PAIRS / "train" / f"{pid}.png", faces / f"{pid}.png")
    config = MAPTrainConfig(pretrained=str(tiny_dir), image_size=SIZE, inversion_steps=4, generative_steps=2,
                            epochs=1, batch_size=2, lr=1e-3, ema_decay=0, surrogates=(NET_FR,))
    nets = root / "nets"
    for photo in sorted((DATA / "targets" / "target").glob("*.jpg")):
        train_map(config, faces, photo, nets / f"happy-{photo.stem}")
    whitebox = dataclasses.replace(config, surrogates=(FR, NET_FR))
    train_map(whitebox, faces, None, nets / f"dodging-{FR}")
    return nets, faces


def test_evaluate_impersonates_the_four_standard_targets_each_with_its_own_black_box_network(
        target_networks, monkeypatch, shared_data):
    """The standard protocol on ``model=`` a folder of networks, end to end, with both judges held out in turn and the
    independent pipeline on: the impersonation tables (zoo and independent) hold the 4 standard targets for each
    judge; each impersonation was sampled with the network trained for the requested target; the network trained
    with a judge among its surrogates never protects for that judge (and does for the other); the expression
    success rate is reported; no evaluated face was in any network's training set. The networks are trained one
    step each: this is about the plumbing, not the protection rate."""
    from faceshield.eval.calibration import pair_ids as protocol_ids
    from faceshield.eval.protocol import EvalConfig, evaluate
    from faceshield.fileio import sha256_file

    nets, faces = target_networks
    names = [f"target/{p.name}" for p in sorted((DATA / "targets" / "target").glob("*.jpg"))]
    detector, net_fr = create_detector(), FREnsemble([NET_FR])
    own = {}  # each target photo's embedding, computed here: which target each protection asked for
    for name in names:
        rgb = load_image(DATA / "targets" / name).rgb
        own[name] = net_fr.embed(to_tensor(rgb), best_face_landmarks(rgb, detector))[NET_FR][0]

    calls = []
    protect_many, protect_faces = MAP.protect_many, MAP.protect_faces

    def spy_many(self, photos, target=None, progress=None):
        held_out = set(JUDGES) - set(self.ensemble.names)
        assert len(held_out) == 1, f"not leave-one-out: surrogates {self.ensemble.names}"
        judge, = held_out
        asked = None if target is None else max(own, key=lambda n: float(own[n] @ target[NET_FR][0]))
        calls.append({"judge": judge, "target": asked, "photos": [p[0].clone() for p in photos]})
        if asked is not None:
            assert float(own[asked] @ target[NET_FR][0]) > 0.99
        return protect_many(self, photos, target, progress)

    def spy_faces(self, crops, folder, settings):
        calls[-1]["network"] = json.loads((folder / "map.json").read_text())
        calls[-1]["folder"] = folder
        return protect_faces(self, crops, folder, settings)

    monkeypatch.setattr(MAP, "protect_many", spy_many)
    monkeypatch.setattr(MAP, "protect_faces", spy_faces)
    config = EvalConfig(methods=("map",), pairs_dir=PAIRS, targets_dir=DATA / "targets", n_pairs=1, n_per_target=1,
                        judges=JUDGES, surrogates=(*JUDGES, NET_FR), settings={"model": str(nets)})
    report = evaluate(config, progress=False)

    assert report["targets"] == names and report["n_impersonation_per_target"] == 1
    result = report["methods"]["map"]
    for judge in JUDGES:
        entry = result["judges"][judge]
        assert list(entry["impersonation"]) == names, (judge, entry)
        assert list(entry["independent_impersonation"]) == names
        for name in names:  # one source per target: each rate is 0 or 1, at every FAR, in both pipelines
            independent = entry["independent_impersonation"][name]
            assert independent["judged"] == 1
            for rates in (entry["impersonation"][name], independent["impersonation"]):
                assert set(rates) == set(report["thresholds"][judge]) and set(rates.values()) <= {0.0, 1.0}
        asked = [c for c in calls if c["judge"] == judge and c["target"] is not None]
        assert sorted(c["target"] for c in asked) == names  # each target once per judge
        for call in asked:  # sampled with the network trained for the requested target
            assert f"target/{call['network']['target']['photo']}" == call["target"], call["folder"]
    assert len(calls) == 2 * (1 + len(names))
    for call in calls:  # never the white-box network for the judge it was trained with
        assert call["judge"] not in call["network"]["surrogates"], (call["judge"], call["folder"])
    other = next(c for c in calls if c["judge"] == JUDGES[1] and c["target"] is None)
    assert other["folder"].name == f"dodging-{FR}"  # black-box for the other judge: used there

    assert 0 <= result["quality"]["expression_success"] <= 1

    evaluated = protocol_ids(PAIRS)[:1]
    photo = to_tensor(load_image(PAIRS / "train" / f"{evaluated[0]}.png").rgb)
    assert all(torch.equal(p, photo) for c in calls for p in c["photos"])  # what the protocol protected
    seen = {sha256_file(PAIRS / part / f"{pid}.png") for pid in evaluated for part in ("train", "test")}
    trained_on = {c["folder"]: c["network"]["faces"] for c in calls}
    assert len(trained_on) == 1 + len(names)
    for folder, files in trained_on.items():
        assert files and not {f.rsplit(".", 1)[0] for f in files} & set(evaluated), folder
        assert not {sha256_file(faces / f) for f in files} & seen, folder
