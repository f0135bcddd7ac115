"""Every method's documented defaults, pinned: the papers' values for the paper methods (../shared/papers/METHODS.md),
the literature's for the baselines, the README's for our own ``cloak``; and the evaluation protocol's settings.

A change to any default must be deliberate: change it here, in the README's methods table and, for a paper
method, say in docs/mechanisms.md why it departs from the paper. A new method adds its row here.
"""

import dataclasses

import pytest

from faceshield.methods.base import get_method_class, list_methods, method_config

PINNED = {
    # METHODS.md, "Weakening Diffusion Purification": SD-2-base, 256², DDIM 20 steps, start step 17 (the last 3),
    # 20 embedding steps of lr 0.1 per timestep, 30 AdamW latent steps of lr 0.01, λ_adv = 0.003 on the FR term
    # summed over the surrogates as the authors' code does (docs/mechanisms.md), self-attention maps of ≤ 32².
    "adv-latent": {
        "diffusion_model": "stabilityai/stable-diffusion-2-base", "image_size": 256, "diffusion_steps": 20,
        "start_step": 17, "null_steps": 20, "null_lr": 0.1, "steps": 30, "lr": 0.01, "adv_weight": 0.003,
        "fr_reduction": "sum", "attention_layers": (), "attention_max_tokens": 32 * 32, "surrogates": (),
    },
    # Madry et al.: L∞ 8/255, α = ε/4, random start (README: 20 steps of 2/255).
    "pgd": {"epsilon": 8 / 255, "steps": 20, "step_size": 2 / 255, "random_start": True, "surrogates": ()},
    # TIP-IM's budget with MI-FGSM (μ = 1.0) and input diversity (p = 0.5), 50 steps (README).
    "tip-im": {"epsilon": 8 / 255, "steps": 50, "step_size": 0.0, "momentum": 1.0, "diversity_probability": 0.5,
               "surrogates": ()},
    # METHODS.md, ASPL: ε 0.05 and α 0.005 in [-1, 1] (halved for [0, 1] pixels), 50 × (3 surrogate + 6 PGD + 3),
    # 512², AdamW wd 1e-2, lr 5e-7 for the full surrogate; LoRA surrogate by default (24 GB), docs/anti-customization.md.
    "aspl": {"epsilon": 0.025, "step_size": 0.0025, "outer_steps": 50, "surrogate_steps": 3, "pgd_steps": 6,
             "resolution": 512, "surrogate": "lora", "surrogate_lr": 5e-7, "lora_lr": 1e-4, "lora_rank": 4,
             "weight_decay": 1e-2, "prior_weight": 0.0, "instance_prompt": "a photo of sks person"},
    # HAA: ASPL's schedule; μ = 1 (MI-FGSM), λ's = 1 and the BRISQUE reward: the paper gives none (our choice).
    "haa": {"epsilon": 0.025, "step_size": 0.0025, "outer_steps": 50, "surrogate_steps": 3, "pgd_steps": 6,
            "momentum": 1.0, "denoise_weight": 1.0, "global_weight": 1.0, "local_weight": 1.0,
            "reward_model": "brisque", "mask_scale": 1.0, "local_size": 128},
    # METHODS.md / docs/map.md: protection settings only (the training defaults are pinned below); mask as adv-latent.
    "map": {"model": "", "pretrained": "", "mask_scale": 1.3, "surrogates": ()},
    # README, cloak's `mid` (the default).
    "cloak": {"epsilon": 12 / 255, "min_ssim": 0.93, "min_psnr": 35.0, "steps": 40, "margin": 0.5,
              "texture_floor": 0.75, "eot": True, "random_start": 0.25, "work_eye_px": 64.0, "surrogates": ()},
}


def test_every_method_is_pinned():
    assert set(list_methods()) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_defaults_are_the_documented_values(name):
    config = get_method_class(name).Config()
    for key, documented in PINNED[name].items():
        value = getattr(config, key)
        assert value == (pytest.approx(documented, rel=1e-12) if isinstance(documented, float) else documented), \
            f"{name}.{key} = {value!r}, documented {documented!r}"


def test_adv_latent_protects_the_last_three_of_twenty_ddim_steps_without_a_pixel_bound():
    """The paper's start step: timesteps 101, 51, 1 of SD's 20-step DDIM schedule; no L∞ bound to set."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from faceshield.diffusion.testing import SD_SCHEDULER

    config = get_method_class("adv-latent").Config()
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(config.diffusion_steps)
    assert [int(t) for t in scheduler.timesteps[config.start_step:]] == [101, 51, 1]
    fields = {f.name for f in dataclasses.fields(config)}
    assert not fields & {"epsilon", "linf", "bound"}


def test_cloak_presets_are_the_readme_values():
    low, high = method_config("cloak", "low"), method_config("cloak", "high")
    assert (low.epsilon, low.min_ssim, low.min_psnr, low.steps) == pytest.approx((8 / 255, 0.96, 38.0, 30))
    assert (high.epsilon, high.min_ssim, high.min_psnr, high.steps, high.margin) == \
        pytest.approx((16 / 255, 0.90, 33.0, 60, 1.0))


def test_protocol_settings_are_the_standard_ones():
    """METHODS.md's protocol: thresholds at FAR 1e-2 and 1e-3, judges and surrogates from the calibration
    (leave-one-out over the strong models), robustness after JPEG q 75, a ×0.5 resize and a σ = 1 blur."""
    from faceshield.eval.protocol import ROBUSTNESS, EvalConfig

    config = EvalConfig()
    assert config.fars == (1e-2, 1e-3)
    assert config.judges == () and config.surrogates == ()
    assert ROBUSTNESS == ("jpeg75", "resize0.5", "blur1") and config.robustness


def test_map_training_defaults_are_diffam_s_where_the_paper_is_silent():
    """MAP's fine-tuning defaults (docs/map.md): DiffAM's base model, inversion to t0 = 60 in 20 DDIM steps, 6
    generative steps, 4 epochs of Adam lr 8e-6 at batch 1 on 256² faces; our documented choices for what neither
    paper gives (loss weights, EMA decay 0.99, PCGrad on)."""
    from faceshield.methods.map import MAPTrainConfig

    config = MAPTrainConfig()
    assert dataclasses.asdict(config) == {
        "pretrained": "google/ddpm-ema-celebahq-256", "expression": "happy", "image_size": 256, "t0": 60,
        "inversion_steps": 20, "generative_steps": 6, "epochs": 4, "batch_size": 1, "lr": 8e-6,
        "identity_weight": 1.0, "expression_weight": 1.0, "laplacian_weight": 10.0, "score_weight": 1.0,
        "projection": "pcgrad", "ema_decay": 0.99, "gradient_checkpointing": False, "checkpoint_every": 50, "seed": 0,
        "surrogates": (), "device": "cpu"}
