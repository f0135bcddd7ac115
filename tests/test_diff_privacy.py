"""Diff-Privacy: the MSI, energy guidance, background keeping, conditioning switches, the key, recovery, commands.

Tiny Stable Diffusion and tiny CLIP vision models are built from configs, saved and loaded back through the users'
loading code. The FR claims use a real zoo model on a real face: for those, the tiny SD's random VAE (whose decoded
x̂0 is not a face) is swapped for :class:`PixelVAE`, a test double whose latent is the face itself (4× average
pooled), so that "FR similarity to the original" means something. Each test's docstring names the mechanism whose
removal or reversal makes it fail (docs/mechanisms.md).
"""

import dataclasses
import json
import types

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

pytest.importorskip("diffusers")

from faceshield.cli.main import cli  # noqa: E402
from faceshield.diffusion import image_conditioning as ic  # noqa: E402
from faceshield.diffusion.loading import load_stable_diffusion  # noqa: E402
from faceshield.diffusion.testing import save_tiny_clip_vision, save_tiny_stable_diffusion  # noqa: E402
from faceshield.errors import DiffusionModelError, ShapeError  # noqa: E402
from faceshield.eval.quality import psnr  # noqa: E402
from faceshield.faces.detect import create_detector, detect_faces, landmark_tensor  # noqa: E402
from faceshield.images import load_image, save_image, to_tensor  # noqa: E402
from faceshield.methods import diff_privacy as dp_module  # noqa: E402
from faceshield.methods.diff_privacy import DiffPrivacy, DiffPrivacyConfig  # noqa: E402
from faceshield.methods.recovery_key import KeyFileError, RecoveryKey, decrypt_key, encrypt_key  # noqa: E402
from faceshield.models.ensemble import FREnsemble  # noqa: E402

from conftest import PAIRS, pair_ids  # noqa: E402

FR = "mobilefacenet-ms1m"


class PixelVAE(torch.nn.Module):
    """Test double of the VAE: latent = the image 4× average-pooled (+ its grey as 4th channel); decode = bilinear ×4."""

    config = types.SimpleNamespace(scaling_factor=1.0, block_out_channels=(1, 1, 1))

    def encode(self, x):
        x = F.avg_pool2d(x, 4)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=torch.cat([x, x.mean(1, True)], 1)))

    def decode(self, z):
        return types.SimpleNamespace(sample=F.interpolate(z[:, :3], scale_factor=4, mode="bilinear"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-models")
    return str(save_tiny_stable_diffusion(root / "sd")), str(save_tiny_clip_vision(root / "clip"))


@pytest.fixture(scope="module")
def clip(dirs):
    return ic.load_clip_vision(dirs[1])


@pytest.fixture(scope="module")
def ensemble():
    return FREnsemble([FR])


@pytest.fixture(scope="module")
def photo(face_rgb):
    return to_tensor(face_rgb), landmark_tensor(detect_faces(face_rgb, create_detector())).float()


@pytest.fixture(scope="module")
def pixel_dp(dirs, clip, ensemble, photo):
    """Diff-Privacy on the tiny UNet/text encoder with the pixel VAE, 128² crops, and its prepared face."""
    sd = load_stable_diffusion(dirs[0])
    sd.vae = PixelVAE()
    config = DiffPrivacyConfig(diffusion_model=dirs[0], image_size=128, msi_steps=5, variants=2, anonymize_steps=10,
                               hide_steps=10, inversion_iterations=6, fr_models=(FR,))
    dp = DiffPrivacy(config, sd, clip, ensemble)
    crops, _ = dp.crops_of(*photo)
    return dp, dp.prepare_faces(crops)


def cosine_to(dp, faces, reference_faces):
    e, r = dp._identity(faces)[FR], dp._identity(reference_faces)[FR]
    return (e * r[:1]).sum(-1)


# ------------------------------------------------------------------------------------------------- MSI


def test_msi_feeds_clips_own_preprocessing_of_the_real_pixels_and_its_loss_falls(dirs, clip, face_rgb):
    """Mechanisms: CLIP sees the face's real pixels through CLIP's preprocessing (the public code's uint8 cast made
    the input black: this fails then), and per-image ε-MSE training of the MSI lowers its loss on fixed draws."""
    sd = load_stable_diffusion(dirs[0])
    face = F.interpolate(to_tensor(face_rgb), size=64, mode="area")
    seen = []
    handle = clip.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["pixel_values"].clone()),
                                                  with_kwargs=True)
    try:
        features = ic.clip_features(clip, face)
    finally:
        handle.remove()
    expected = ic.clip_pixels(face, clip.image_size)
    assert seen[0].shape == (1, 3, 32, 32) and torch.allclose(seen[0], expected)
    assert float(seen[0].std()) > 0.5  # a black picture normalises to a constant
    black = F.interpolate(torch.zeros(1, 3, 64, 64) + 1e-6 * torch.rand(1, 3, 64, 64), size=64)
    with pytest.raises(ShapeError, match="blank"):
        ic.clip_pixels(black, 32)
    with pytest.raises(ShapeError, match=r"\[0, 1\]"):
        ic.clip_pixels(face * 2 - 1, 32)
    # the taps: 5 mean-pooled hidden states
    with torch.no_grad():
        hidden = clip.model(pixel_values=expected, output_hidden_states=True).hidden_states
    assert torch.allclose(features[0, 2], hidden[11].mean(1)[0]) and torch.allclose(features[0, 4], hidden[16].mean(1)[0])

    torch.manual_seed(0)
    msi = ic.MultiScaleInversion(clip.hidden_size, 32)
    prompt = ic.TokenPrompt(sd)
    latents = sd.encode_images(face)
    g = torch.Generator().manual_seed(1)
    draws = [(t, torch.randn(latents.shape, generator=g)) for t in (50, 250, 450, 650, 850)]

    def fixed_loss():
        msi.eval()
        with torch.no_grad():
            total = 0.0
            for t, noise in draws:
                a = sd.schedule.alpha(t)
                token = msi(features, ic.bucket_of(t))
                eps = sd.predict_noise(a**0.5 * latents + (1 - a) ** 0.5 * noise, t, prompt.encode(token))
                total += float(F.mse_loss(eps, noise))
        return total / len(draws)

    before = fixed_loss()
    result = ic.train_msi(sd, clip, face, steps=60, lr=3e-3, msi=msi)
    after = fixed_loss()
    assert result.tokens.shape == (10, 32) and len(result.loss) == 60
    assert after < before - 0.02, (before, after)


def test_bucket_b_uses_tap_and_projector_b_over_2_and_the_token_replaces_the_placeholder(dirs, clip):
    """Mechanisms: bucket ⌊t·10/1000⌋ → tap/projector b//2 (changing tap k changes only buckets 2k, 2k+1), the
    per-bucket scale, and the one token in the prompt (only the placeholder's position changes the text encoder's
    input)."""
    assert [ic.bucket_of(t) for t in (0, 99, 100, 399, 401, 999)] == [0, 0, 1, 3, 4, 9]
    msi = ic.MultiScaleInversion(clip.hidden_size, 32).eval()
    features = torch.randn(1, 5, clip.hidden_size)
    with torch.no_grad():
        base = msi(features.expand(10, -1, -1), torch.arange(10))
        for k in range(5):
            changed = features.clone()
            changed[0, k] += 1.0
            moved = (msi(changed.expand(10, -1, -1), torch.arange(10)) - base).abs().amax(1) > 1e-6
            assert moved.nonzero().flatten().tolist() == [2 * k, 2 * k + 1]
        # same tap, different bucket scale → different tokens
        assert not torch.allclose(base[0], base[1])
    sd = load_stable_diffusion(dirs[0])
    prompt = ic.TokenPrompt(sd)
    a, b = torch.randn(1, 32), torch.randn(1, 32)
    ea, eb = prompt.encode(a), prompt.encode(b)
    assert prompt.position == 1 and not torch.allclose(ea, eb)
    seen = []
    encoder = sd.text_encoder.encoder
    handle = encoder.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["inputs_embeds"]).clone()),
                                               with_kwargs=True)
    try:
        with torch.no_grad():
            prompt.encode(a)
            sd.text_encoder(prompt.input_ids)
    finally:
        handle.remove()
    changed = (seen[0] - seen[1]).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [1]  # only the placeholder's position
    token_embedding = sd.text_encoder.get_input_embeddings()
    position = seen[1][0, 1] - token_embedding(prompt.input_ids)[0, 1]
    assert torch.allclose(seen[0][0, 1], a[0] + position, atol=1e-5)


# ------------------------------------------------------------------------------------------------- energies


def test_anonymization_energy_lowers_fr_similarity_and_the_pairwise_term_separates_variants(pixel_dp):
    """Mechanisms: the energy Σ max(cos(f(x̂0), f(x)), 0) + Σ_{i<j} max(cos(f(x̂0_i), f(x̂0_j)), 0) (checked against
    the formula by hand), descended at every step (sign flipped → similarity to the original stays/rises) and the
    pairwise term between variants (removed → variants stay as alike as without energy); a real zoo model on a real
    face. The run is 5 DDIM steps from t = 4 (1000 steps at strength 0.005) so that without energy the tiny random
    UNet leaves the identity in place (cosine ≈ 0.44 to the original): the energy then has something to remove."""
    dp, prepared = pixel_dp
    g = torch.Generator().manual_seed(3)
    e = F.normalize(torch.randn(4, 8, generator=g), dim=-1)  # 2 faces × 2 variants
    r = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    cos = (e * r).sum(-1)
    by_hand = cos.clamp_min(0).sum() + 0.5 * ((e[0] @ e[1]).clamp_min(0) + (e[2] @ e[3]).clamp_min(0))
    assert torch.allclose(dp_module.anonymization_energy({"m": e}, {"m": r}, 2, 0.5), by_hand)
    assert torch.allclose(dp_module.hiding_energy({"m": e}, {"m": r}), (1 - cos).sum())

    results = {}
    saved = dataclasses.replace(dp.config)
    dp.config.anonymize_steps, dp.config.anonymize_strength = 1000, 0.005
    try:
        for name, energy, pairwise in (("off", 0.0, 1.0), ("on", 1.0, 1.0), ("no_pairwise", 1.0, 0.0)):
            dp.config.anonymize_energy, dp.config.pairwise_weight = energy, pairwise
            faces = dp.anonymize_faces(prepared).faces
            e = dp._identity(faces)[FR]
            results[name] = (float(cosine_to(dp, faces, prepared.crops).max()), float((e[0] * e[1]).sum()))
    finally:
        dp.config = saved
    print("max cosine to the original, cosine between the 2 variants:", results)
    (off_orig, off_pair), (on_orig, on_pair), (np_orig, np_pair) = results["off"], results["on"], results["no_pairwise"]
    assert off_orig > 0.3 and off_pair > 0.5, results  # without energy the identity is there
    assert on_orig < 0.05 and np_orig < 0.05 and on_orig < off_orig - 0.25, results  # hinge: pushed to ≤ 0
    assert on_pair < 0.1 and on_pair < off_pair - 0.4 and on_pair < np_pair - 0.4, results


def test_hiding_energy_keeps_the_machine_identity(pixel_dp):
    """Mechanism: the hiding energy 1 − cos(f(x̂0), f(x)) (off or sign flipped → the hidden face no longer matches)."""
    dp, prepared = pixel_dp
    sims = {}
    for energy in (0.0, 1.0):
        dp.config.hide_energy = energy
        sims[energy] = float(cosine_to(dp, dp.hide_faces(prepared)[0].faces, prepared.crops))
    dp.config.hide_energy = 1.0
    assert sims[1.0] > sims[0.0] + 0.2 and sims[1.0] > 0.27, sims  # 0.27: the model's threshold at FAR 1e-2


def test_background_latent_is_the_clean_latent_and_conditioning_switches_at_400_600(pixel_dp):
    """Mechanisms: for t < 300 the latent outside the face mask is the clean latent (off → it is not); the learned
    conditioning for t > 400 then the empty prompt (anonymization); for hiding the learned embedding against the
    empty prompt above 600 at 1.5, the empty prompt against the learned one at 2.5 after (reversed → fails)."""
    dp, prepared = pixel_dp
    mask = dp.latent_mask()
    outside = (mask == 0).expand(2, 4, -1, -1)
    z = dp.anonymize_faces(prepared).latents
    clean = prepared.clean.repeat_interleave(2, 0)
    assert outside.any() and torch.equal(z[outside], clean[outside])
    dp.config.background_switch = 0
    z_off = dp.anonymize_faces(prepared).latents
    dp.config.background_switch = 300
    assert (z_off[outside] - clean[outside]).abs().mean() > 1e-3

    learned = dp.bucket_embeddings(prepared.tokens)
    empty = dp.model.encode_prompts([""])
    calls = []
    import faceshield.methods.diff_privacy as module

    original = module.guided_noise

    def spy(sd, latents, t, cond, uncond, guidance):
        kind = lambda e: "empty" if torch.allclose(e[:1], empty) else (
            "learned" if torch.allclose(e[:1], learned[0, ic.bucket_of(t)]) else "other")
        calls.append((t, kind(cond), kind(uncond), guidance))
        return original(sd, latents, t, cond, uncond, guidance)

    module.guided_noise = spy
    try:
        dp.config.anonymize_energy = dp.config.hide_energy = 0.0
        dp.anonymize_faces(prepared)
        anonymize_calls, calls[:] = list(calls), []
        dp.hide_faces(prepared)
    finally:
        module.guided_noise = original
        dp.config.anonymize_energy = dp.config.hide_energy = 1.0
    assert anonymize_calls and all(c[1:] == (("learned" if c[0] > 400 else "empty"), "empty", 1.0)
                                   for c in anonymize_calls), anonymize_calls
    assert any(c[0] > 400 for c in anonymize_calls) and any(c[0] <= 400 for c in anonymize_calls)
    assert calls and all(c[1:] == (("learned", "empty", 1.5) if c[0] > 600 else ("empty", "learned", 2.5))
                         for c in calls), calls
    assert any(c[0] > 600 for c in calls) and any(c[0] <= 600 for c in calls)


# ------------------------------------------------------------------------------------------------- recovery


def test_recovery_with_the_key_reconstructs_the_face_and_nothing_else_does(pixel_dp, photo):
    """Mechanisms: the key's z_T and tokens (another face's key, or inverting the published face itself, recover far
    worse), fixed-point inversion (0 iterations → lower PSNR), fp16 storage keeps the quality."""
    dp, prepared = pixel_dp
    # the tiny text encoder's learned and empty embeddings differ little, so on this model the guidance that makes
    # the published face unrecognisable needs larger scales than the paper's 1.5 / 2.5 to move it far from the
    # original (published ≈ 14 dB instead of 23 dB); recovery itself does not use guidance
    saved = dataclasses.replace(dp.config)
    dp.config.hide_energy, dp.config.hide_guidance_early, dp.config.hide_guidance_late = 0.0, 5.0, 10.0
    try:
        generated, noise = dp.hide_faces(prepared)
    finally:
        dp.config = saved
    right = float(psnr(dp.recover_faces(noise, prepared.tokens).faces, prepared.crops))
    half = float(psnr(dp.recover_faces(noise.half().float(), prepared.tokens.half().float()).faces, prepared.crops))
    other = load_image(PAIRS / "train" / f"{pair_ids(2)[1]}.png").rgb
    other_crops, _ = dp.crops_of(to_tensor(other), landmark_tensor(detect_faces(other, create_detector())).float())
    other_prep = dp.prepare_faces(other_crops)
    other_noise = dp.invert(other_prep.clean, dp.bucket_embeddings(other_prep.tokens), dp.hide_path())
    wrong = float(psnr(dp.recover_faces(other_noise, other_prep.tokens).faces, prepared.crops))
    published_clean = dp.model.encode_images(generated.faces).float()
    alone_noise = dp.invert(published_clean, dp.bucket_embeddings(prepared.tokens), dp.hide_path())
    alone = float(psnr(dp.recover_faces(alone_noise, prepared.tokens).faces, prepared.crops))
    published = float(psnr(generated.faces, prepared.crops))
    dp.config.inversion_iterations = 0
    plain_noise = dp.invert(prepared.clean, dp.bucket_embeddings(prepared.tokens), dp.hide_path())
    dp.config.inversion_iterations = 6
    plain = float(psnr(dp.recover_faces(plain_noise, prepared.tokens).faces, prepared.crops))
    numbers = dict(right=right, half=half, wrong=wrong, alone=alone, published=published, plain=plain)
    print("recovery PSNR (dB):", numbers)
    ceiling = float(psnr(dp.model.decode_latents(prepared.clean), prepared.crops))
    assert right > ceiling - 3 and right > 24, (numbers, ceiling)
    assert abs(half - right) < 1.0, numbers
    assert right > wrong + 8, numbers
    assert right > max(alone, published) + 8, numbers
    assert right > plain + 4, numbers


def test_key_file_encrypted_authenticated_and_bound(tmp_path):
    """Mechanisms: AEAD with a scrypt key (wrong passphrase, a changed ciphertext or header byte, truncation → one
    clear error), fp16 storage halves the tensors."""
    key = RecoveryKey({"noise": torch.randn(1, 4, 16, 16), "tokens": torch.randn(1, 10, 32),
                       "matrices": torch.randn(1, 2, 3, dtype=torch.float64)}, {"format": "x", "published_sha256": "ab"})
    blob = encrypt_key(key, "correct horse", log2_n=10)
    back = decrypt_key(blob, "correct horse")
    assert torch.equal(back.tensors["noise"], key.tensors["noise"]) and back.meta["published_sha256"] == "ab"
    assert blob != encrypt_key(key, "correct horse", log2_n=10)  # random salt and nonce
    for bad, secret in ((blob, "wrong"), (blob[:-1] + bytes([blob[-1] ^ 1]), "correct horse"),
                        (blob[:20] + bytes([blob[20] ^ 1]) + blob[21:], "correct horse"), (blob[:60], "correct horse")):
        with pytest.raises(KeyFileError, match="wrong passphrase|altered"):
            decrypt_key(bad, secret)
    with pytest.raises(KeyFileError, match="not a faceshield"):
        decrypt_key(b"PK\x03\x04" + blob[4:], "correct horse")
    # the whole header is the AEAD's associated data: the ciphertext authenticates under it and under nothing else
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from faceshield.methods import recovery_key as rk

    _, _, log2_n, r, p, salt, nonce = rk.HEADER.unpack(blob[: rk.HEADER.size])
    aead = AESGCM(rk._kdf("correct horse", salt, log2_n, r, p))
    assert aead.decrypt(nonce, blob[rk.HEADER.size :], blob[: rk.HEADER.size])
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, blob[rk.HEADER.size :], None)
    half = encrypt_key(key, "correct horse", half=True, log2_n=10)
    assert len(half) < 0.6 * len(blob)
    back = decrypt_key(half, "correct horse")
    assert torch.equal(back.tensors["matrices"], key.tensors["matrices"])  # geometry never rounded to fp16
    assert torch.equal(back.tensors["noise"], key.tensors["noise"].half().float())


# ------------------------------------------------------------------------------------------------- commands


def test_commands_end_to_end_with_local_model_folders(dirs, tmp_path, face_rgb, monkeypatch):
    """The three commands on a local model folder: anonymize writes N variants, outside the face mask the photo is
    untouched; hide writes photo + key; recover with the key; wrong passphrase / key of another photo / missing
    weights → one clear error and no output; a re-run resumes."""
    sd_dir, clip_dir = dirs
    src = tmp_path / "in"
    src.mkdir()
    save_image(src / "a.png", face_rgb)
    other = load_image(PAIRS / "train" / f"{pair_ids(2)[1]}.png").rgb
    save_image(src / "b.png", other)
    common = ["--diffusion-model", sd_dir, "--clip-model", clip_dir, "--fr-models", FR, "--set", "msi_steps=2",
              "--set", "image_size=64", "--set", "anonymize_steps=4", "--set", "hide_steps=4",
              "--set", "inversion_iterations=1"]
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(cli, ["anonymize", str(src / "a.png"), "-o", str(out), "--variants", "2", "--json", *common])
    assert r.exit_code == 0, r.output
    record = json.loads(r.output)["photos"][0]
    assert record["status"] == "done" and len(record["outputs"]) == 2
    variants = [load_image(p).rgb for p in record["outputs"]]
    from faceshield.faces.masks import face_mask_from_landmarks

    landmarks = landmark_tensor(detect_faces(face_rgb, create_detector())).float()
    mask = face_mask_from_landmarks(landmarks, face_rgb.shape[:2], scale=1.3, softness=0.25).amax(0)[0] == 0
    assert (variants[0][mask.numpy()] == face_rgb[mask.numpy()]).all()
    assert (variants[0] != variants[1]).any()
    assert [p.split("/")[-1] for p in record["outputs"]] == ["a_anonymized.png", "a_anonymized_v2.png"]
    r = runner.invoke(cli, ["anonymize", str(src / "a.png"), "-o", str(out), "--variants", "2", "--json", *common])
    assert json.loads(r.output)["photos"][0].get("resumed") is True and not r.stderr  # --json: no bars
    # --overwrite redoes it and may replace our own variant; progress bars of the MSI and sampling steps on stderr
    r = runner.invoke(cli, ["anonymize", str(src / "a.png"), "-o", str(out), "--variants", "2", "--overwrite",
                            *common])
    assert r.exit_code == 0 and "OK" in r.stdout and "MSI face 1" in r.stderr and "anonymize" in r.stderr, r.output
    r = runner.invoke(cli, ["anonymize", str(src / "a.png"), "-o", str(out), "--variants", "2", "--overwrite",
                            "--quiet", *common])
    assert r.exit_code == 0 and not r.stderr, r.output
    # a file faceshield did not write where a variant would go: the photo fails, the file is kept
    foreign = tmp_path / "o3"
    foreign.mkdir()
    (foreign / "a_anonymized_v2.png").write_bytes(b"mine")
    r = runner.invoke(cli, ["anonymize", str(src / "a.png"), "-o", str(foreign), "--variants", "2", "--json",
                            *common])
    assert json.loads(r.stdout)["photos"][0]["status"] == "failed" and "not written by faceshield" in r.stdout
    assert (foreign / "a_anonymized_v2.png").read_bytes() == b"mine" and not (foreign / "a_anonymized.png").exists()

    monkeypatch.setenv("FACESHIELD_PASSPHRASE", "s3cret")
    r = runner.invoke(cli, ["hide", str(src / "a.png"), str(src / "b.png"), "-o", str(out), "--key-out",
                            str(tmp_path / "keys"), "--json", *common])
    assert r.exit_code == 0, r.output
    records = json.loads(r.output)["photos"]
    hidden_a, key_a = records[0]["output"], records[0]["key"]
    assert hidden_a.endswith("a_hidden.png") and key_a.endswith("a_hidden.png.fskey")
    assert records[0]["key_bytes"] > 1000
    recovered = tmp_path / "rec.png"
    r = runner.invoke(cli, ["recover", hidden_a, "--key", key_a, "-o", str(recovered)])
    assert r.exit_code == 0 and recovered.is_file(), r.output
    assert load_image(recovered).rgb.shape == face_rgb.shape
    r = runner.invoke(cli, ["recover", hidden_a, "--key", key_a])  # default name beside the hidden photo
    assert r.exit_code == 0 and hidden_a.replace("a_hidden.png", "a_hidden_recovered.png") in r.output, r.output
    for args, message in (
        (["recover", hidden_a, "--key", key_a, "-o", str(tmp_path / "x.png"), "--passphrase", "nope"],
         "wrong passphrase"),
        (["recover", records[1]["output"], "--key", key_a, "-o", str(tmp_path / "x.png")], "another photo"),
    ):
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and message in r.output and not (tmp_path / "x.png").exists(), r.output
    missing = tmp_path / "empty-model"
    missing.mkdir()
    r = runner.invoke(cli, ["anonymize", str(src / "a.png"), "-o", str(tmp_path / "o2"), "--diffusion-model",
                            str(missing)])
    assert r.exit_code == 1 and "not a diffusers Stable Diffusion folder" in r.output, r.output
    with pytest.raises(DiffusionModelError, match="CLIP vision model"):
        ic.load_clip_vision(str(missing))


# ------------------------------------------------------------------------------------------------- evaluation


def test_evaluate_anonymization_writes_every_metric_of_the_report(dirs, tmp_path, face_rgb):
    """`faceshield evaluate-anonymization` end to end on the tiny folders: report.json holds PSR per zoo model and
    the independent judge's similarities, diversity, background PSNR (the paste leaves the background exact),
    expression agreement/L1, head-pose difference, hiding match rate, recovery PSNR/SSIM/FR similarity, key size and
    seconds per stage; report.html shows original | variants | hidden | recovered."""
    sd_dir, clip_dir = dirs
    save_image(tmp_path / "a.png", face_rgb)
    out = tmp_path / "report"
    r = CliRunner().invoke(cli, ["evaluate-anonymization", str(tmp_path / "a.png"), "-o", str(out), "--variants", "2",
                                 "--judges", FR, "--diffusion-model", sd_dir, "--clip-model", clip_dir, "--fr-models",
                                 FR, "--set", "msi_steps=2", "--set", "image_size=64", "--set", "anonymize_steps=4",
                                 "--set", "hide_steps=4", "--set", "inversion_iterations=1"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    summary, row = report["summary"], report["photos"][0]
    for key in (f"psr_{FR}", "diversity", "background_psnr", "expression_agreement", "expression_l1",
                "pose_difference_deg", "hide_match_rate", "hidden_psnr", "recovery_psnr", "recovery_ssim",
                "recovery_similarity", "key_bytes", "seconds_msi", "seconds_anonymize", "seconds_hide",
                "seconds_recover"):
        assert summary.get(key) is not None, (key, summary)
    assert summary["measured"] == 1 and 0 <= summary[f"psr_{FR}"] <= 1 and 0 <= summary["expression_agreement"] <= 1
    assert summary["background_psnr"] > 60, summary  # outside the paste mask the photo is untouched
    assert len(row["similarity"][FR]) == 2 and len(row["judge_similarity"][FR]) == 2
    assert summary["key_bytes"] > 1000 and summary["pose_difference_deg"] >= 0
    page = (out / "report.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 1 + 2 + 2 and "recovered" in page


def test_head_pose_and_expression_measures_on_real_faces(face_rgb):
    """The face-mesh head-pose difference: the Kabsch angle recovers a known rotation exactly; a face against itself
    is 0°, against its mirror image (yaw negated) clearly not; the emotion model agrees with itself."""
    from faceshield.eval.anonymization import HumanAux, kabsch_angle

    points = torch.randn(468, 3, generator=torch.Generator().manual_seed(0)).numpy()
    c, s = torch.cos(torch.tensor(0.35)).item(), torch.sin(torch.tensor(0.35)).item()
    rotated = points @ torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]]).numpy().T * 2.0 + 5.0
    assert abs(kabsch_angle(points, rotated) - 20.05) < 0.01  # 0.35 rad, scale and shift ignored

    aux = HumanAux()
    detector = create_detector()
    rgb = load_image(PAIRS / "train" / "104.png").rgb  # a face turned a little (≈ 7° yaw)
    measured = []
    for image in (rgb, rgb[:, ::-1].copy()):
        landmarks = landmark_tensor(detect_faces(image, detector)).float()
        measured.append(aux(to_tensor(image), landmarks[0]))
    (p0, m0), (p1, m1) = measured
    assert kabsch_angle(m0, m0) < 0.1 and kabsch_angle(m0, m1) > 8, kabsch_angle(m0, m1)
    assert p0.shape == (7,) and abs(p0.sum() - 1) < 1e-3 and int(p0.argmax()) == int(p1.argmax())
