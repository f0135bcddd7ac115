"""Stable Diffusion with random weights: the tiny model the tests load back through the users' code, and the real
architectures (SD-2 base…) for speed benchmarks, where weight values do not matter.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from faceshield.diffusion.loading import StableDiffusion, quiet_libraries, require_diffusers, resolve_dtype
from faceshield.diffusion.schedule import NoiseSchedule

# The noise schedule of Stable Diffusion 1.x/2.x (scheduler_config.json of stable-diffusion-2-base).
SD_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of the UNet, VAE and CLIP text encoder of a Stable Diffusion model."""

    unet: dict
    vae: dict
    text_encoder: dict


# Tiny: SD's layout (VAE ×8 downsampling, self-attention in the down and up paths) at a few MB.
TINY = Architecture(
    unet={"sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
          "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D",) * 2,
          "up_block_types": ("CrossAttnUpBlock2D",) * 2, "cross_attention_dim": 32, "attention_head_dim": (2, 4),
          "norm_num_groups": 8, "use_linear_projection": True},
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
         "block_out_channels": (8, 16, 16, 16), "down_block_types": ("DownEncoderBlock2D",) * 4,
         "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 256},
    text_encoder={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "max_position_embeddings": 77, "projection_dim": 32},
)

# stabilityai/stable-diffusion-2-base (its unet/vae/text_encoder config.json): for speed benchmarks, where the
# weight values do not matter. ("attention_head_dim" is the number of heads in diffusers' SD-2 configs.)
SD2_BASE = Architecture(
    unet={"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
          "block_out_channels": (320, 640, 1280, 1280),
          "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
          "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 1024,
          "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True, "norm_num_groups": 32},
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
         "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
         "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 512},
    text_encoder={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                  "num_attention_heads": 16, "max_position_embeddings": 77, "projection_dim": 512,
                  "hidden_act": "gelu"},
)


def _char_tokenizer(folder: Path):
    """A CLIP tokenizer over single characters (no merges): real tokenisation code, a 138-token vocabulary."""
    from transformers import CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _random_components(architecture: Architecture, tokenizer_dir: Path, seed: int) -> dict:
    require_diffusers()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _char_tokenizer(tokenizer_dir)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **architecture.text_encoder)
    return {"tokenizer": tokenizer, "text_encoder": CLIPTextModel(text_config),
            "unet": UNet2DConditionModel(**architecture.unet), "vae": AutoencoderKL(**architecture.vae),
            "scheduler": DDIMScheduler(**SD_SCHEDULER)}


def build_random_stable_diffusion(architecture: Architecture = SD2_BASE, device: str | torch.device = "cpu",
                                  dtype: str | torch.dtype = "auto", seed: int = 0) -> StableDiffusion:
    """A Stable Diffusion with ``architecture`` and random weights, in memory (for speed benchmarks)."""
    import tempfile

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        parts = _random_components(architecture, Path(tmp), seed)
    with quiet_libraries():
        for name in ("unet", "vae", "text_encoder"):
            parts[name].to(device, torch_dtype).eval().requires_grad_(False)
    config = dict(parts["scheduler"].config)
    return StableDiffusion(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], config,
                           NoiseSchedule.from_scheduler_config(config), "random weights", device, torch_dtype)


def save_tiny_stable_diffusion(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny Stable Diffusion (:data:`TINY`, random weights, SD's schedule) and ``save_pretrained`` it.

    Every code path of the real model runs (256 px → 32×32 latents, self-attention down and up), in well under a
    second per UNet call on a CPU. Load it back with :func:`load_stable_diffusion` (the users' loading code).
    """
    folder = Path(folder)
    parts = _random_components(TINY, folder / "tokenizer", seed)
    for name, component in parts.items():
        component.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }, indent=2))
    return folder


def save_tiny_ddpm(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny pixel-space DDPM (``ddpm.TINY_DDPM_ARCHITECTURE``, random weights, DDPM's linear schedule) and
    ``save_pretrained`` it; load it back with :func:`faceshield.diffusion.ddpm.load_ddpm` (the users' code)."""
    from faceshield.diffusion.ddpm import TINY_DDPM_ARCHITECTURE, build_random_ddpm, save_ddpm

    return save_ddpm(build_random_ddpm(TINY_DDPM_ARCHITECTURE, dtype="float32", seed=seed), folder)


# CompVis/stable-diffusion-v1-4 (its unet/vae/text_encoder config.json): Diff-Privacy's base model, for speed
# benchmarks with random weights.
SD14 = Architecture(
    unet={"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
          "block_out_channels": (320, 640, 1280, 1280),
          "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
          "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 768,
          "attention_head_dim": 8, "norm_num_groups": 32},
    vae=SD2_BASE.vae,
    text_encoder={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
                  "hidden_act": "quick_gelu"},
)

# The vision tower of openai/clip-vit-large-patch14 (Diff-Privacy's MSI), and a tiny one with enough layers for the
# MSI's taps (hidden states 3, 7, 11, 15 and the last).
CLIP_VIT_L14_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
                       "hidden_act": "quick_gelu"}
TINY_CLIP_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 16, "num_attention_heads": 4,
                    "image_size": 32, "patch_size": 8, "projection_dim": 32}


def build_random_clip_vision(config: dict = CLIP_VIT_L14_VISION, seed: int = 0):
    """A ``CLIPVisionModel`` with ``config`` and random weights, in memory."""
    require_diffusers()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    with quiet_libraries():
        return CLIPVisionModel(CLIPVisionConfig(**config)).eval().requires_grad_(False)


def save_tiny_clip_vision(folder: str | Path, seed: int = 0) -> Path:
    """A tiny CLIP vision tower (:data:`TINY_CLIP_VISION`: 16 layers, 32 px) ``save_pretrained`` to ``folder``; load
    it back with :func:`faceshield.diffusion.image_conditioning.load_clip_vision` (the users' loading code)."""
    folder = Path(folder)
    build_random_clip_vision(TINY_CLIP_VISION, seed).save_pretrained(folder)
    return folder


# stable-diffusion-v1-5 has the same unet/vae/text_encoder configs as v1-4 (768-d text, 8 heads): APL's base model.
SD15 = SD14
