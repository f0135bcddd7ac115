"""The native ImageReward reward (src/faceshield/diffusion/image_reward.py) against the reference package.

tests/data/image_reward_reference.json holds what image-reward 1.5 (in its own venv: torch 2.14.1, timm 0.6.13,
transformers 4.39) computed on deterministic random weights (benchmarks/validate_image_reward.py fixture): the
checkpoint's key names and shapes, med_config.json, a small vocabulary, the prompts' token ids, the scores of two
images for two prompts and one score's gradient. Here the weights are regenerated, saved as ImageReward.pt +
med_config.json and loaded back through the loader users run; the mechanisms' mutations are in docs/mechanisms.md.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from faceshield.errors import DiffusionModelError

REPO = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((REPO / "tests" / "data" / "image_reward_reference.json").read_text())
SCORE_TOL, GRAD_RTOL = 1e-5, 1e-4  # float32; measured 4.8e-7 and 1.8e-9 (= 1.1e-6 × the largest gradient entry)


@pytest.fixture(scope="session")
def validator():
    """benchmarks/validate_image_reward.py: the seeded weights and images, shared with the reference side."""
    path = REPO / "benchmarks" / "validate_image_reward.py"
    spec = importlib.util.spec_from_file_location("validate_image_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, validator):
    """``ImageReward.pt`` (the fixture's regenerated weights), ``med_config.json`` and ``vocab.txt`` in a folder."""
    folder = tmp_path_factory.mktemp("image_reward")
    state = validator.random_state([(key, tuple(shape)) for key, shape in FIXTURE["keys"]], FIXTURE["seed"])
    sums = {key: (float(value.double().sum()), FIXTURE["key_sums"][key]) for key, value in state.items()}
    drift = {key: pair for key, pair in sums.items() if abs(pair[0] - pair[1]) > 1e-6 * (1 + abs(pair[1]))}
    assert not drift, f"the seeded weights differ from the reference's: {list(drift.items())[:3]}"
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(FIXTURE["med_config"]))
    (folder / "vocab.txt").write_text("\n".join(FIXTURE["vocab"]) + "\n")
    return folder


def scorer_for(folder, prompt):
    from faceshield.diffusion.rewards import create_reward_model

    return create_reward_model("imagereward", str(folder / "ImageReward.pt"), prompt=prompt,
                               tokenizer=str(folder / "vocab.txt"))


def test_tokenizer_wrapper_gives_the_reference_ids(checkpoint):
    """bert-base-uncased's wordpieces, lower-cased, [UNK], BLIP's added [DEC]/[ENC], [CLS] first, 35 with padding."""
    from faceshield.diffusion.image_reward import MAX_LENGTH, load_tokenizer, prompt_tokens

    for prompt, ids, mask in zip(FIXTURE["prompts"], FIXTURE["input_ids"], FIXTURE["attention_mask"]):
        got_ids, got_mask = prompt_tokens(load_tokenizer(str(checkpoint / "vocab.txt")), prompt)
        assert got_ids.shape == (1, MAX_LENGTH) and got_ids[0].tolist() == ids and got_mask[0].tolist() == mask
    assert FIXTURE["input_ids"][0][0] == FIXTURE["vocab"].index("[CLS]")  # not [ENC]: ImageReward keeps [CLS]
    assert 0 in FIXTURE["attention_mask"][0]  # the padding mask is exercised


def test_scores_and_gradient_match_the_reference_package(checkpoint, validator):
    source = validator.images(FIXTURE["seed"]).requires_grad_(True)
    scorers = [scorer_for(checkpoint, prompt) for prompt in FIXTURE["prompts"]]
    vision = scorers[0].model.blip.visual_encoder  # depth and width read from the checkpoint (here 2 × 256)
    assert len(vision.blocks) == 2 and vision.cls_token.shape[-1] == 256 and vision.blocks[0].attn.heads == 4
    scores = torch.stack([scorer(validator.upsample(source)) for scorer in scorers])
    (grad,) = torch.autograd.grad(scores[0, 0], source)
    reference = torch.tensor(FIXTURE["scores"])
    score_diff = float((scores.detach() - reference).abs().max())
    reference_grad = torch.tensor(FIXTURE["grad_source0"])
    grad_diff = float((grad[0].flatten() - reference_grad).abs().max()) / float(reference_grad.abs().max())
    assert score_diff < SCORE_TOL, (score_diff, scores.tolist(), FIXTURE["scores"])
    assert grad_diff < GRAD_RTOL, grad_diff
    # the comparison can fail: the scores differ between images and prompts by far more than the tolerance
    assert float((reference[:, 0] - reference[:, 1]).abs().min()) > 100 * SCORE_TOL
    assert float((reference[0] - reference[1]).abs().min()) > 100 * SCORE_TOL


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message
    return message


def test_loading_errors_are_one_line(checkpoint, tmp_path):
    from faceshield.diffusion.rewards import create_reward_model

    with pytest.raises(DiffusionModelError) as error:
        create_reward_model("imagereward", "")
    assert "reward_path" in _one_line(error)
    with pytest.raises(DiffusionModelError) as error:
        scorer_for(tmp_path, "a photo")
    assert "not found" in _one_line(error) and "ImageReward.pt" in _one_line(error)

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "ImageReward.pt").write_bytes((checkpoint / "ImageReward.pt").read_bytes())
    with pytest.raises(DiffusionModelError) as error:
        scorer_for(alone, "a photo")
    assert "med_config.json not found" in _one_line(error)

    (alone / "med_config.json").write_text(json.dumps({**FIXTURE["med_config"], "num_hidden_layers": 3}))
    with pytest.raises(DiffusionModelError) as error:  # key mismatch: the config wants a third text layer
        scorer_for(alone, "a photo")
    assert "lacks" in _one_line(error) and "encoder.layer.2" in _one_line(error)

    (alone / "med_config.json").write_text(json.dumps({**FIXTURE["med_config"], "intermediate_size": 64}))
    with pytest.raises(DiffusionModelError) as error:
        scorer_for(alone, "a photo")
    assert "does not match med_config.json" in _one_line(error)

    (alone / "med_config.json").write_text(json.dumps(FIXTURE["med_config"]))
    with pytest.raises(DiffusionModelError) as error:  # no tokenizer: a folder that is not there, offline
        create_reward_model("imagereward", str(alone / "ImageReward.pt"), tokenizer=str(tmp_path / "no-bert"))
    assert "tokenizer" in _one_line(error)

    (alone / "vocab.txt").write_text("\n".join(FIXTURE["vocab"] + [f"w{i}" for i in range(40)]) + "\n")
    with pytest.raises(DiffusionModelError) as error:  # not the checkpoint's vocabulary (size)
        create_reward_model("imagereward", str(alone / "ImageReward.pt"), tokenizer=str(alone / "vocab.txt"))
    assert "62 tokens" in _one_line(error) and "22 token embeddings" in _one_line(error)

    (alone / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DiffusionModelError) as error:
        scorer_for(alone, "a photo")
    assert "cannot load ImageReward checkpoint" in _one_line(error)


def test_haa_with_imagereward_on_the_tiny_sd_gives_the_image_the_rewards_true_gradient(checkpoint, tmp_path):
    """HAA's global term through encode → tiny UNet → one-step x̂₀ → decode → ImageReward: the gradient reaching
    the image is nonzero and is the reward's true derivative (central difference along it), and a protect run ends.

    One image: the batch standardisation with constant statistics makes the gradient ``∂r`` = −2·∂RM(x̂₀) in the
    active regime while the loss's value stays exp(0) = 1, so the difference is taken on the reward itself."""
    from faceshield.diffusion.finetune import Finetuner
    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.diffusion.testing import save_tiny_stable_diffusion
    from faceshield.methods.base import get_method_class, method_config

    # the fixture's weights with the ViT's first tokens 100× larger (unit scale): the fixture keeps them small so
    # that LayerNorm's ε shows, which leaves the reward too flat in the pixels for a float32 central difference
    state = torch.load(checkpoint / "ImageReward.pt", weights_only=True)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        state[f"blip.visual_encoder.{key}"] *= 100
    folder = tmp_path / "image_reward"
    folder.mkdir()
    torch.save(state, folder / "ImageReward.pt")
    for name in ("med_config.json", "vocab.txt"):
        (folder / name).write_bytes((checkpoint / name).read_bytes())
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:48, 16:48] = 1
    config = method_config("haa", resolution=64, outer_steps=1, surrogate_steps=1, pgd_steps=1,
                           denoise_weight=0.0, global_weight=1.0, local_weight=0.0, reward_model="imagereward",
                           reward_path=str(folder / "ImageReward.pt"), reward_prompt=FIXTURE["prompts"][0],
                           reward_tokenizer=str(folder / "vocab.txt"))
    method = get_method_class("haa")(config, model=load_stable_diffusion(save_tiny_stable_diffusion(tmp_path / "sd")))
    state = method.start(images, masks)
    # the random reward scores this noise image below the random surrogate's x̂₀, where the paper's r is flat
    # (r = −RM(x_o)); raising RM(x_o) puts the term in its active regime, r = RM(x_o) − 2·RM(x̂₀)
    state["global_clean"] = state["global_clean"] + 10
    tuner = Finetuner(method.model, method.finetune_config())

    def reward_and_grad(delta):
        grad, terms = method.objective(tuner, images, delta, state, torch.Generator().manual_seed(3))
        return terms["reward_global"], grad

    _, grad = reward_and_grad(torch.zeros_like(images))
    assert bool(torch.isfinite(grad).all()) and float(grad.norm()) > 0
    h = 0.1  # L2 norm of the step (≈ 1e-3 a pixel); measured: slope within 0.7 % of −½‖∇‖ at h = 0.01 and 0.1
    direction = grad / grad.norm()
    slope = (reward_and_grad(h * direction)[0] - reward_and_grad(-h * direction)[0]) / (2 * h)
    assert slope == pytest.approx(-0.5 * float(grad.norm()), rel=0.02), (slope, float(grad.norm()))
    marks = torch.tensor([[[24.0, 26.0], [40.0, 26.0], [32.0, 34.0], [26.0, 44.0], [38.0, 44.0]]])  # 5 points
    protected, history = method.protect_set(images, [marks])
    assert float((protected - images).abs().max()) <= config.epsilon + 1e-6 and "reward_global" in history
