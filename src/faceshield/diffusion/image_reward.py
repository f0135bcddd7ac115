"""ImageReward (Xu et al. 2023, THUDM) in plain torch: a differentiable, text-conditioned image-quality reward.

ImageReward = BLIP's ViT (ViT-L/16 at 224 px) encoding the image, BLIP's BERT-base text encoder (``med_config.json``)
whose layers cross-attend to every image token, and an MLP (768→1024→128→64→16→1, no activations) on the text
encoder's first-token state; the reward is ``(MLP − 0.16717…) / 1.03334…``. The prompt is tokenised by
bert-base-uncased with BLIP's two added tokens (``[DEC]`` as bos, ``[ENC]``), padded to 35 tokens; ImageReward's
scoring keeps the tokenizer's ``[CLS]`` first (it does not swap in ``[ENC]`` as BLIP's ITM head does).

The modules below carry ``ImageReward.pt``'s own parameter names, so the checkpoint loads without a key map. Facts
taken from the ``image-reward`` 1.5 package (read, not copied; benchmarks/validate_image_reward.py checks the
scores and gradients against it): pre-norm ViT blocks, LayerNorm ε 1e-6, exact GELU, qkv with bias, learned
position embeddings of the 1 + (224/16)² tokens, final LayerNorm on every token; post-norm BERT layers with
LayerNorm ε from ``med_config`` (1e-12), absolute position ids ``0…L−1``, no token-type embeddings, padding keys
masked with −10000 in self-attention, no mask on the image tokens in cross-attention (keys/values from the ViT
width). Transformers' ``BlipTextModel`` is not used: it builds cross-attention only for decoders and its masks go
through version-dependent helpers; the small modules here pin the maths.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceshield.errors import DiffusionModelError

log = logging.getLogger(__name__)

REWARD_MEAN = 0.16717362830052426  # ImageReward's normalisation of the MLP output (its ImageReward.py)
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35  # prompt tokens, padded/truncated (ImageReward's score and score_gard)
VIT_HEAD_DIM = 64  # BLIP's ViTs: base 768/12, large 1024/16; the checkpoint has no head count
BERT_BASE = "bert-base-uncased"
_HOW = ("download THUDM/ImageReward's ImageReward.pt and med_config.json (same folder) and the bert-base-uncased "
        "tokenizer where there is internet, then pass reward_path=…/ImageReward.pt and reward_tokenizer=FOLDER")
# in the checkpoint, not used to score: BLIP's contrastive projections and the (recomputed) position ids
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head softmax attention of ``B×N×C`` queries on ``B×M×C`` keys/values; ``mask``: additive, ``B×1×1×M``."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c)


class _ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_attention(*self.qkv(x).chunk(3, dim=-1), self.heads))


class _ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _ViTAttention(dim, heads), _ViTMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class VisionTransformer(nn.Module):
    """BLIP's ViT: ``B×3×S×S`` normalised pixels → ``B×(1+(S/p)²)×D`` token states (class token first)."""

    def __init__(self, image_size: int = 224, patch: int = 16, dim: int = 1024, depth: int = 24,
                 heads: int = 16, hidden: int = 4096):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _BertSelf(nn.Module):
    def __init__(self, dim: int, kv_dim: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)


class _BertOutput(nn.Module):
    def __init__(self, dim_in: int, dim: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(dim_in, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self, self.output = _BertSelf(dim, kv_dim), _BertOutput(dim, dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        s = self.self
        return self.output(_attention(s.query(x), s.key(context), s.value(context), self.heads, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)


class _BertLayer(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = _BertAttention(dim, dim, heads, eps)
        self.crossattention = _BertAttention(dim, kv_dim, heads, eps)
        self.intermediate = _BertIntermediate(dim, hidden)
        self.output = _BertOutput(hidden, dim, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, None)  # every image token is attended (ImageReward's all-ones mask)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)


class _BertEncoder(nn.Module):
    def __init__(self, layers: list[_BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """BLIP's BERT with cross-attention to the image tokens (``med_config.json``; no pooler)."""

    def __init__(self, config: dict, image_width: int):
        super().__init__()
        dim, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
        self.heads = int(config["num_attention_heads"])
        self.embeddings = _BertEmbeddings(int(config["vocab_size"]), int(config["max_position_embeddings"]), dim, eps)
        self.encoder = _BertEncoder([_BertLayer(dim, image_width, self.heads, int(config["intermediate_size"]), eps)
                                     for _ in range(int(config["num_hidden_layers"]))])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Token states ``B×L×D`` of ``ids``/``mask`` (``B×L``, 1 = token, 0 = padding) given image tokens."""
        e = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(positions))
        additive = ((1.0 - mask.to(x.dtype)) * -10000.0)[:, None, None, :]  # BLIP's padding mask
        for layer in self.encoder.layer:
            x = layer(x, additive, image)
        return x


class ImageReward(nn.Module):
    """ImageReward: ``reward(ids, mask, pixels)`` → ``B`` for token ids/mask ``B×L`` and ``B×3×S×S`` pixels already
    normalised with CLIP's mean/std (ImageReward's ``score_gard`` inputs)."""

    def __init__(self, vision: VisionTransformer, text_config: dict):
        from faceshield.diffusion.rewards import AestheticMLP

        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = vision
        self.blip.text_encoder = TextEncoder(text_config, vision.cls_token.shape[-1])
        self.mlp = AestheticMLP(int(text_config["hidden_size"]))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        states = self.blip.text_encoder(ids, mask, self.blip.visual_encoder(pixels))
        return ((self.mlp(states[:, 0]) - REWARD_MEAN) / REWARD_STD).squeeze(-1)  # the first token's state


class ImageRewardScorer(nn.Module):
    """ImageReward's score ``B`` of images ``B×3×H×W`` float RGB in [0, 1] for one prompt, differentiable w.r.t.
    the pixels: CLIP's preprocessing (shorter side to 224, bicubic antialiased, centre crop, CLIP mean/std) in
    torch, then :class:`ImageReward`. ImageReward's PIL path also rounds the resized image to 8 bits."""

    def __init__(self, model: ImageReward, ids: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from faceshield.diffusion.rewards import clip_preprocess

        x = clip_preprocess(images.float(), self.model.blip.visual_encoder.image_size)
        n = len(x)
        return self.model(self.ids.expand(n, -1), self.mask.expand(n, -1), x)


def prompt_tokens(tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageReward's prompt tokens: ``(ids, attention mask)``, each ``1×35`` int64, with BLIP's added tokens
    (``[DEC]`` bos, ``[ENC]``) registered on ``tokenizer`` (a bert-base-uncased ``BertTokenizer``) first."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok = tokenizer(prompt, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return tok["input_ids"].long(), tok["attention_mask"].long()


def load_tokenizer(source: str = BERT_BASE):
    """bert-base-uncased's tokenizer from a folder, a hub id, or a ``vocab.txt`` file (lower-cased)."""
    from transformers import BertTokenizer

    from faceshield.diffusion.loading import load_component, offline

    path = Path(source).expanduser()
    if path.is_file():  # BERT's vocab.txt: one token a line, the id is the line number
        def from_vocab(src: str) -> BertTokenizer:
            lines = Path(src).read_text(encoding="utf-8").splitlines()
            return BertTokenizer(vocab={token: i for i, token in enumerate(lines)}, do_lower_case=True)

        return load_component(from_vocab, str(path), None, what="ImageReward tokenizer vocabulary", how=_HOW)
    return load_component(BertTokenizer.from_pretrained, str(source), None, what="ImageReward tokenizer (BERT)",
                          how=_HOW, local_files_only=path.is_dir() or offline())


def _read_med_config(path: Path) -> dict:
    if not path.is_file():
        raise DiffusionModelError(f"ImageReward's med_config.json not found beside the checkpoint ({str(path)!r}); "
                                  f"{_HOW}")
    try:
        config = json.loads(path.read_text())
        needed = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "layer_norm_eps",
                  "vocab_size", "max_position_embeddings")
        missing = [key for key in needed if key not in config]
    except (OSError, ValueError) as error:
        raise DiffusionModelError(f"cannot read ImageReward's {str(path)!r} ({type(error).__name__}); {_HOW}"
                                  ) from error
    if missing:
        raise DiffusionModelError(f"ImageReward's {str(path)!r} lacks {', '.join(missing)}; {_HOW}")
    if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise DiffusionModelError(f"ImageReward's {str(path)!r} is not BLIP's text encoder (hidden_act "
                                  f"{config.get('hidden_act')!r}, position_embedding_type "
                                  f"{config.get('position_embedding_type')!r}; expected gelu, absolute); {_HOW}")
    return config


def _vision_from_state(state: dict[str, torch.Tensor], where: str) -> VisionTransformer:
    """The ViT whose depth, width, patch and image size the checkpoint's shapes give (heads = width / 64)."""
    prefix = "blip.visual_encoder."
    try:
        width = state[prefix + "cls_token"].shape[-1]
        patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state[prefix + "pos_embed"].shape[1] - 1)
        hidden = state[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError) as error:
        raise DiffusionModelError(f"{where} has no BLIP ViT ({error} missing); is it THUDM/ImageReward's "
                                  f"ImageReward.pt? {_HOW}") from error
    depth = len({key.split(".")[3] for key in state if key.startswith(prefix + "blocks.")})
    return VisionTransformer(grid * patch, patch, width, depth, max(1, width // VIT_HEAD_DIM), hidden)


def load_image_reward_model(path: str | Path) -> ImageReward:
    """:class:`ImageReward` (eval mode, frozen, CPU, float32) from ``ImageReward.pt`` and the ``med_config.json``
    beside it; every failure is one :class:`~faceshield.errors.DiffusionModelError` line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DiffusionModelError(f"ImageReward checkpoint {str(path)!r} not found; {_HOW}")
    config = _read_med_config(path.with_name("med_config.json"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else None
        if not isinstance(state, dict):
            raise TypeError("not a state dict")
    except Exception as error:  # a wrong or corrupt file: torch/pickle raise many types
        raise DiffusionModelError(f"cannot load ImageReward checkpoint {str(path)!r} ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0][:150] if str(error) else ''}); {_HOW}") from error
    where = f"ImageReward checkpoint {str(path)!r}"
    model = ImageReward(_vision_from_state(state, where), config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DiffusionModelError(f"{where} lacks {len(missing)} weights for med_config.json's text encoder "
                                  f"({', '.join(missing[:3])}…); checkpoint and med_config.json must come together")
    wrong = [f"{key} {tuple(state[key].shape)} ≠ {tuple(value.shape)}" for key, value in expected.items()
             if state[key].shape != value.shape]
    if wrong:
        raise DiffusionModelError(f"{where} does not match med_config.json ({wrong[0]}"
                                  f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}); {_HOW}")
    extra = sorted(key for key in set(state) - set(expected) if not _UNUSED.search(key))
    if extra:  # the reference loads non-strictly too
        log.warning("%s: %d weights not used by ImageReward (%s…)", where, len(extra), ", ".join(extra[:3]))
    model.load_state_dict({key: state[key].float() for key in expected})
    return model.eval().requires_grad_(False)


def load_image_reward(path: str | Path, prompt: str, tokenizer: str = BERT_BASE,
                      device: str | torch.device = "cpu") -> ImageRewardScorer:
    """ImageReward scorer for ``prompt``: checkpoint ``path`` (``ImageReward.pt``, ``med_config.json`` beside it)
    and the bert-base-uncased tokenizer (folder, hub id or ``vocab.txt``)."""
    model = load_image_reward_model(path)
    tok = load_tokenizer(tokenizer)
    ids, mask = prompt_tokens(tok, prompt)
    vocab = model.blip.text_encoder.embeddings.word_embeddings.num_embeddings
    # bert-base-uncased's 30522 + [DEC], [ENC] = the checkpoint's 30524 rows; also catches transformers' silent
    # fallback to a 5-token default vocabulary when a tokenizer's files are not found
    if len(tok) != vocab:
        raise DiffusionModelError(f"ImageReward tokenizer {tokenizer!r} has {len(tok)} tokens with BLIP's [DEC] and "
                                  f"[ENC] but the checkpoint has {vocab} token embeddings; use bert-base-uncased's "
                                  f"tokenizer (reward_tokenizer=FOLDER or vocab.txt)")
    return ImageRewardScorer(model, ids, mask).to(device)
