"""Anonymization Prompt Learning on a tiny SD 1.x-shaped model (random weights, saved and loaded back), with the
real FR zoo, the independent judge and real face photos for identity scoring.

Each mechanism has a test that fails when it is removed or reversed (docs/mechanisms.md): the target formula and
η's sign, the detached target, only-the-prefix-trains, the diffusers file format and multi-vector expansion, the
identity/general branches, exact resume, "a failed detection counts as 0", the CLIP score of each general image
(tiny CLIP saved and loaded back) and the `make-data --general` folder pairs."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402

from faceshield.diffusion.loading import load_stable_diffusion  # noqa: E402
from faceshield.diffusion.testing import save_tiny_stable_diffusion  # noqa: E402
from faceshield.diffusion.text_embeddings import PrefixFileError, PromptPrefix  # noqa: E402
from faceshield.methods.apl import (APLConfig, APLData, APLDataConfig, APLError, APLTrainer, apl_loss,  # noqa: E402
                                    apl_target, make_data, noisy_latents, predict_noise_batch)

NAMES = ("Tom Hanks | an old man with grey hair and a short beard, wearing glasses\n"
         "Ada Lovelace | a young woman with dark curly hair in a blue dress\n")
CAPTIONS = "a red car on a street\na bowl of fruit\na mountain lake\n"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("apl-tiny"))


def fresh(tiny_dir):
    """A model of its own per test (installing a prefix changes the tokenizer and the token table)."""
    return load_stable_diffusion(tiny_dir)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("apl-data")
    (root / "names.txt").write_text(NAMES)
    (root / "captions.txt").write_text(CAPTIONS)
    make_data(root / "data", root / "names.txt", root / "captions.txt",
              config=APLDataConfig(images_per_name=4, steps=2, size=64), sd=fresh(tiny_dir))
    return root


@pytest.fixture(scope="session")
def data(data_dir):
    return APLData.load(data_dir / "data")


def config(**kw):
    return APLConfig(**{"resolution": 64, "checkpoint_every": 1000, **kw})


# --- the training step -----------------------------------------------------------------------------------------
def test_target_is_the_papers_formula_on_hand_computed_tensors():
    """target = ε(z, neutral) − η·(ε(z, private) − ε(z, neutral)); a flipped η or swapped roles change it."""
    neutral, private = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, 5.0, -1.0])
    assert torch.equal(apl_target(neutral, private, 1.0), torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.equal(apl_target(neutral, private, 0.5), torch.tensor([0.0, 0.5, -1.0]))
    assert torch.equal(apl_target(neutral, private, 0.0), neutral)
    assert APLConfig().eta == 1.0 and APLConfig().identity_probability == 0.5 and APLConfig().lr == 1e-3
    assert APLConfig().num_vectors == 10 and APLConfig().batch_size == 1 and APLConfig().token == "alz"


def test_loss_and_gradient_match_the_formula_with_a_constant_target(tiny_dir):
    """The loss is MSE(ε(z, prefix+private), 2ε(z, neutral) − ε(z, prefix+private)) and its gradient treats the
    target as a constant (ε_nograd): (2/n)·(ε_p − target)·∂ε_p/∂v. A target that kept its gradient would double it."""
    sd = fresh(tiny_dir)
    prefix = PromptPrefix.uniform(3, 32, seed=1)
    prefix.install(sd)
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    private, neutral = ["tom hanks", "a red car"], ["", "a red car"]
    loss = apl_loss(sd, prefix, clean, noise, t, private, neutral, eta=1.0)
    loss.backward()
    got = prefix.vectors.grad.clone()

    z = torch.sqrt(sd.schedule.alphas_cumprod[t].float()).view(-1, 1, 1, 1) * clean + \
        torch.sqrt(1 - sd.schedule.alphas_cumprod[t].float()).view(-1, 1, 1, 1) * noise
    assert torch.allclose(noisy_latents(sd, clean, noise, t), z, atol=1e-6)
    with torch.no_grad():
        eps_n = torch.cat([sd.predict_noise(z[i:i + 1], int(t[i]), sd.encode_prompts([neutral[i]])) for i in range(2)])
    manual = PromptPrefix(prefix.vectors.detach(), prefix.token)  # same values, its own leaf
    eps_p = predict_noise_batch(sd, z, t, manual.encode(sd, [manual.apply(p) for p in private]))
    target = 2 * eps_n - eps_p.detach()
    assert float(loss.detach()) == pytest.approx(float(((eps_p.detach() - target) ** 2).mean()), rel=1e-5)
    (expected,) = torch.autograd.grad(eps_p, manual.vectors, grad_outputs=2 * (eps_p - target).detach() / eps_p.numel())
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert got.abs().sum() > 0


def test_only_the_prefix_receives_gradient_and_changes(tiny_dir, data):
    """Everything but the prefix is frozen even when the caller hands over a trainable model; the text encoder's own
    token rows, the UNet and the VAE stay bit-identical."""
    sd = fresh(tiny_dir)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.requires_grad_(True)
    before = {name: {k: v.clone() for k, v in getattr(sd, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    vocab = len(sd.tokenizer)
    trainer = APLTrainer(config(steps=3), data, sd=sd)
    start = trainer.prefix.vectors.detach().clone()
    for step in range(3):
        trainer.step(step)
    assert not torch.equal(trainer.prefix.vectors.detach(), start)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(sd, name)
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
        for key, value in module.state_dict().items():
            old = before[name][key]
            if key.endswith("token_embedding.weight"):
                value, old = value[:vocab], old[:vocab]
            assert torch.equal(value, old), (name, key)


def test_branches_are_drawn_with_the_identity_probability_and_their_prompts(tiny_dir, data):
    trainer = APLTrainer(config(), data, sd=fresh(tiny_dir))
    draws = [trainer.draw(step).samples[0] for step in range(400)]
    share = np.mean([s.identity for s in draws])
    assert 0.42 < share < 0.58
    person = next(s for s in draws if s.identity)
    assert person.private == "Tom Hanks" and person.neutral.startswith("an old man") or \
        person.private == "Ada Lovelace" and person.neutral.startswith("a young woman")
    general = next(s for s in draws if not s.identity)
    assert general.private == general.neutral and general.private in CAPTIONS
    only = APLTrainer(config(identity_probability=1.0), data, sd=fresh(tiny_dir))
    assert all(only.draw(step).samples[0].identity for step in range(50))
    assert [trainer.draw(7).timesteps.item()] * 2 == [trainer.draw(7).timesteps.item(), trainer.draw(7).timesteps.item()]


def _change(sd, prefix, prompts):
    """Mean relative change of ε from the prefix over fixed latents and noise levels."""
    g = torch.Generator().manual_seed(123)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            for t in (100, 400, 700, 950):
                z, tt = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([t])
                with_prefix = predict_noise_batch(sd, z, tt, prefix.encode(sd, [prefix.apply(prompt)]))
                plain = predict_noise_batch(sd, z, tt, sd.encode_prompts([prompt]))
                out.append(float((with_prefix - plain).norm() / plain.norm()))
    return float(np.mean(out))


def test_training_lowers_the_loss_and_changes_identity_prompts_more_than_general_ones(tiny_dir, data):
    """Identity branch → the prefixed name predicts the neutral description's noise; general branch → the
    prefixed caption predicts its own. Before training the (random) prefix changes general prompts more; after a
    few dozen steps on the branch data, identity prompts change more, and the loss on fixed draws is lower."""
    sd = fresh(tiny_dir)
    trainer = APLTrainer(config(steps=60, batch_size=2, lr=1e-2), data, sd=sd)
    names = sorted({s.private for s in data.identity})
    captions = sorted({s.private for s in data.general})

    def fixed_loss():
        losses = []
        for step in range(1000, 1008):
            draw = trainer.draw(step)
            clean = torch.cat([trainer.latent(s.image) for s in draw.samples])
            noise = torch.randn(clean.shape, generator=draw.generator)
            with torch.no_grad():
                losses.append(float(apl_loss(sd, trainer.prefix, clean, noise, draw.timesteps,
                                             [s.private for s in draw.samples], [s.neutral for s in draw.samples])))
        return np.mean(losses)

    before = (_change(sd, trainer.prefix, names), _change(sd, trainer.prefix, captions), fixed_loss())
    for step in range(60):
        trainer.step(step)
    after = (_change(sd, trainer.prefix, names), _change(sd, trainer.prefix, captions), fixed_loss())
    assert before[0] < before[1]
    assert after[0] > 1.03 * after[1], (before, after)
    assert after[2] < 0.8 * before[2], (before, after)


def test_resumed_training_equals_uninterrupted_training(tiny_dir, data, tmp_path):
    class Crash(Exception):
        pass

    def crash_at_5(done, total):
        if done == 5:
            raise Crash

    out = tmp_path / "prefix.safetensors"
    with pytest.raises(Crash):
        APLTrainer(config(steps=7, checkpoint_every=3), data, sd=fresh(tiny_dir)).train(out, crash_at_5)
    assert out.with_name(out.name + ".ckpt.safetensors").is_file() and not out.exists()
    run = APLTrainer(config(steps=7, checkpoint_every=3), data, sd=fresh(tiny_dir)).train(out)
    assert run["resumed_from"] == 3 and len(run["history"]["loss"]) == 7
    straight = APLTrainer(config(steps=7, checkpoint_every=3), data, sd=fresh(tiny_dir))
    straight_run = straight.train(tmp_path / "straight.safetensors")
    assert torch.equal(PromptPrefix.load(out).vectors, straight.prefix.vectors.detach())
    assert run["history"]["loss"] == straight_run["history"]["loss"]
    assert not out.with_name(out.name + ".ckpt.safetensors").exists()
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["config"]["lr"] == 1e-3 and record["sha256"] and record["vectors"] == [10, 32]


# --- the file: stock diffusers -------------------------------------------------------------------------------
def test_prefix_file_loads_in_stock_diffusers_with_the_same_vectors_and_expansion(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    prefix = PromptPrefix.uniform(10, 32, seed=3)
    path = prefix.save(tmp_path / "prefix.safetensors", {"note": "test"})
    assert PromptPrefix.file_metadata(path) == {"note": "test"}
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    pipe.load_textual_inversion(str(path))
    ids = pipe.tokenizer.convert_tokens_to_ids(prefix.tokens)
    assert prefix.tokens == ["alz"] + [f"alz_{i}" for i in range(1, 10)]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], prefix.vectors.detach())
    assert pipe.maybe_convert_prompt("alz a photo of tom", pipe.tokenizer) == prefix.apply("a photo of tom")
    # the same hidden states through diffusers' text encoder and ours (differentiable path and installed rows)
    sd = fresh(tiny_dir)
    prefix.install(sd)
    prompt = prefix.apply("a photo of tom")
    tokens = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        theirs = pipe.text_encoder(tokens.input_ids)[0]
        ours = prefix.encode(sd, [prompt])
    assert torch.allclose(theirs, ours, atol=1e-6)
    assert torch.allclose(sd.encode_prompts([prompt]), ours, atol=1e-6)
    # renamed on load, as diffusers' token= does
    pipe2 = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    pipe2.load_textual_inversion(str(path), token="<anon>")
    assert torch.equal(pipe2.text_encoder.get_input_embeddings().weight[
        pipe2.tokenizer.convert_tokens_to_ids("<anon>_9")], prefix.vectors.detach()[9])
    assert PromptPrefix.load(path, token="<anon>").apply("x") == "<anon> " + " ".join(
        f"<anon>_{i}" for i in range(1, 10)) + " x"


def test_prefix_expansion_leaves_other_words_alone():
    prefix = PromptPrefix(torch.zeros(3, 4))
    assert prefix.expand("alz waltz alzheimer alz_1x alz") == "alz alz_1 alz_2 waltz alzheimer alz_1x alz alz_1 alz_2"


def test_bad_prefix_files_and_models_are_one_line_errors(tiny_dir, tmp_path):
    with pytest.raises(PrefixFileError, match="not found"):
        PromptPrefix.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PrefixFileError, match="not a safetensors"):
        PromptPrefix.load(tmp_path / "junk.safetensors")
    wide = PromptPrefix.uniform(10, 768).save(tmp_path / "sd15.safetensors")
    with pytest.raises(PrefixFileError, match="768-d vectors but the text encoder .* 32-d"):
        PromptPrefix.load(wide).install(fresh(tiny_dir))
    with pytest.raises(PrefixFileError, match="already a word"):
        PromptPrefix(torch.zeros(1, 32), token="a").install(fresh(tiny_dir))
    with pytest.raises(APLError, match="no apl-data.json"):
        APLData.load(tmp_path)


# --- identity scoring with real FR models on real faces ------------------------------------------------------
@pytest.fixture(scope="session")
def scorer():
    from faceshield.eval.apl import IdentityScorer

    return IdentityScorer()


def test_identity_score_with_real_fr_models_on_real_faces(shared_data, scorer):
    """vggface2-n000050 photos as the "generated" images against references of the same person (set_B) score high;
    CelebA-HQ strangers score low; an image without a face scores 0 (failed detection = 0), in both pipelines."""
    from faceshield.eval.apl import summarise_scores
    from faceshield.images import load_image

    person = shared_data / "vggface2-n000050"
    reference = scorer.reference([load_image(p).rgb for p in sorted((person / "set_B").glob("*.png"))[:3]])
    same = [scorer.score(load_image(p).rgb, reference) for p in sorted((person / "set_A").glob("*.png"))[:3]]
    strangers = [scorer.score(load_image(p).rgb, reference)
                 for p in sorted((shared_data / "celebahq-pairs" / "train").glob("*.png"))[:3]]
    blank = scorer.score(np.full((128, 128, 3), 127, np.uint8), reference)
    assert blank["detected"] is False and all(v == 0 for p in ("zoo", "judge") for v in blank[p].values())
    thresholds = {"zoo": scorer.thresholds, "judge": scorer.judge.thresholds}
    s_same = summarise_scores({"n000050": same}, thresholds)
    s_other = summarise_scores({"x": strangers}, thresholds)
    s_mixed = summarise_scores({"n000050": same + [blank]}, thresholds)
    for pipeline in ("zoo", "judge"):
        for model, row in s_same[pipeline].items():
            assert row["mean"] > s_other[pipeline][model]["max"] + 0.1, (pipeline, model)
            assert row["match_rate"] >= 2 / 3 and s_other[pipeline][model]["match_rate"] == 0
            # the face-less image pulls the mean toward 0 by exactly its share
            assert s_mixed[pipeline][model]["mean"] == pytest.approx(row["mean"] * 3 / 4, rel=1e-6)
    assert s_mixed["detection_rate"] == 0.75


# --- the commands end to end ---------------------------------------------------------------------------------
def test_commands_end_to_end_on_tiny_models(tiny_dir, tmp_path, shared_data):
    from faceshield.cli.main import cli

    runner = CliRunner()
    (tmp_path / "names.txt").write_text("n000050\n")
    (tmp_path / "captions.txt").write_text("a red car\n")
    model = ["--diffusion-model", str(tiny_dir)]
    args = ["apl", "make-data", "--names", str(tmp_path / "names.txt"), "--captions", str(tmp_path / "captions.txt"),
            "-o", str(tmp_path / "data"), "--set", "images_per_name=2", "--set", "steps=2", "--set", "size=64",
            "--quiet", "--json", *model]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["generated_now"] == 3
    again = runner.invoke(cli, args)
    assert json.loads(again.output)["generated_now"] == 0  # resumed: nothing redone
    prefix = tmp_path / "prefix.safetensors"
    trained = runner.invoke(cli, ["apl", "train", str(tmp_path / "data"), "-o", str(prefix), "--set", "steps=3",
                                  "--set", "resolution=64", "--quiet", *model])
    assert trained.exit_code == 0, trained.output
    assert prefix.is_file() and prefix.with_name(prefix.name + ".json").is_file()
    for flag in ([], ["--anonymize", str(prefix)]):
        out = tmp_path / f"gen{len(flag)}.png"
        made = runner.invoke(cli, ["generate", "a photo of n000050", "-o", str(out), "--steps", "2", "--size", "64",
                                   *flag, *model])
        assert made.exit_code == 0 and out.is_file(), made.output
    from faceshield.images import load_image

    assert not np.array_equal(load_image(tmp_path / "gen0.png").rgb, load_image(tmp_path / "gen2.png").rgb)
    reference = tmp_path / "reference" / "n000050"
    reference.mkdir(parents=True)
    for p in sorted((shared_data / "vggface2-n000050" / "set_B").glob("*.png"))[:2]:
        shutil.copy(p, reference / p.name)
    second = save_tiny_stable_diffusion(tmp_path / "second", seed=1)
    report = tmp_path / "report"
    evaluated = runner.invoke(cli, ["evaluate-apl", str(prefix), "--names", str(tmp_path / "names.txt"),
                                    "--reference", str(tmp_path / "reference"), "--captions",
                                    str(tmp_path / "captions.txt"), "--second-model", str(second), "-o", str(report),
                                    "--set", "steps=2", "--set", "size=64", "--set", "images_per_name=2", "--quiet",
                                    *model])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads((report / "report.json").read_text())
    assert list(result["models"]) == [str(tiny_dir), str(second)]
    for r in result["models"].values():
        # random-weight models draw no faces: every image scores 0, as a failed detection must
        assert r["identity"]["prefix"]["detection_rate"] == 0
        assert all(v["mean"] == 0 for v in r["identity"]["prefix"]["zoo"].values())
        assert r["general"]["noise_change"] > 0 and r["identity_prompts"]["noise_change"] > 0
    assert "<img" in (report / "report.html").read_text() and (report / "grid-1-identity.png").is_file()


def test_missing_model_and_prefix_are_one_line_errors(tmp_path, tiny_dir):
    from faceshield.cli.main import cli

    runner = CliRunner()
    missing = runner.invoke(cli, ["generate", "a face", "-o", str(tmp_path / "x.png"), "--diffusion-model",
                                  str(tmp_path / "no-model")])
    assert missing.exit_code == 1 and "does not exist" in missing.output and len(missing.output.splitlines()) == 1
    no_prefix = runner.invoke(cli, ["generate", "a face", "-o", str(tmp_path / "x.png"), "--anonymize",
                                    str(tmp_path / "none.safetensors"), "--diffusion-model", str(tiny_dir)])
    assert no_prefix.exit_code == 1 and "not found" in no_prefix.output and len(no_prefix.output.splitlines()) == 1
    bad = runner.invoke(cli, ["apl", "train", str(tmp_path), "-o", str(tmp_path / "p.safetensors"), "--set", "lr=-1"])
    assert bad.exit_code == 2 and "lr=-1" in bad.output


# --- CLIP score in evaluate-apl (a tiny CLIP saved and loaded back through the users' code) ------------------
@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny ``CLIPModel`` + ``CLIPProcessor`` (character tokenizer, 32 px), ``save_pretrained`` to a folder.

    Random weights give cosines near 0 of either sign, and the score clips negatives to 0, which would hide a wrong
    image. So the text and image towers share their projection and their final-norm bias: every cosine is then
    clearly positive and still depends on the image and the caption."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from faceshield.diffusion.testing import _char_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _char_tokenizer(folder / "tokenizer-source")
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():
        model.text_projection.weight.copy_(model.visual_projection.weight)
        shared = 0.4 * torch.randn(32)
        for norm in (model.text_model.final_layer_norm, model.vision_model.post_layernorm):
            norm.weight.fill_(0.5)
            norm.bias.copy_(shared)
    model.save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder / "clip")
    return folder / "clip"


def _reference_clip_scores(folder, images, captions):
    """CLIP score by hand: OpenAI's preprocessing of the 8-bit image, the model's projected
    embeddings, ``100·max(cos, 0)`` (torchmetrics' CLIPScore)."""
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

    from faceshield.diffusion.image_conditioning import CLIP_MEAN, CLIP_STD
    from faceshield.images import to_uint8

    model, tokenizer = CLIPModel.from_pretrained(str(folder)).eval(), CLIPTokenizer.from_pretrained(str(folder))
    scores = []
    with torch.no_grad():
        for image, caption in zip(images, captions):
            # OpenAI's preprocessing: PIL bicubic to 32 px (the images are square: no crop), OpenAI's mean and std
            small = np.asarray(Image.fromarray(to_uint8(image)).resize((32, 32), Image.Resampling.BICUBIC)) / 255
            pixels = (torch.from_numpy(small).float() - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
            img = model.get_image_features(pixel_values=pixels.permute(2, 0, 1)[None])
            txt = model.get_text_features(**tokenizer([caption], return_tensors="pt"))
            img, txt = (getattr(x, "pooler_output", x)[0].numpy() for x in (img, txt))
            cos = float(img @ txt / np.linalg.norm(img) / np.linalg.norm(txt))
            scores.append(100 * max(cos, 0.0))
    return scores


def test_evaluate_apl_clip_score_is_the_standard_score_of_each_image_and_in_the_report(
        tiny_dir, tiny_clip, tmp_path, shared_data, monkeypatch):
    """`evaluate-apl --clip-model`: each general image's CLIP score with and without the prefix equals an
    independent computation on that image (regenerated here with the same seed) and its caption, the means are in
    report.json and report.html, negative cosines score 0; a missing CLIP folder is one line, before any FR model."""
    from faceshield.cli.main import cli
    from faceshield.diffusion.generation import generate
    from faceshield.eval.apl import APLEvalConfig, ClipScorer

    runner = CliRunner()
    captions = ["a red car on a street", "a bowl of fruit"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    (tmp_path / "names.txt").write_text("n000050\n")
    reference = tmp_path / "reference" / "n000050"
    reference.mkdir(parents=True)
    shutil.copy(sorted((shared_data / "vggface2-n000050" / "set_B").glob("*.png"))[0], reference / "0.png")
    prefix_file = PromptPrefix.uniform(10, 32, seed=5).save(tmp_path / "prefix.safetensors")
    settings = {"steps": 2, "size": 64, "images_per_name": 1}
    args = ["evaluate-apl", str(prefix_file), "--names", str(tmp_path / "names.txt"), "--reference",
            str(tmp_path / "reference"), "--captions", str(tmp_path / "captions.txt"), "--diffusion-model",
            str(tiny_dir), "--quiet", *[x for k, v in settings.items() for x in ("--set", f"{k}={v}")]]
    done = runner.invoke(cli, [*args, "--clip-model", str(tiny_clip), "-o", str(tmp_path / "report")])
    assert done.exit_code == 0, done.output
    general = json.loads((tmp_path / "report" / "report.json").read_text())["models"][str(tiny_dir)]["general"]

    run = APLEvalConfig(**settings)
    sd = fresh(tiny_dir)
    prefix = PromptPrefix.load(prefix_file)
    prefix.install(sd)
    kw = dict(steps=run.steps, guidance=run.guidance, seed=run.seed, height=run.size, width=run.size)
    plain = generate(sd, captions, **kw)
    anonymised = generate(sd, [prefix.apply(c) for c in captions], **kw)
    expected = {"plain": _reference_clip_scores(tiny_clip, plain, captions),
                "prefix": _reference_clip_scores(tiny_clip, anonymised, captions)}
    # the two images of a caption score apart, so a score of the wrong image cannot pass
    assert all(abs(a - b) > 0.1 for a, b in zip(expected["plain"], expected["prefix"])), expected
    for key in ("plain", "prefix"):
        got = [row["clip_score"][key] for row in general["per_prompt"]]
        assert got == pytest.approx(expected[key], abs=1e-3), (key, got, expected)
        assert all(s > 1 for s in got)
        assert general["clip_score"][key] == pytest.approx(float(np.mean(got)), abs=1e-9)
    assert [row["caption"] for row in general["per_prompt"]] == captions
    assert "CLIP score without" in (tmp_path / "report" / "report.html").read_text()

    # negative cosines are clipped at 0 (the score's definition), positive ones are not
    scorer = ClipScorer(str(tiny_clip))
    assert scorer(plain, captions) == pytest.approx(expected["plain"], abs=1e-3)
    scorer.model.text_projection.weight.neg_()
    assert scorer(plain, captions) == [0.0, 0.0]

    def no_fr_models(*args, **kwargs):
        raise AssertionError("FR models loaded before the CLIP folder was checked")

    monkeypatch.setattr("faceshield.eval.apl.IdentityScorer", no_fr_models)
    for folder, message in ((tmp_path / "no-clip", "CLIP model folder .* does not exist"),
                            (tmp_path / "reference", "cannot load CLIP model")):
        failed = runner.invoke(cli, [*args, "--clip-model", str(folder), "-o", str(tmp_path / "r2")])
        assert failed.exit_code == 1 and len(failed.output.strip().splitlines()) == 1, failed.output
        assert re.search(message, failed.output) and "--clip-model" in failed.output, failed.output


# --- make-data --general: a user folder of image + caption files -------------------------------------------
def test_make_data_general_folder_pairs_each_photo_with_its_caption_skips_the_rest_and_resumes(
        tiny_dir, tmp_path, shared_data):
    """The general pairs are the folder's photos with the captions beside them (nested folders too, whitespace
    collapsed), and training reads those photos; an image without a caption, with an empty one, or that is not an
    image is skipped and named in the output and the manifest; a rerun generates nothing; a folder with no
    captioned image is one line naming it, before any model loads."""
    from faceshield.cli.main import cli
    from faceshield.images import load_image
    from faceshield.methods.apl import load_training_image

    photos = sorted((shared_data / "celebahq-pairs" / "train").glob("*.png"))[:4]
    folder = tmp_path / "laion"
    (folder / "sub").mkdir(parents=True)
    layout = {"a.png": "a woman smiling at the camera", "sub/b.png": "a man\n   in a park ", "c.png": None,
              "d.png": "  \n"}
    for (name, caption), photo in zip(layout.items(), photos):
        shutil.copy(photo, folder / name)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)
    (folder / "e.jpg").write_bytes(b"not an image")
    (folder / "e.txt").write_text("a broken file")
    (tmp_path / "names.txt").write_text("Ada Lovelace\n")
    out = tmp_path / "data"
    args = ["apl", "make-data", "--names", str(tmp_path / "names.txt"), "--general", str(folder), "-o", str(out),
            "--diffusion-model", str(tiny_dir), "--set", "images_per_name=1", "--set", "steps=2", "--set", "size=64",
            "--quiet"]
    first = runner_invoke(cli, [*args, "--json"])
    summary = json.loads(first.output)
    assert summary["generated_now"] == 1 and summary["general_pairs"] == 2
    skipped = {Path(s["image"]).name: s["reason"] for s in summary["skipped"]}
    assert skipped.keys() == {"c.png", "d.png", "e.jpg"}
    assert skipped["c.png"] == "no caption file c.txt" and skipped["d.png"] == "empty caption file d.txt"
    assert "e.jpg" in skipped["e.jpg"]

    data = APLData.load(out)
    pairs = {(Path(s.image).relative_to(folder.resolve()).as_posix(), s.private) for s in data.general}
    assert pairs == {("a.png", "a woman smiling at the camera"), ("sub/b.png", "a man in a park")}
    assert all(s.private == s.neutral and not s.identity for s in data.general)
    manifest = json.loads((out / "apl-data.json").read_text())
    assert [Path(s["image"]).name for s in manifest["skipped"]] == sorted(skipped)
    # training encodes the folder's own photo for its caption
    trainer = APLTrainer(config(identity_probability=0.0), data, sd=fresh(tiny_dir))
    sample = next(s for s in data.general if s.private == "a man in a park")
    with torch.no_grad():
        expected = trainer.sd.encode_images(load_training_image(photos[1], 64)).float()
    assert torch.equal(trainer.latent(sample.image), expected)
    assert np.array_equal(load_image(sample.image).rgb, load_image(photos[1]).rgb)

    again = runner_invoke(cli, args)  # resumed: nothing generated, the same manifest, the skipped files named
    assert "(0 generated now)" in again.output and "3 image(s) of --general skipped (c.png: no caption file" \
        in again.output
    assert json.loads((out / "apl-data.json").read_text()) == manifest

    empty = tmp_path / "uncaptioned"
    empty.mkdir()
    shutil.copy(photos[0], empty / "x.png")
    failed = CliRunner().invoke(cli, ["apl", "make-data", "--names", str(tmp_path / "names.txt"), "--general",
                                      str(empty), "-o", str(tmp_path / "d2"), "--diffusion-model",
                                      str(tmp_path / "no-model")])
    assert failed.exit_code == 1 and len(failed.output.strip().splitlines()) == 1, failed.output
    assert str(empty) in failed.output and "no image with a caption among 1 image(s)" in failed.output


def runner_invoke(cli, args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result
