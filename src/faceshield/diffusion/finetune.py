"""Fine-tuning a Stable Diffusion on a few photos (DreamBooth / LoRA): the surrogate of ``aspl`` / ``haa`` and the
attacker of the customization harness. The only module that imports peft.

The loss is DreamBooth's: for images ``x`` with latents ``z₀`` and an instance prompt ``c``, draw ``t ~ U{0…T−1}``
and ``ε ~ N(0, I)``, ``z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε`` and minimise ``‖ε_θ(z_t, t, c) − ε‖²`` (the target is
``v = √ᾱ·ε − √(1−ᾱ)·z₀`` for v-prediction models), optionally plus ``prior_weight`` × the same loss on class
images (prior preservation).

Memory modes: ``lora`` adds rank-``lora_rank`` adapters to the UNet's attention projections (to_q, to_k, to_v,
to_out.0) through peft and trains only them; ``full`` trains the whole UNet (and the text encoder with
``train_text_encoder``). Trainable weights are kept in float32 (updates of lr 5e-7 vanish in bfloat16's 8-bit
mantissa) and the forward passes run under bfloat16 autocast on CUDA (``mixed_precision``); gradient
checkpointing and bitsandbytes' 8-bit AdamW (when importable on CUDA; otherwise plain AdamW, said once in the log)
cut memory further. Running out of device memory is one :class:`DeviceMemoryError` line saying what to change.

The model passed in is modified in place (adapters added, weights trained): load a fresh one
(:func:`faceshield.diffusion.loading.load_stable_diffusion`), never the shared cached model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from faceshield.diffusion.loading import StableDiffusion
from faceshield.errors import DiffusionModelError
from faceshield.settings import Settings, setting

log = logging.getLogger(__name__)

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
INSTANCE_PROMPT = "a photo of sks person"
CLASS_PROMPT = "a photo of person"


class DeviceMemoryError(DiffusionModelError):
    """The device ran out of memory while fine-tuning, protecting or generating."""


@dataclass
class FinetuneConfig(Settings):
    """Settings of one fine-tuning run (DreamBooth's loss); defaults: Anti-DreamBooth's evaluation (METHODS.md).

    Attributes:
        mode: ``lora`` (adapters on the UNet attention projections) or ``full`` (the whole UNet).
        lr: learning rate of ``full`` (5e-7, Anti-DreamBooth's DreamBooth); lora_lr: of ``lora`` (1e-4,
            diffusers' DreamBooth-LoRA example; the papers give none).
        lora_rank: adapter rank (4, diffusers' example); alpha = rank.
        weight_decay: AdamW's (1e-2, ASPL).
        batch_size: photos per step (2, Anti-DreamBooth's attack).
        train_text_encoder: ``full`` mode also trains the CLIP text encoder (ASPL and its attack do); ignored by
            ``lora`` (only the UNet gets adapters).
        instance_prompt: the prompt the photos are learned under.
        prior_weight: weight of prior preservation (0 = off); class_prompt: its prompt; class_images: how many
            class images the frozen model generates before training (Anti-DreamBooth: 200).
        gradient_checkpointing, mixed_precision (``auto`` = bfloat16 autocast on CUDA only), eight_bit_adam.
        max_grad_norm: gradient clipping (1.0, diffusers' DreamBooth).
    """

    mode: str = setting("lora", choices=("lora", "full"))
    lr: float = setting(5e-7, "(0, 1]")
    lora_lr: float = setting(1e-4, "(0, 1]")
    lora_rank: int = setting(4, "[1, 1024]")
    weight_decay: float = setting(1e-2, "[0, 1]")
    batch_size: int = setting(2, "[1, 64]")
    train_text_encoder: bool = True
    instance_prompt: str = INSTANCE_PROMPT
    prior_weight: float = setting(0.0, "[0, inf)")
    class_prompt: str = CLASS_PROMPT
    class_images: int = setting(200, "[1, 10000]")
    gradient_checkpointing: bool = True
    mixed_precision: str = setting("auto", choices=("auto", "bf16", "no"))
    eight_bit_adam: bool = True
    max_grad_norm: float = setting(1.0, "(0, inf)")


@contextlib.contextmanager
def memory_guard(what: str, device: torch.device) -> Iterator[None]:
    """Turn the device running out of memory during ``what`` into one :class:`DeviceMemoryError` line."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise DeviceMemoryError(
            f"out of memory on {device} while {what}; use the LoRA mode (mode=lora), keep gradient checkpointing "
            f"and bf16 on, lower the resolution or batch size, or use a GPU with more memory"
        ) from error


def noisy_latents(sd: StableDiffusion, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
    """``z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε`` per sample (``timesteps``: ``B`` long)."""
    a = sd.schedule.alphas_cumprod.to(latents.device)[timesteps.cpu()].to(latents.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def clean_prediction(sd: StableDiffusion, z_t: torch.Tensor, epsilon: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """The one-step estimate ``ẑ₀ = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t`` of the clean latents."""
    a = sd.schedule.alphas_cumprod.to(z_t.device)[timesteps.cpu()].to(z_t.dtype).view(-1, 1, 1, 1)
    return (z_t - (1 - a).sqrt() * epsilon) / a.sqrt()


def unet_epsilon(sd: StableDiffusion, z_t: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor,
                 autocast: bool = False) -> torch.Tensor:
    """The UNet's noise estimate ε̂ (float32) for per-sample ``timesteps``; v-prediction converted to ε."""
    device_type = z_t.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        dtype = torch.float32 if autocast else sd.unet.dtype  # float32 once `full` fine-tuning owns the weights
        out = sd.unet(z_t.to(dtype), timesteps.to(z_t.device), encoder_hidden_states=embeddings.to(dtype)).sample
    out = out.float()
    if sd.schedule.prediction_type == "epsilon":
        return out
    a = sd.schedule.alphas_cumprod.to(z_t.device)[timesteps.cpu()].float().view(-1, 1, 1, 1)
    return a.sqrt() * out + (1 - a).sqrt() * z_t.float()


def denoising_loss(sd: StableDiffusion, latents: torch.Tensor, embeddings: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ε-MSE ``mean‖ε̂(z_t, t, c) − ε‖²`` (``B``) and ε̂ (``B×4×h×w``), differentiable.

    For ε-prediction models this is DreamBooth's training loss exactly; for v-prediction models the MSE on ε
    equals the v-MSE times ``1/ᾱ_t`` per sample (same minimiser).
    """
    z_t = noisy_latents(sd, latents.float(), noise.float(), timesteps)
    epsilon = unet_epsilon(sd, z_t, timesteps, embeddings, autocast)
    return (epsilon - noise.float()).pow(2).mean(dim=(1, 2, 3)), epsilon


def draw_noise(sd: StableDiffusion, latents: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps B long, noise like latents)`` drawn on the CPU from ``generator`` (same on every device)."""
    steps = int(sd.schedule.alphas_cumprod.numel())
    t = torch.randint(0, steps, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, torch.float32)
    return t, noise


def _optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, eight_bit: bool,
               device: torch.device) -> torch.optim.Optimizer:
    if eight_bit and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        except ImportError:
            log.info("bitsandbytes is not installed: plain AdamW (pip install bitsandbytes for the 8-bit optimiser)")
    elif eight_bit:
        log.info("8-bit AdamW needs CUDA: plain AdamW on %s", device)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Finetuner:
    """Trains ``sd`` in place on photos under the instance prompt (DreamBooth loss, :class:`FinetuneConfig`).

    Args:
        sd: a freshly loaded model (modified in place).
        config: the settings.
    """

    def __init__(self, sd: StableDiffusion, config: FinetuneConfig | None = None):
        self.sd = sd
        self.config = cfg = config or FinetuneConfig()
        self.autocast = sd.device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")
        self.text_trained = cfg.mode == "full" and cfg.train_text_encoder
        if cfg.mode == "lora":
            from peft import LoraConfig

            if not getattr(sd.unet, "_faceshield_lora", False):
                lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                  target_modules=list(LORA_TARGETS))
                sd.unet.add_adapter(lora)
                sd.unet._faceshield_lora = True
            params = [p for n, p in sd.unet.named_parameters() if "lora_" in n]
            lr = cfg.lora_lr
        else:
            params = list(sd.unet.parameters())
            if self.text_trained:
                params += list(sd.text_encoder.parameters())
            lr = cfg.lr
        for p in params:  # float32 master weights; the frozen rest stays in the model's dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        self.params = params
        if cfg.gradient_checkpointing:
            sd.unet.enable_gradient_checkpointing()
            if self.text_trained:
                # transformers ≥ 5 renamed it (the old name warns); older versions only have the old one
                enable = getattr(sd.text_encoder, "activation_checkpointing_enable", None)
                (enable or sd.text_encoder.gradient_checkpointing_enable)()
        self.optimizer = _optimizer(params, lr, cfg.weight_decay, cfg.eight_bit_adam, sd.device)
        self.prior: torch.Tensor | None = None  # class-image latents for prior preservation
        self.steps_done = 0

    # --- state: the alternation's copy of the surrogate is a snapshot of the trainable weights, not a 2nd model
    def snapshot(self) -> dict:
        """The trainable weights and optimiser state (restored by :meth:`restore`)."""
        import copy

        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def restore(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])

    def embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings ``B×L×D``, with gradients to the text encoder when it is trained."""
        if not self.text_trained:
            return self.sd.encode_prompts(prompts)
        tok = self.sd.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.sd.tokenizer.model_max_length, return_tensors="pt")
        with torch.autocast(self.sd.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.sd.text_encoder(tok.input_ids.to(self.sd.device))[0].float()

    def prepare_prior(self, resolution: int, seed: int = 0) -> None:
        """Generate ``class_images`` class images with the model as it is now (before training), once."""
        cfg = self.config
        if cfg.prior_weight <= 0 or self.prior is not None:
            return
        from faceshield.diffusion.generation import generate

        latents = []
        with memory_guard("generating prior-preservation images", self.sd.device):
            for i in range(0, cfg.class_images, 4):
                n = min(4, cfg.class_images - i)
                images = generate(self.sd, [cfg.class_prompt] * n, steps=50, seed=seed + i, height=resolution,
                                  width=resolution)
                with torch.no_grad():
                    latents.append(self.sd.encode_images(images).float())
        self.prior = torch.cat(latents)
        log.info("prior preservation: %d class images of %r", len(self.prior), cfg.class_prompt)

    def step(self, latents: torch.Tensor, generator: torch.Generator) -> float:
        """One optimiser step on a batch of latents ``B×4×h×w``; returns the loss."""
        cfg, sd = self.config, self.sd
        with memory_guard("fine-tuning the diffusion model", sd.device):
            sd.unet.train()
            t, noise = draw_noise(sd, latents, generator)
            emb = self.embeddings([cfg.instance_prompt]).expand(latents.shape[0], -1, -1)
            loss = denoising_loss(sd, latents, emb, t, noise, self.autocast)[0].mean()
            if self.prior is not None:
                pick = torch.randint(0, len(self.prior), (latents.shape[0],), generator=generator)
                prior = self.prior[pick]
                tp, noise_p = draw_noise(sd, prior, generator)
                emb_p = self.embeddings([cfg.class_prompt]).expand(prior.shape[0], -1, -1)
                loss = loss + cfg.prior_weight * denoising_loss(sd, prior, emb_p, tp, noise_p, self.autocast)[0].mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sd.unet.eval()
        self.steps_done += 1
        return float(loss.detach())

    def train(self, latents: torch.Tensor, steps: int, generator: torch.Generator) -> list[float]:
        """``steps`` steps on ``latents`` (``N×4×h×w``), batches of ``batch_size`` cycling through a shuffled order
        drawn from ``generator``; returns the losses."""
        losses = []
        order = torch.randperm(len(latents), generator=generator)
        position = 0
        for _ in range(steps):
            pick = [order[(position + k) % len(order)] for k in range(min(self.config.batch_size, len(latents)))]
            position += len(pick)
            losses.append(self.step(latents[torch.stack(pick)], generator))
        return losses


def encode_for_training(sd: StableDiffusion, images: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """VAE latents (posterior mean, float32) of images ``N×3×H×W`` in [0, 1], without gradients."""
    with torch.no_grad(), memory_guard("encoding photos", sd.device):
        return torch.cat([sd.encode_images(images[i:i + batch]).float() for i in range(0, len(images), batch)])
