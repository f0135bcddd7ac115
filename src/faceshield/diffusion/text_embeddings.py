"""Learnable token embeddings under a placeholder token (APL's prompt prefix), in diffusers' textual-inversion format.

A prefix of ``N`` vectors (``N×D``, ``D`` = the text encoder's hidden width, 768 for SD 1.x) lives under one
placeholder word, ``alz`` by default. As in diffusers' multi-vector textual inversion, the word stands for the
``N`` tokens ``alz alz_1 … alz_{N−1}``: :meth:`PromptPrefix.apply` turns ``"a photo of X"`` into
``"alz alz_1 … alz_9 a photo of X"``, exactly what ``pipe.maybe_convert_prompt("alz a photo of X")`` gives after
``pipe.load_textual_inversion(file)``.

The file is a safetensors file with one tensor ``{token: N×D float32}`` (the layout diffusers writes and reads; a
single ``emb_params`` key is read too), so that stock diffusers loads it with
``pipe.load_textual_inversion("prefix.safetensors")`` (or ``token=…`` to rename it), into any SD 1.x pipeline.

For training, :meth:`PromptPrefix.encode` runs the frozen text encoder with gradients reaching the prefix vectors
only: a forward hook on the token-embedding layer swaps the placeholder rows for the (differentiable) vectors, so
the text encoder's own weights are never touched or trained.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from faceshield.diffusion.loading import StableDiffusion
from faceshield.errors import FaceshieldError
from faceshield.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "alz"
FORMAT = "faceshield-apl-prefix/1"


class PrefixFileError(FaceshieldError):
    """A prompt-prefix file is missing, unreadable, or does not fit the model."""


def expanded_tokens(token: str, count: int) -> list[str]:
    """The tokens a ``count``-vector embedding under ``token`` occupies: ``[token, token_1, …]`` (diffusers' rule)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


class PromptPrefix(torch.nn.Module):
    """``N×D`` learnable token embeddings under one placeholder token.

    Args:
        vectors: ``N×D`` float, kept as a float32 parameter (the only thing APL trains).
        token: the placeholder word; must not be a word of the model's tokenizer.
    """

    def __init__(self, vectors: torch.Tensor, token: str = DEFAULT_TOKEN):
        super().__init__()
        if vectors.ndim != 2 or vectors.shape[0] < 1:
            raise PrefixFileError(f"a prompt prefix is N×D vectors, got shape {tuple(vectors.shape)}")
        if not re.fullmatch(r"[A-Za-z0-9<>*_-]+", token):
            raise PrefixFileError(f"placeholder token {token!r}: use one word of letters, digits, <>*_-")
        self.token = token
        self.vectors = torch.nn.Parameter(vectors.detach().float().clone())

    @classmethod
    def uniform(cls, count: int, width: int, token: str = DEFAULT_TOKEN, seed: int = 0) -> "PromptPrefix":
        """Vectors drawn uniformly from [0, 1) (the authors' initialisation)."""
        generator = torch.Generator().manual_seed(seed)
        return cls(torch.rand(count, width, generator=generator), token)

    @property
    def tokens(self) -> list[str]:
        return expanded_tokens(self.token, self.vectors.shape[0])

    def expand(self, prompt: str) -> str:
        """``prompt`` with each whole-word placeholder replaced by the ``N`` tokens (diffusers' multi-vector rule)."""
        return re.sub(rf"(?<![\w<>*-]){re.escape(self.token)}(?![\w<>*-])", " ".join(self.tokens), prompt)

    def apply(self, prompt: str) -> str:
        """The prompt with the prefix in front, expanded: ``"alz alz_1 … alz_{N−1} " + prompt``."""
        return self.expand(f"{self.token} {prompt}".strip())

    # --- the model side -------------------------------------------------------------------------------------
    def install(self, sd: StableDiffusion) -> list[int]:
        """Add the placeholder tokens to ``sd``'s tokenizer (once), grow the text encoder's token embeddings, and
        write the current vectors into their rows, so that plain prompt encoding (``sd.encode_prompts``, the
        generation code) sees the prefix. Returns the token ids. Installing again (a newer prefix, same token)
        just overwrites the rows."""
        tokenizer, encoder = sd.tokenizer, sd.text_encoder
        table = encoder.get_input_embeddings()
        if self.vectors.shape[1] != table.weight.shape[1]:
            raise PrefixFileError(f"the prefix has {self.vectors.shape[1]}-d vectors but the text encoder of "
                                  f"{sd.source or 'the model'} takes {table.weight.shape[1]}-d tokens; a prefix "
                                  "trained on SD 1.x (768) fits SD 1.x models only")
        added = getattr(tokenizer, "added_tokens_encoder", {})
        vocab = tokenizer.get_vocab()
        new = [t for t in self.tokens if t not in added]
        clash = [t for t in new if t in vocab]
        if clash:
            raise PrefixFileError(f"placeholder token {clash[0]!r} is already a word of the tokenizer; "
                                  "choose another token (--token)")
        if new:
            tokenizer.add_tokens(new)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are ours
            encoder.requires_grad_(False)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if len(set(ids)) != len(ids) or max(ids) >= encoder.get_input_embeddings().weight.shape[0]:
            raise PrefixFileError(f"the tokenizer of {sd.source or 'the model'} did not add {self.token!r} as "
                                  f"{len(ids)} distinct tokens")
        self.sync(sd)
        return ids

    @torch.no_grad()
    def sync(self, sd: StableDiffusion) -> None:
        """Write the current vectors into the installed tokens' rows of the text encoder (after training steps)."""
        ids = sd.tokenizer.convert_tokens_to_ids(self.tokens)
        weight = sd.text_encoder.get_input_embeddings().weight
        weight[ids] = self.vectors.detach().to(weight)

    @contextmanager
    def _substituted(self, sd: StableDiffusion, ids: torch.Tensor) -> Iterator[None]:
        """While open, the token-embedding layer returns the differentiable vectors at the placeholder positions."""
        table = sd.text_encoder.get_input_embeddings()

        def hook(module, inputs, output):
            input_ids = inputs[0]
            where = (input_ids[..., None] == ids).to(output.device)  # B×L×N
            if not bool(where.any()):
                return output
            vectors = self.vectors.to(output.device, output.dtype)
            swapped = where.to(output.dtype) @ vectors  # each placeholder position gets its own vector
            return torch.where(where.any(-1, keepdim=True), swapped, output)

        handle = table.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, sd: StableDiffusion, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``B×L×D`` of already expanded ``prompts`` (see :meth:`apply`), with gradients
        to the prefix vectors only (the text encoder stays frozen). Call :meth:`install` first."""
        tokens = sd.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=sd.tokenizer.model_max_length, return_tensors="pt")
        ids = torch.tensor(sd.tokenizer.convert_tokens_to_ids(self.tokens), device=sd.device)
        with self._substituted(sd, ids):
            return sd.text_encoder(tokens.input_ids.to(sd.device))[0].to(sd.dtype)

    # --- the file -------------------------------------------------------------------------------------------
    def to_bytes(self, metadata: dict | None = None) -> bytes:
        """The safetensors bytes ``{token: N×D float32}`` with string metadata (``format``, ``token``, and
        ``metadata`` as JSON under ``faceshield``)."""
        from safetensors.torch import save

        info = {"format": FORMAT, "token": self.token, "vectors": str(self.vectors.shape[0]),
                "width": str(self.vectors.shape[1])}
        if metadata:
            info["faceshield"] = json.dumps(metadata, sort_keys=True, default=str)
        return save({self.token: self.vectors.detach().float().cpu().contiguous()}, metadata=info)

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write the prefix to ``path`` atomically (loadable by ``pipe.load_textual_inversion(path)``)."""
        return write_bytes_atomic(path, self.to_bytes(metadata))

    @classmethod
    def load(cls, path: str | Path, token: str | None = None) -> "PromptPrefix":
        """Read a prefix file (ours, or any one-tensor textual-inversion safetensors file); ``token`` renames it."""
        path = Path(path)
        if not path.is_file():
            raise PrefixFileError(f"prompt prefix {path} not found; train one with `faceshield apl train DATA -o "
                                  f"{path.name}`")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                info = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in keys}
        except Exception as error:  # safetensors raises several types for a damaged file
            raise PrefixFileError(f"prompt prefix {path} is not a safetensors file ({error}); "
                                  "pass the .safetensors file `faceshield apl train` wrote") from error
        if len(tensors) != 1:
            raise PrefixFileError(f"prompt prefix {path} holds {len(tensors)} tensors ({', '.join(keys[:4])}); "
                                  "expected one textual-inversion embedding")
        name, vectors = next(iter(tensors.items()))
        if vectors.ndim == 1:
            vectors = vectors[None]
        stored = info.get("token") or (name if name != "emb_params" else DEFAULT_TOKEN)
        return cls(vectors, token or stored)

    @staticmethod
    def file_metadata(path: str | Path) -> dict:
        """The ``faceshield`` JSON metadata of a prefix file ({} when absent)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("faceshield")
        return json.loads(text) if text else {}


def load_prefix_into(sd: StableDiffusion, path: str | Path, token: str | None = None) -> PromptPrefix:
    """Load a prefix file and install it into ``sd`` (one-line errors for a missing or unfitting file)."""
    prefix = PromptPrefix.load(path, token)
    prefix.install(sd)
    log.info("prompt prefix %s: %d vectors under %r", path, prefix.vectors.shape[0], prefix.token)
    return prefix
