"""The one module that touches diffusers and transformers: loading, the tiny test model, attention processors.

Everything else in faceshield sees a :class:`StableDiffusion` with plain-tensor methods (encode / decode images,
encode prompts, predict noise, DDIM timesteps) and :class:`SelfAttentionRecorder`. When diffusers changes, this
file and its tests (``tests/test_diffusion.py``) are what to update.

Attention maps are recorded through diffusers' processor API (``unet.set_attn_processor``), never by matching
class names, and a run that needed maps but recorded none raises instead of computing a zero loss.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from faceshield.diffusion.schedule import NoiseSchedule
from faceshield.errors import FaceshieldError, ShapeError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class DiffusionModelError(FaceshieldError):
    """A Stable Diffusion model cannot be loaded or used."""


def _how_to_provide(source: str) -> str:
    return (f"download it where there is internet (`hf download {DEFAULT_MODEL} --local-dir sd2-base`) and pass "
            f"--diffusion-model /path/to/folder (diffusers layout: {', '.join(COMPONENTS)})")


def require_diffusers() -> None:
    """Raise a one-line error naming the install command when diffusers or transformers is missing."""
    import importlib.util

    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise DiffusionModelError(f"the diffusion methods need {' and '.join(missing)}: "
                                  f"pip install 'faceshield[diffusion]'")


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("FACESHIELD_OFFLINE", "HF_HUB_OFFLINE"))


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere (CPU half precision is slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    names = {"float64": torch.float64, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise DiffusionModelError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16, float16 or float64")
    return names[dtype]


@dataclass
class StableDiffusion:
    """A loaded Stable Diffusion 1.x/2.x model (frozen, eval mode) behind plain-tensor methods.

    Images are ``B×3×H×W`` float RGB in [0, 1]; latents ``B×4×H/8×W/8`` (already times the VAE scaling
    factor); prompt embeddings ``B×L×D``.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    schedule: NoiseSchedule
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def timesteps(self, num_steps: int) -> list[int]:
        """The model's own DDIM timesteps for ``num_steps`` sampling steps, noisiest first."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps)
        return [int(t) for t in scheduler.timesteps]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of ``images`` (the mean of the VAE posterior: deterministic), scaled for the UNet."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ShapeError(f"expected images B×3×H×W, got {tuple(images.shape)}")
        f = self.vae_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ShapeError(f"image sides must be multiples of {f}, got {tuple(images.shape[-2:])}")
        posterior = self.vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent_dist
        return posterior.mean * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (float32) from latents; differentiable."""
        images = self.vae.decode(latents.to(self.dtype) / self.latent_scale).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``B×L×D`` for ``prompts`` (padded to the tokenizer's length)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            return self.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)

    def predict_noise(self, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's noise estimate ε for ``latents`` at ``timestep`` (v-prediction models converted to ε)."""
        output = self.unet(latents.to(self.dtype), timestep, encoder_hidden_states=embeddings.to(self.dtype)).sample
        return self.schedule.to_epsilon(output, latents, timestep)

    def self_attention_layers(self) -> list[str]:
        """Names of the UNet's self-attention modules (``…attn1``), in call order."""
        return [name.removesuffix(".processor") for name in self.unet.attn_processors if ".attn1." in name]

    @contextlib.contextmanager
    def record_self_attention(self, layers: Sequence[str] = (), max_tokens: int = 32 * 32
                              ) -> Iterator["SelfAttentionRecorder"]:
        """Record the attention probabilities of self-attention layers while inside the ``with`` block.

        Args:
            layers: name prefixes selecting layers (e.g. ``("up_blocks",)``); empty = every self-attention layer.
            max_tokens: skip layers with more query tokens than this (the authors record ≤ 32² to bound memory).

        Yields:
            the recorder; its processors are removed (the previous ones restored) on exit.
        """
        chosen = [n for n in self.self_attention_layers() if not layers or n.startswith(tuple(layers))]
        if not chosen:
            raise DiffusionModelError(
                f"no self-attention layer matches {list(layers)}; layers are e.g. {self.self_attention_layers()[:3]}")
        recorder = SelfAttentionRecorder(chosen, max_tokens)
        previous = self.unet.attn_processors
        processors = dict(previous)
        for name in chosen:
            processors[f"{name}.processor"] = _RecordingProcessor(recorder, name)
        self.unet.set_attn_processor(processors)
        try:
            yield recorder
        finally:
            self.unet.set_attn_processor(previous)


class SelfAttentionRecorder:
    """Attention probabilities ``B×heads×Q×K`` recorded by the chosen layers, in call order."""

    def __init__(self, layers: list[str], max_tokens: int):
        self.layers = layers
        self.max_tokens = max_tokens
        self.maps: list[torch.Tensor] = []

    def take(self) -> list[torch.Tensor]:
        """The maps recorded since the last call (and forget them); raises if there are none."""
        maps, self.maps = self.maps, []
        if not maps:
            raise DiffusionModelError(
                f"no self-attention map was recorded on {len(self.layers)} layer(s) (e.g. {self.layers[0]}): the "
                f"UNet did not call faceshield's attention processor, or every layer has more than "
                f"{self.max_tokens} tokens; the structure loss would silently be 0")
        return maps


class _RecordingProcessor:
    """Plain scaled-dot-product attention that also hands its probabilities to a recorder.

    Supports what Stable Diffusion's transformer blocks use (3-D hidden states, no mask, no group/spatial norm);
    anything else is an error rather than a silently different computation.
    """

    def __init__(self, recorder: SelfAttentionRecorder, name: str):
        self.recorder = recorder
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if hidden_states.ndim != 3 or attention_mask is not None or encoder_hidden_states is not None:
            raise DiffusionModelError(f"{self.name}: the recording processor handles plain 3-D self-attention only")
        if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None:
            raise DiffusionModelError(f"{self.name}: attention with group/spatial norm is not supported for recording")
        residual = hidden_states
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        if n > self.recorder.max_tokens:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        else:
            # Softmax in at least float32: bf16 probabilities are too coarse for an MSE between two maps.
            precise = torch.promote_types(q.dtype, torch.float32)
            probs = (q.to(precise) @ k.to(precise).transpose(-1, -2) * attn.scale).softmax(dim=-1)
            self.recorder.maps.append(probs)
            out = probs.to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ------------------------------------------------------------------------------------------------ loading


def _network_failure(error: BaseException | None) -> bool:
    """Whether a connection/DNS/timeout error is anywhere in the exception chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if "Connect" in type(error).__name__ or "Timeout" in type(error).__name__ or isinstance(error, ConnectionError):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence diffusers' and transformers' progress bars and advice while loading (our logger says what matters)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # one retry warning per second without network
    try:
        yield
    finally:
        hub_logger.setLevel(hub_level)
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _load_component(load, source: str, subfolder: str, **kwargs):
    """``load(source, subfolder=…, **kwargs)`` (a ``from_pretrained`` or ``load_config``), any failure → one line."""
    try:
        with _quiet_libraries(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load(source, subfolder=subfolder, **kwargs)
    except Exception as error:  # diffusers/transformers/hub raise many types; the user needs one message
        if kwargs.get("local_files_only") and not Path(source).is_dir():
            reason = "not in the Hugging Face cache, and downloads are off (FACESHIELD_OFFLINE / HF_HUB_OFFLINE)"
        elif _network_failure(error):
            reason = "the Hugging Face hub cannot be reached"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiffusionModelError(
            f"cannot load the {subfolder} of Stable Diffusion {source!r} ({reason[:200]}); {_how_to_provide(source)}"
        ) from error


def load_stable_diffusion(source: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype = "auto", revision: str | None = None) -> StableDiffusion:
    """Load a Stable Diffusion 1.x/2.x model by hub id or local folder (diffusers layout), frozen and in eval mode.

    Args:
        source: hub id (e.g. ``stabilityai/stable-diffusion-2-base``) or a folder with ``unet/ vae/
            text_encoder/ tokenizer/ scheduler/``.
        device: where to run.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU) or a dtype name.
        revision: hub revision (a commit hash pins the exact weights).

    Hub downloads happen only for a hub id that is not cached yet, and never with ``FACESHIELD_OFFLINE=1`` or
    ``HF_HUB_OFFLINE=1``. Any failure raises one :class:`DiffusionModelError` line saying how to provide the model.
    """
    require_diffusers()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = str(source)
    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and (path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1):
        raise DiffusionModelError(f"Stable Diffusion folder {source!r} does not exist; {_how_to_provide(source)}")
    if local:
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise DiffusionModelError(f"{source}: not a diffusers Stable Diffusion folder, missing "
                                      f"{', '.join(missing)}; {_how_to_provide(source)}")
        source = str(path)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    # A hub id already in the Hugging Face cache loads without any network request (no update checks).
    cached = local or _offline() or _in_hub_cache(source, revision)
    if not cached:
        log.warning("downloading Stable Diffusion %s from the Hugging Face hub (several GB, once)", source)
    hub = {"local_files_only": cached, "revision": revision}
    unet = _load_component(UNet2DConditionModel.from_pretrained, source, "unet", torch_dtype=torch_dtype, **hub)
    vae = _load_component(AutoencoderKL.from_pretrained, source, "vae", torch_dtype=torch_dtype, **hub)
    text_encoder = _load_component(CLIPTextModel.from_pretrained, source, "text_encoder", dtype=torch_dtype, **hub)
    tokenizer = _load_component(CLIPTokenizer.from_pretrained, source, "tokenizer", **hub)
    scheduler_config = dict(_load_component(DDIMScheduler.load_config, source, "scheduler", **hub))
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    log.info("loaded Stable Diffusion %s (%s, %s)", source, device, torch_dtype)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler_config,
                           NoiseSchedule.from_scheduler_config(scheduler_config), source, device, torch_dtype)


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether every component's config of ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    files = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
    return all(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in files)


@functools.lru_cache(maxsize=2)
def cached_stable_diffusion(source: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "auto") -> StableDiffusion:
    """:func:`load_stable_diffusion`, loaded once per process (the weights are frozen, so sharing is safe)."""
    return load_stable_diffusion(source, device, dtype)


# --------------------------------------------------------------------------- models with random weights

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
    with _quiet_libraries():
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
