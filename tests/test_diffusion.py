"""The diffusion core on a tiny Stable Diffusion (random weights, SD's layout and schedule), saved with
``save_pretrained`` and loaded back through the users' loading code.

With random weights nothing here can be judged by how a face looks, so each mechanism the papers rely on (DDIM
inversion and sampling, learned unconditional embeddings, recorded self-attention) is checked against diffusers'
reference schedulers or a closed form, and must fail when the mechanism is removed or reversed
(docs/mechanisms.md). Diffusion methods added later follow the same rule."""

import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from faceshield.diffusion.loading import load_stable_diffusion  # noqa: E402
from faceshield.diffusion.testing import SD_SCHEDULER, save_tiny_stable_diffusion  # noqa: E402
from faceshield.errors import DiffusionModelError  # noqa: E402
from faceshield.diffusion.inversion import ddim_invert, denoise, learn_unconditional_embeddings  # noqa: E402
from faceshield.diffusion.schedule import NoiseSchedule  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    return load_stable_diffusion(tiny_sd_dir)


def face_latents(sd, face_rgb):
    x = torch.from_numpy(face_rgb).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return sd.encode_images(x)


def test_tiny_model_is_a_diffusers_folder_loaded_by_the_users_code(tiny_sd_dir, tiny_sd):
    assert {p.name for p in tiny_sd_dir.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder",
                                                        "tokenizer", "scheduler"}
    assert tiny_sd.dtype == torch.float32 and tiny_sd.vae_factor == 8
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())
    # SD's DDIM timesteps: "leading" spacing with steps_offset 1
    assert tiny_sd.timesteps(20) == list(range(951, 0, -50))
    assert tiny_sd.encode_prompts(["a face", ""]).shape == (2, 77, 32)


def test_noise_schedule_and_ddim_step_match_diffusers():
    from diffusers import DDIMScheduler

    for prediction in ("epsilon", "v_prediction"):
        config = {**SD_SCHEDULER, "prediction_type": prediction}
        ours = NoiseSchedule.from_scheduler_config(config)
        reference = DDIMScheduler(**config)
        assert (ours.alphas_cumprod.float() - reference.alphas_cumprod).abs().max() < 1e-6
        reference.set_timesteps(20)
        timesteps = [int(t) for t in reference.timesteps]
        g = torch.Generator().manual_seed(0)
        for i, t in enumerate(timesteps):
            sample, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
            expected = reference.step(output, t, sample, eta=0.0).prev_sample
            following = timesteps[i + 1] if i + 1 < len(timesteps) else None
            got = NoiseSchedule.ddim_move(sample, ours.to_epsilon(output, sample, t), ours.alpha(t),
                                          ours.alpha(following))
            assert (got - expected).abs().max() < 1e-5, (prediction, t)


def test_generation_matches_the_stock_diffusers_pipeline(tiny_sd_dir, tiny_sd):
    """Text-to-image DDIM with classifier-free guidance (the attack harness, APL, Diff-Privacy) gives the stock
    ``StableDiffusionPipeline``'s images for the same seed; guidance is a mechanism (scale 1 vs 7.5 differ, and
    a swapped conditional/unconditional pair is far from the reference)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from faceshield.diffusion.generation import generate

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a face", "a dog"]
    for guidance in (1.0, 7.5):
        reference = pipe(prompts, num_inference_steps=4, guidance_scale=guidance, height=64, width=64,
                         generator=torch.Generator().manual_seed(3), output_type="pt").images
        ours = generate(tiny_sd, prompts, steps=4, guidance=guidance, seed=3, height=64, width=64)
        assert ours.shape == (2, 3, 64, 64)
        assert (ours - reference).abs().max() < 1e-4, guidance
    swapped = generate(tiny_sd, embeddings=tiny_sd.encode_prompts([""]), negative="a photo of a face", steps=4,
                       guidance=7.5, seed=3, height=64, width=64)
    assert (swapped - reference[:1]).abs().max() > 1e-2


def test_ddim_move_runs_both_ways():
    sample, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    there = NoiseSchedule.ddim_move(sample, eps, 0.9, 0.3)
    assert torch.allclose(NoiseSchedule.ddim_move(there, eps, 0.3, 0.9), sample, atol=1e-5)


def test_ddim_inversion_and_sampling_match_diffusers_schedulers(tiny_sd, face_rgb):
    """Mechanism: DDIM inversion (adv-latent's step 2) runs toward more noise exactly as diffusers'
    ``DDIMInverseScheduler`` (the UNet evaluated at each step's noisier timestep), and sampling back runs as
    ``DDIMScheduler``; on the tiny UNet, whose output depends on the latent and the timestep, a swapped noise level
    or timestep changes every number."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    clean = face_latents(tiny_sd, face_rgb)
    empty = tiny_sd.encode_prompts([""])
    path = tiny_sd.timesteps(20)[17:]
    inverse = DDIMInverseScheduler(**SD_SCHEDULER)
    inverse.set_timesteps(20)
    assert [int(t) for t in inverse.timesteps[:3]] == path[::-1] == [1, 51, 101]
    expected = [clean]
    with torch.no_grad():
        for t in path[::-1]:
            expected.append(inverse.step(tiny_sd.predict_noise(expected[-1], t, empty), t, expected[-1]).prev_sample)
    trajectory = ddim_invert(tiny_sd, clean, empty, path)
    assert len(trajectory) == len(path) + 1 and torch.equal(trajectory[-1], clean)
    scale = float(clean.abs().max())
    for ours, reference in zip(trajectory, expected[::-1]):
        assert (ours - reference).abs().max() < 1e-5 * scale
    # the start of the protected trajectory is the image noised to timestep 101, not the clean latent
    assert (trajectory[0] - clean).pow(2).mean() > 1e-3 * clean.pow(2).mean()

    sampler = DDIMScheduler(**SD_SCHEDULER)
    sampler.set_timesteps(20)
    z = trajectory[0]
    with torch.no_grad():
        for t in path:
            z = sampler.step(tiny_sd.predict_noise(z, t, empty), t, z, eta=0.0).prev_sample
        sampled = denoise(tiny_sd, trajectory[0], path, empty)
    assert (sampled - z).abs().max() < 1e-5 * scale


def test_learned_unconditional_embeddings_reconstruct_better_than_plain_inversion(tiny_sd, face_rgb):
    """Mechanism: null-text inversion (adv-latent's learned unconditional embeddings): one embedding per step,
    fitted so that sampling retraces the inversion; replaying them reproduces their reconstruction."""
    clean = face_latents(tiny_sd, face_rgb)
    path = tiny_sd.timesteps(20)[17:]
    empty = tiny_sd.encode_prompts([""])
    trajectory = ddim_invert(tiny_sd, clean, empty, path)
    assert len(trajectory) == len(path) + 1 and torch.equal(trajectory[-1], clean)
    with torch.no_grad():
        plain = denoise(tiny_sd, trajectory[0], path, empty)
    learned = learn_unconditional_embeddings(tiny_sd, trajectory, path, empty, steps=20, lr=0.1)
    error_plain = (plain - clean).pow(2).mean()
    error_learned = (learned.reconstruction - clean).pow(2).mean()
    assert len(learned.embeddings) == len(path)
    assert error_learned < 0.8 * error_plain, (float(error_learned), float(error_plain))
    # replaying the learned embeddings gives that reconstruction again (they are the key to it)
    with torch.no_grad():
        replay = denoise(tiny_sd, trajectory[0], path, learned.embeddings)
    assert torch.allclose(replay, learned.reconstruction, atol=1e-5)


def test_recording_processor_computes_the_same_attention_and_records_every_layer(tiny_sd):
    z, emb = torch.randn(2, 4, 32, 32), tiny_sd.encode_prompts(["", "a face"])
    before = {k: type(v) for k, v in tiny_sd.unet.attn_processors.items()}
    with torch.no_grad():
        expected = tiny_sd.predict_noise(z, 501, emb)
        with tiny_sd.record_self_attention() as recorder:
            got = tiny_sd.predict_noise(z, 501, emb)
            maps = recorder.take()
    assert (got - expected).abs().max() < 1e-5
    assert len(maps) == len(tiny_sd.self_attention_layers()) == len(recorder.layers)
    assert maps[0].shape == (2, 2, 1024, 1024)  # batch × heads × queries × keys at 32×32 latents
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)
    assert {k: type(v) for k, v in tiny_sd.unet.attn_processors.items()} == before  # restored


def test_structure_loss_is_nonzero_and_its_gradient_matches_finite_differences(tiny_sd_dir):
    sd = load_stable_diffusion(tiny_sd_dir, dtype=torch.float64)
    path = sd.timesteps(20)[17:]
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, 32, 32, generator=g, dtype=torch.float64)
    emb = sd.encode_prompts([""])
    with sd.record_self_attention(("up_blocks",)) as recorder:
        with torch.no_grad():
            denoise(sd, z0, path, emb)
        original = recorder.take()

        def structure(z):
            denoise(sd, z, path, emb)
            return sum((m - o).pow(2).mean() for m, o in zip(recorder.take(), original))

        z = (z0 + 0.5 * torch.randn(z0.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
        loss = structure(z)
        (grad,) = torch.autograd.grad(loss, z)
        direction = torch.randn(z0.shape, generator=g, dtype=torch.float64)
        h = 1e-4
        with torch.no_grad():
            numeric = (structure(z + h * direction) - structure(z - h * direction)) / (2 * h)
    assert loss > 0
    assert torch.isclose((grad * direction).sum(), numeric, rtol=1e-3)


def test_a_run_that_records_no_attention_map_fails_loudly(tiny_sd):
    with tiny_sd.record_self_attention(max_tokens=0) as recorder:  # every layer is larger: nothing recorded
        with torch.no_grad():
            tiny_sd.predict_noise(torch.randn(1, 4, 32, 32), 1, tiny_sd.encode_prompts([""]))
        with pytest.raises(DiffusionModelError, match="silently be 0"):
            recorder.take()
    with pytest.raises(DiffusionModelError, match="no self-attention layer matches"):
        with tiny_sd.record_self_attention(("no_such_block",)):
            pass


def test_missing_weights_give_one_clear_error(tmp_path, tiny_sd_dir, monkeypatch):
    with pytest.raises(DiffusionModelError, match="does not exist.*--diffusion-model"):
        load_stable_diffusion(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd_dir, partial, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(DiffusionModelError, match="missing unet"):
        load_stable_diffusion(partial)
    monkeypatch.setenv("FACESHIELD_OFFLINE", "1")
    with pytest.raises(DiffusionModelError, match="not in the Hugging Face cache.*--diffusion-model"):
        load_stable_diffusion("faceshield-tests/no-such-model")
