"""Loading Stable Diffusion 1.x/2.x (hub id or diffusers folder) into a :class:`StableDiffusion`.

Everything else in faceshield sees a :class:`StableDiffusion` with plain-tensor methods (encode / decode images,
encode prompts, predict noise, DDIM timesteps). Any loading failure is one :class:`DiffusionModelError` line that
says how to provide the model; hub downloads happen only for a hub id that is not cached yet.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from faceshield.diffusion.hub import SD2_BASE_ID
from faceshield.diffusion.attention import record_self_attention, self_attention_layers
from faceshield.diffusion.schedule import NoiseSchedule
from faceshield.errors import DiffusionModelError, ShapeError

log = logging.getLogger(__name__)

DEFAULT_MODEL = SD2_BASE_ID
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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


def offline() -> bool:
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
        return self_attention_layers(self.unet)

    def record_self_attention(self, layers: Sequence[str] = (), max_tokens: int = 32 * 32):
        """:func:`faceshield.diffusion.attention.record_self_attention` on this model's UNet."""
        return record_self_attention(self.unet, layers, max_tokens)


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
def quiet_libraries() -> Iterator[None]:
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


def load_component(load, source: str, subfolder: str | None, *, what: str = "Stable Diffusion",
                   how: str | None = None, **kwargs):
    """``load(source, subfolder=…, **kwargs)`` (a ``from_pretrained`` or ``load_config``), any failure → one line.

    Args:
        what: the model's kind in the message (``"the DDPM"``, ``"CLIP vision model"``…).
        how: how to provide the model (default: Stable Diffusion's download advice).
    """
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    try:
        with quiet_libraries(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load(source, **kwargs)
    except Exception as error:  # diffusers/transformers/hub raise many types; the user needs one message
        if kwargs.get("local_files_only") and not Path(source).is_dir():
            reason = "not in the Hugging Face cache, and downloads are off (FACESHIELD_OFFLINE / HF_HUB_OFFLINE)"
        elif _network_failure(error):
            reason = "the Hugging Face hub cannot be reached"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        part = f"the {subfolder} of " if subfolder else ""
        raise DiffusionModelError(
            f"cannot load {part}{what} {source!r} ({reason[:200]}); {how or _how_to_provide(source)}"
        ) from error


def resolve_source(source: str | Path, what: str, how: str) -> tuple[str, bool]:
    """``(source, local)``: an existing folder (``~`` expanded; ``local`` True) or a hub id ``owner/name``.

    Anything else (a path that is not a folder: absolute, ``./…``, ``~/…``, or not of the form ``owner/name``) is
    one :class:`DiffusionModelError` line: ``"<what> folder '…' does not exist; <how>"``.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), True
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise DiffusionModelError(f"{what} folder {source!r} does not exist; {how}")
    return source, False


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

    source, local = resolve_source(source, "Stable Diffusion", _how_to_provide(str(source)))
    if local:
        missing = [c for c in COMPONENTS if not (Path(source) / c).is_dir()]
        if missing:
            raise DiffusionModelError(f"{source}: not a diffusers Stable Diffusion folder, missing "
                                      f"{', '.join(missing)}; {_how_to_provide(source)}")
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    # A hub id already in the Hugging Face cache loads without any network request (no update checks).
    cached = local or offline() or in_hub_cache(source, revision)
    if not cached:
        log.warning("downloading Stable Diffusion %s from the Hugging Face hub (several GB, once)", source)
    hub = {"local_files_only": cached, "revision": revision}
    unet = load_component(UNet2DConditionModel.from_pretrained, source, "unet", torch_dtype=torch_dtype, **hub)
    vae = load_component(AutoencoderKL.from_pretrained, source, "vae", torch_dtype=torch_dtype, **hub)
    text_encoder = load_component(CLIPTextModel.from_pretrained, source, "text_encoder", dtype=torch_dtype, **hub)
    tokenizer = load_component(CLIPTokenizer.from_pretrained, source, "tokenizer", **hub)
    scheduler_config = dict(load_component(DDIMScheduler.load_config, source, "scheduler", **hub))
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    log.info("loaded Stable Diffusion %s (%s, %s)", source, device, torch_dtype)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler_config,
                           NoiseSchedule.from_scheduler_config(scheduler_config), source, device, torch_dtype)


SD_CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")


def in_hub_cache(repo_id: str, revision: str | None, files: Sequence[str] = SD_CONFIG_FILES) -> bool:
    """Whether every file in ``files`` (default: a Stable Diffusion's component configs) of ``repo_id`` is in the
    local Hugging Face cache, so that loading it makes no network request."""
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in files)


@functools.lru_cache(maxsize=2)
def cached_stable_diffusion(source: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "auto") -> StableDiffusion:
    """:func:`load_stable_diffusion`, loaded once per process (the weights are frozen, so sharing is safe)."""
    return load_stable_diffusion(source, device, dtype)
