"""Run MXNet models (``*-symbol.json`` + ``*-NNNN.params``) as differentiable PyTorch modules, without mxnet.

Two parts:

* :func:`read_ndarray_list` reads the binary ``.params`` file that ``mx.nd.save`` / ``Module.save_checkpoint``
  write (MXNet's ``NDArray::Save`` list format, ``src/ndarray/ndarray.cc``), with numpy only:

  - header: ``uint64`` magic ``0x112``, ``uint64`` reserved, ``uint64`` number of arrays;
  - each array: ``uint32`` magic ``0xF993FAC9`` (V2: then ``int32`` storage type, 0 = dense) or ``0xF993FAC8``
    (V1: no storage type), the shape as ``int32`` ndim + ``int64`` dims, the context (``int32`` device type,
    ``int32`` device id), ``int32`` dtype flag (0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8,
    6 int64) and the raw little-endian data. Files older than V1 start each array with a ``uint32`` ndim and
    ``uint32`` dims instead of a magic;
  - then ``uint64`` number of names and, for each, ``uint64`` length + UTF-8 bytes (``arg:…`` for weights,
    ``aux:…`` for BatchNorm running statistics).

* :class:`MXNetGraph` evaluates the symbol's nodes (the JSON lists them in topological order) with PyTorch ops,
  NCHW like MXNet itself. Only the ops face-recognition networks use are implemented (:data:`SUPPORTED_OPS`);
  any other op fails at load time, naming the op, the node and the file. Operator semantics and defaults are
  MXNet 1.x's (``src/operator/``): notably ``BatchNorm`` has ``eps = 1e-3`` and ``fix_gamma = True`` unless the
  node says otherwise (a fixed gamma is 1 whatever the file stores), and ``FullyConnected`` flattens its input.

Weights are buffers, not parameters (nothing here is trained); the graph is differentiable with respect to its
input, and ``module.double()`` runs it in float64.
"""

from __future__ import annotations

import inspect
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceshield.errors import FaceshieldError, ShapeError

log = logging.getLogger(__name__)

__all__ = ["MXNetGraph", "MXNetError", "UnsupportedMXNetOpError", "SUPPORTED_OPS", "read_ndarray_list",
           "load_mxnet_graph"]

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}


class MXNetError(FaceshieldError):
    """An MXNet symbol or params file cannot be read or run."""


class UnsupportedMXNetOpError(MXNetError, NotImplementedError):
    """The symbol uses an op (or an op variant) that this executor does not implement."""


# --- .params ----------------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise MXNetError(f"{self.path}: truncated at byte {self.pos} (file has {len(self.data)} bytes)")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values if len(values) > 1 else values[0]

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        nbytes = dtype.itemsize * count
        if self.pos + nbytes > len(self.data):
            raise MXNetError(f"{self.path}: truncated array data at byte {self.pos}")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += nbytes
        return out


def _read_ndarray(r: _Reader, index: int) -> np.ndarray | None:
    magic = r.take("<I")
    if magic in (V1_MAGIC, V2_MAGIC):
        if magic == V2_MAGIC:
            stype = r.take("<i")
            if stype != 0:
                raise MXNetError(f"{r.path}: array {index} has sparse storage type {stype}; only dense is supported")
        ndim = r.take("<i")
        shape = tuple(r.take(f"<{ndim}q")) if ndim > 1 else ((r.take("<q"),) if ndim == 1 else ())
    else:  # legacy: the first word is ndim, dims are uint32
        ndim = magic
        if ndim > 32:
            raise MXNetError(f"{r.path}: array {index}: unknown NDArray magic {magic:#x}")
        shape = tuple(r.take(f"<{ndim}I")) if ndim > 1 else ((r.take("<I"),) if ndim == 1 else ())
    if ndim <= 0:
        return None  # MXNet writes an empty (none) array as ndim 0 and nothing else
    r.take("<ii")  # context: device type, device id (irrelevant once on disk)
    flag = r.take("<i")
    if flag not in _DTYPES:
        raise MXNetError(f"{r.path}: array {index} has unknown dtype flag {flag}")
    dtype = np.dtype(_DTYPES[flag]).newbyteorder("<")
    return r.array(dtype, int(np.prod(shape))).astype(dtype.newbyteorder("=")).reshape(shape)


def read_ndarray_list(path: Path | str) -> dict[str, np.ndarray]:
    """Read an MXNet ``.params`` / ``mx.nd.save`` file: ``{name: array}`` (names keep their ``arg:``/``aux:`` prefix).

    Raises:
        MXNetError: not an NDArray list, truncated, sparse or of an unknown dtype (one line naming the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MXNetError(f"cannot read MXNet params file {path}: {exc}") from exc
    r = _Reader(data, path)
    magic, _reserved = r.take("<QQ")
    if magic != LIST_MAGIC:
        raise MXNetError(f"{path}: not an MXNet NDArray file (magic {magic:#x}, expected {LIST_MAGIC:#x})")
    count = r.take("<Q")
    arrays = [_read_ndarray(r, i) for i in range(count)]
    n_names = r.take("<Q")
    names = []
    for _ in range(n_names):
        length = r.take("<Q")
        names.append(r.array(np.dtype(np.uint8), length).tobytes().decode("utf-8"))
    if n_names != count:
        raise MXNetError(f"{path}: {count} arrays but {n_names} names")
    if r.pos != len(data):
        raise MXNetError(f"{path}: {len(data) - r.pos} trailing bytes after the name list")
    return {name: a for name, a in zip(names, arrays) if a is not None}


# --- symbol ---------------------------------------------------------------------------------------------------


def _tuple(value: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if value is None:
        return default
    text = value.strip().strip("()[]")
    return tuple(int(v) for v in text.split(",") if v.strip()) if text else default


def _bool(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() in ("true", "1")


@dataclass(frozen=True)
class _Node:
    index: int
    op: str
    name: str
    attrs: dict[str, str]
    inputs: tuple[int, ...]  # node indices (output 0 of each: every op here has one output)


def _convolution(node: _Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    a = node.attrs
    kernel = _tuple(a.get("kernel"), ())
    if len(kernel) != 2 or tuple(w.shape[2:]) != kernel:
        raise ShapeError(f"node {node.name}: kernel {kernel} vs weight {tuple(w.shape)}")
    stride = _tuple(a.get("stride"), (1, 1))
    dilate = _tuple(a.get("dilate"), (1, 1))
    pad = _tuple(a.get("pad"), (0, 0))
    return F.conv2d(x, w, b, stride, pad, dilate, int(a.get("num_group", "1")))


def _batch_norm(node: _Node, x, gamma, beta, mean, var) -> torch.Tensor:
    a = node.attrs
    if int(a.get("axis", "1")) != 1:
        raise UnsupportedMXNetOpError(f"node {node.name}: BatchNorm axis {a['axis']} (only 1)")
    eps = float(a.get("eps", "0.001"))
    if _bool(a.get("fix_gamma"), True):
        gamma = torch.ones_like(gamma)
    scale = gamma * torch.rsqrt(var + eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.view(shape) + (beta - mean * scale).view(shape)


def _leaky_relu(node: _Node, x: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
    act = node.attrs.get("act_type", "leaky")
    if act == "prelu":
        if gamma is None:
            raise MXNetError(f"node {node.name}: prelu without its gamma input")
        slope = gamma.view((1, -1) + (1,) * (x.ndim - 2)) if gamma.numel() > 1 else gamma.reshape(())
        return torch.where(x > 0, x, x * slope)
    if act == "leaky":
        return F.leaky_relu(x, float(node.attrs.get("slope", "0.25")))
    raise UnsupportedMXNetOpError(f"node {node.name}: LeakyReLU act_type {act!r}")


_ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _activation(node: _Node, x: torch.Tensor) -> torch.Tensor:
    act = node.attrs.get("act_type")
    if act not in _ACTIVATIONS:
        raise UnsupportedMXNetOpError(f"node {node.name}: Activation act_type {act!r}")
    return _ACTIVATIONS[act](x)


def _fully_connected(node: _Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    if _bool(node.attrs.get("flatten"), True):
        x = x.flatten(1)
    return F.linear(x, w, b)


def _scalar(fn: Callable[[torch.Tensor, float], torch.Tensor]):
    return lambda node, x: fn(x, float(node.attrs["scalar"]))


_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Convolution": _convolution,
    "BatchNorm": _batch_norm,
    "LeakyReLU": _leaky_relu,
    "Activation": _activation,
    "FullyConnected": _fully_connected,
    "Flatten": lambda node, x: x.flatten(1),
    "elemwise_add": lambda node, a, b: a + b,
    "_Plus": lambda node, a, b: a + b,
    "_plus_scalar": _scalar(lambda x, s: x + s),
    "_minus_scalar": _scalar(lambda x, s: x - s),
    "_mul_scalar": _scalar(lambda x, s: x * s),
    "_div_scalar": _scalar(lambda x, s: x / s),
}
SUPPORTED_OPS: frozenset[str] = frozenset(_OPS)


def _validate(node: _Node) -> None:
    a = node.attrs
    if node.op == "Convolution":
        if len(_tuple(a.get("kernel"), ())) != 2:
            raise UnsupportedMXNetOpError(f"node {node.name}: Convolution kernel {a.get('kernel')} (only 2-D)")
        if a.get("layout", "NCHW") not in ("NCHW", "None"):
            raise UnsupportedMXNetOpError(f"node {node.name}: Convolution layout {a['layout']} (only NCHW)")


class MXNetGraph(nn.Module):
    """An MXNet symbol with its weights, as a PyTorch module.

    ``forward(x)``: ``x`` is the symbol's single data input, ``B×C×H×W`` float (NCHW, MXNet's layout); returns
    the symbol's (single) head output.

    Attributes:
        model_name: the symbol file's name, used in messages.
        input_name: the data input (the ``null`` node that is not a weight).
        output_name: the head node's name.
    """

    def __init__(self, model_name: str, symbol: dict, params: dict[str, np.ndarray]):
        super().__init__()
        self.model_name = model_name
        try:
            raw_nodes = symbol["nodes"]
            heads = symbol["heads"]
        except (KeyError, TypeError) as exc:
            raise MXNetError(f"{model_name}: not an MXNet symbol ({exc!r} missing)") from None
        nodes = [
            _Node(i, n["op"], n["name"], dict(n.get("attrs") or n.get("attr") or n.get("param") or {}),
                  tuple(int(inp[0]) for inp in n.get("inputs", [])))
            for i, n in enumerate(raw_nodes)
        ]
        if len(heads) != 1:
            raise MXNetError(f"{model_name}: {len(heads)} outputs, expected one")
        unsupported = sorted({f"{n.op} (node {n.name})" for n in nodes if n.op != "null" and n.op not in _OPS})
        if unsupported:
            raise UnsupportedMXNetOpError(
                f"MXNet model {model_name}: unsupported op(s) {', '.join(unsupported)}; "
                f"faceshield's executor implements {', '.join(sorted(SUPPORTED_OPS))}"
            )
        weights = {k.split(":", 1)[1] if ":" in k else k: v for k, v in params.items()}
        inputs = [n for n in nodes if n.op == "null" and n.name not in weights]
        if len(inputs) != 1:
            raise MXNetError(f"{model_name}: expected one data input, found {[n.name for n in inputs]} "
                             "(a weight missing from the params file?)")
        self.input_name = inputs[0].name
        self._input_index = inputs[0].index
        self._buffers_of: dict[int, str] = {}
        for n in nodes:
            if n.op == "null" and n.index != self._input_index:
                key = f"w{len(self._buffers_of)}"
                self.register_buffer(key, torch.from_numpy(np.array(weights[n.name], dtype=np.float32)),
                                     persistent=False)
                self._buffers_of[n.index] = key
        self._steps = [n for n in nodes if n.op != "null"]
        for n in self._steps:
            _validate(n)
            self._check_arity(n)
        self._head = int(heads[0][0])
        self.output_name = nodes[self._head].name
        self._last_use = {}
        for k, n in enumerate(self._steps):
            for i in n.inputs:
                self._last_use[i] = k

    def _check_arity(self, node: _Node) -> None:
        params = list(inspect.signature(_OPS[node.op]).parameters.values())[1:]
        required = sum(p.default is inspect.Parameter.empty for p in params)
        if not required <= len(node.inputs) <= len(params):
            raise MXNetError(f"{self.model_name}: node {node.name} ({node.op}) has {len(node.inputs)} inputs")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ShapeError(f"MXNet model {self.model_name} expects a float B×C×H×W batch, got {tuple(x.shape)} "
                             f"{x.dtype}")
        buffers = dict(self.named_buffers())
        values: dict[int, torch.Tensor] = {self._input_index: x}
        for k, node in enumerate(self._steps):
            args = [values[i] if i in values else buffers[self._buffers_of[i]] for i in node.inputs]
            try:
                values[node.index] = _OPS[node.op](node, *args)
            except (RuntimeError, ValueError) as exc:
                raise MXNetError(f"MXNet model {self.model_name}: node {node.name} ({node.op}) failed: {exc}") from exc
            for i in node.inputs:
                if self._last_use.get(i) == k and i != self._head:
                    values.pop(i, None)
        return values[self._head]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._steps:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def extra_repr(self) -> str:
        return f"{self.model_name}: {len(self._steps)} ops, input {self.input_name}, output {self.output_name}"


def load_mxnet_graph(symbol_json: Path | str, params: Path | str) -> MXNetGraph:
    """Load an MXNet checkpoint (symbol JSON + ``.params``) into an :class:`MXNetGraph` in eval mode.

    Raises:
        MXNetError: unreadable files or a weight the symbol needs that the params file lacks.
        UnsupportedMXNetOpError: an op of the symbol is not implemented (the message names op, node and file).
    """
    symbol_json = Path(symbol_json)
    try:
        symbol: Any = json.loads(symbol_json.read_text())
    except (OSError, ValueError) as exc:
        raise MXNetError(f"cannot read MXNet symbol {symbol_json}: {exc}") from exc
    graph = MXNetGraph(symbol_json.name, symbol, read_ndarray_list(params))
    log.debug("loaded %r", graph)
    return graph.eval()
