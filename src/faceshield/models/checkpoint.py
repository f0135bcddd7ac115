"""PyTorch checkpoints in a public model's own key layout: read, check against our network, load; and the
deterministic random weights that validate our networks against their reference implementations.

Used by the networks whose weights the user supplies by path (:mod:`faceshield.models.fr.ir_se50`,
:mod:`faceshield.models.fr.facenet`, :mod:`faceshield.faces.parsing`): every key and shape of the file must match
ours, so a wrong file is refused with one line naming the file and the first mismatch instead of loading half a
network.
"""

from __future__ import annotations

import logging
import math
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from faceshield.errors import AssetError

log = logging.getLogger(__name__)

# Keys that PyTorch ≥ 0.4.1 adds to BatchNorm and older checkpoints lack: never required, never used by eval.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``path`` (a ``state_dict`` saved with ``torch.save``), loaded safely.

    Accepts a bare state dict or one under ``"state_dict"``, with or without a ``module.`` (DataParallel) prefix.

    Raises:
        AssetError: one line naming the file and what is wrong (missing, unreadable, not a state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: {what} weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise AssetError(f"{path}: cannot read it as a {what} PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AssetError(f"{path}: not a {what} state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_exact(network: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str,
                          ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``network`` requiring the same keys and shapes (BatchNorm's ``num_batches_tracked`` and
    keys starting with ``ignore_prefixes``, e.g. a classifier head we do not run, may be absent or extra).

    Raises:
        AssetError: one line naming ``path``, the first missing / unexpected / mis-shaped key and the counts.
    """
    ours = {k: v for k, v in network.state_dict().items() if not k.endswith(_OPTIONAL_SUFFIX)}
    theirs = {k: v for k, v in state.items()
              if not k.endswith(_OPTIONAL_SUFFIX) and not k.startswith(ignore_prefixes)}
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    shapes = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    if missing or extra or shapes:
        first = (f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}" if extra
                 else f"{shapes[0]!r} has shape {tuple(theirs[shapes[0]].shape)}, expected "
                      f"{tuple(ours[shapes[0]].shape)}")
        raise AssetError(f"{path}: not a {what} checkpoint: {first} ({len(missing)} missing, {len(extra)} "
                         f"unexpected, {len(shapes)} mis-shaped keys)")
    network.load_state_dict({k: v.to(ours[k].dtype) for k, v in theirs.items()}, strict=False)
    log.debug("loaded %d tensors of %s from %s", len(theirs), what, path)


def random_state_dict(layout: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights with the keys, shapes and dtypes of ``layout`` (a checkpoint's state dict),
    for validation against reference code.

    One ``torch.Generator`` seeded with ``seed`` draws the keys in sorted order (so the same seed gives the same
    tensors in any implementation with the same keys and shapes):

    * weights of ≥ 2 dims (conv, linear): normal, std ``sqrt(1 / fan_in)`` (activations keep their scale);
    * BatchNorm (a sibling ``running_mean`` exists): weight uniform [0.5, 1.5], bias normal·0.1, running_mean
      normal·0.1, running_var uniform [0.5, 1.5] (positive), ``num_batches_tracked`` 0;
    * other 1-dim weights (PReLU slopes): uniform [0.1, 0.3]; biases: normal·0.05.
    """
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(layout):
        ref = layout[key]
        prefix, _, leaf = key.rpartition(".")
        batchnorm = f"{prefix}.running_mean" in layout
        shape = ref.shape

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(shape, generator=generator)

        if leaf == "num_batches_tracked":
            out[key] = torch.zeros_like(ref)
            continue
        if leaf == "running_var" or (batchnorm and leaf == "weight"):
            value = uniform(0.5, 1.5)
        elif leaf == "running_mean" or (batchnorm and leaf == "bias"):
            value = 0.1 * torch.randn(shape, generator=generator)
        elif ref.ndim >= 2:
            value = torch.randn(shape, generator=generator) / math.sqrt(ref[0].numel())
        elif leaf == "weight":
            value = uniform(0.1, 0.3)
        else:
            value = 0.05 * torch.randn(shape, generator=generator)
        out[key] = value.to(ref.dtype)
    return out
