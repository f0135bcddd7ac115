"""Self-attention maps recorded through diffusers' processor API (``unet.set_attn_processor``).

Never by matching class names (the public adversarial-latent code's hook silently records nothing on newer
diffusers), and a run that needed maps but recorded none raises instead of computing a zero loss.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from faceshield.errors import DiffusionModelError


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the self-attention modules (``…attn1``) of a diffusers UNet, in call order."""
    return [name.removesuffix(".processor") for name in unet.attn_processors if ".attn1." in name]


@contextlib.contextmanager
def record_self_attention(unet: torch.nn.Module, layers: Sequence[str] = (), max_tokens: int = 32 * 32
                          ) -> Iterator["SelfAttentionRecorder"]:
    """Record the attention probabilities of self-attention layers while inside the ``with`` block.

    Args:
        layers: name prefixes selecting layers (e.g. ``("up_blocks",)``); empty = every self-attention layer.
        max_tokens: skip layers with more query tokens than this (the authors record ≤ 32² to bound memory).

    Yields:
        the recorder; its processors are removed (the previous ones restored) on exit.
    """
    chosen = [n for n in self_attention_layers(unet) if not layers or n.startswith(tuple(layers))]
    if not chosen:
        raise DiffusionModelError(
            f"no self-attention layer matches {list(layers)}; layers are e.g. {self_attention_layers(unet)[:3]}")
    recorder = SelfAttentionRecorder(chosen, max_tokens)
    previous = unet.attn_processors
    processors = dict(previous)
    for name in chosen:
        processors[f"{name}.processor"] = _RecordingProcessor(recorder, name)
    unet.set_attn_processor(processors)
    try:
        yield recorder
    finally:
        unet.set_attn_processor(previous)




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
