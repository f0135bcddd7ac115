"""Run TF.js graph models (``model.json`` + ``.bin`` weight shards) as differentiable PyTorch modules.

A TF.js graph model is a frozen TensorFlow ``GraphDef`` (``modelTopology.node``) whose constants live in binary
shards described by ``weightsManifest``. :func:`load_tfjs_graph` reads both and returns a :class:`TFJSGraph`,
an ``nn.Module`` that evaluates the nodes in topological order with PyTorch ops.

Layout convention: ``forward`` takes the image batch as ``B×C×H×W`` (PyTorch's convention) and permutes it once
to the graph's own ``B×H×W×C``; every node then runs with exactly TensorFlow's semantics on NHWC tensors, so
axis attributes (``Mean``/``Sum`` axes, ``Reshape`` shapes, ``Pad`` paddings, ``Squeeze`` dims) need no
translation. Convolutions and pooling hand ``x.permute(0, 3, 1, 2)`` (a zero-copy channels-last view) to
``torch.nn.functional`` and permute the result back, also without copying. Outputs are returned as the graph
computes them (a 4-D output would be NHWC).

Constants (weights included) are buffers, not parameters: nothing here is trained, but everything is
differentiable with respect to the input. ``module.double()`` runs the whole graph in float64.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceshield.errors import FaceshieldError, ShapeError
from faceshield.models.graphs import prelu

log = logging.getLogger(__name__)


class TFJSGraphError(FaceshieldError):
    """A TF.js graph model cannot be read or uses something this executor does not support."""


class UnsupportedOpError(TFJSGraphError, NotImplementedError):
    """The graph contains an op (or an op variant) that the executor does not implement."""


# --- model.json parsing ---------------------------------------------------------------------------------------

_NUMPY_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QUANTISED_DTYPES = {"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}


def _attr_value(value: dict) -> Any:
    """Decode one AttrValue of the JSON GraphDef (strings are base64-encoded bytes)."""
    if "list" in value:
        lst = value["list"]
        if "s" in lst:
            return [base64.b64decode(s).decode() for s in lst["s"]]
        if "i" in lst:
            return [int(i) for i in lst["i"]]
        if "f" in lst:
            return [float(f) for f in lst["f"]]
        return []
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    return value


@dataclass(frozen=True)
class _Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    attr: dict


# Public name for graph rewrites (see ``load_tfjs_graph(rewrite=...)``).
TFJSNode = _Node

# ``rewrite(nodes, weights) -> nodes``: repairs a known, badly converted graph before it is built; it may also
# replace entries of ``weights`` (constant name → array). Only ever passed for a specific file (keyed on its
# sha256 by the caller), never applied to graphs in general.
GraphRewrite = Callable[[list[_Node], dict[str, np.ndarray]], list[_Node]]


def _tensor_name(ref: str) -> str:
    """``"node:0"`` → ``"node"``; other output indices are refused (no op we run has several outputs)."""
    name, _, index = ref.partition(":")
    if index not in ("", "0"):
        raise TFJSGraphError(f"output {ref!r}: only the first output of a node can be used")
    return name


def _read_weights(
    spec: dict, model_name: str, weight_paths: Mapping[str, Path] | None, base: Path
) -> dict[str, np.ndarray]:
    """Decode every weight of ``weightsManifest`` into numpy arrays (float16/uint8/uint16 quantisation undone)."""
    weights: dict[str, np.ndarray] = {}
    for group in spec["weightsManifest"]:
        shards = []
        for rel in group["paths"]:
            path = Path(weight_paths[rel]) if weight_paths and rel in weight_paths else base / rel
            if not path.is_file():
                raise TFJSGraphError(f"{model_name}: weight file {rel} not found at {path}")
            shards.append(path.read_bytes())
        data = b"".join(shards)
        offset = 0
        for w in group["weights"]:
            shape = [int(s) for s in w["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quant = w.get("quantization")
            if quant:
                qtype = _QUANTISED_DTYPES.get(quant["dtype"])
                if qtype is None:
                    raise TFJSGraphError(f"{model_name}: weight {w['name']}: unsupported quantisation {quant['dtype']}")
                raw = np.frombuffer(data, dtype=np.dtype(qtype).newbyteorder("<"), count=count, offset=offset)
                offset += raw.nbytes
                if quant["dtype"] == "float16":
                    array = raw.astype(np.float32)
                else:  # affine: value = q * scale + min
                    array = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
                if w["dtype"] == "int32":
                    array = np.round(array).astype(np.int32)
            else:
                dtype = _NUMPY_DTYPES.get(w["dtype"])
                if dtype is None:
                    raise TFJSGraphError(f"{model_name}: weight {w['name']}: unsupported dtype {w['dtype']}")
                array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=offset)
                offset += array.nbytes
            weights[w["name"]] = array.reshape(shape).astype(array.dtype.newbyteorder("="))
        if offset != len(data):
            raise TFJSGraphError(f"{model_name}: weight shards hold {len(data)} bytes, manifest describes {offset}")
    return weights


def _signature_outputs(spec: dict) -> list[str]:
    signature = spec.get("signature") or (spec.get("userDefinedMetadata") or {}).get("signature") or {}
    return [_tensor_name(o.get("name", key)) for key, o in (signature.get("outputs") or {}).items()]


# --- op implementations (NHWC tensors, TensorFlow semantics) --------------------------------------------------


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: output ceil(size/stride); the odd pixel goes at the end."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _spatial_padding(
    node: _Node, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for the node's ``padding`` attribute on an NHWC input."""
    mode = node.attr.get("padding", "VALID")
    if mode == "VALID":
        return (0, 0, 0, 0)
    if mode == "SAME":
        return (*_same_padding(x.shape[1], kernel[0], strides[0], dilations[0]),
                *_same_padding(x.shape[2], kernel[1], strides[1], dilations[1]))
    if mode == "EXPLICIT":
        p = node.attr.get("explicit_paddings") or []
        if len(p) != 8 or any(p[i] for i in (0, 1, 6, 7)):
            raise UnsupportedOpError(f"node {node.name}: explicit_paddings {p} (only spatial NHWC padding)")
        return (p[2], p[3], p[4], p[5])
    raise UnsupportedOpError(f"node {node.name}: padding {mode!r}")


def _pad_nhwc(x: torch.Tensor, pads: tuple[int, int, int, int], value: float = 0.0) -> torch.Tensor:
    top, bottom, left, right = pads
    if not any(pads):
        return x
    # F.pad lists the last dimension first: (C), W, H.
    return F.pad(x, (0, 0, left, right, top, bottom), value=value)


def _check_nhwc(node: _Node) -> None:
    fmt = node.attr.get("data_format", "NHWC")
    if fmt != "NHWC":
        raise UnsupportedOpError(f"node {node.name} ({node.op}): data_format {fmt!r} (only NHWC)")


def _hw(values: Sequence[int] | None, node: _Node, what: str) -> tuple[int, int]:
    values = list(values or [1, 1, 1, 1])
    if len(values) != 4 or values[0] != 1 or values[3] != 1:
        raise UnsupportedOpError(f"node {node.name} ({node.op}): {what} {values} (only spatial)")
    return values[1], values[2]


def _prelu(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return prelu(x, alpha, channel_dim=-1)


_ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "Relu": lambda x, node: F.relu(x),
    "Relu6": lambda x, node: F.relu6(x),
    "Sigmoid": lambda x, node: torch.sigmoid(x),
    "Tanh": lambda x, node: torch.tanh(x),
    "Elu": lambda x, node: F.elu(x),
    "LeakyRelu": lambda x, node: F.leaky_relu(x, node.attr.get("leakyrelu_alpha", 0.2)),
}


def _fused_epilogue(node: _Node, y: torch.Tensor, args: list[torch.Tensor]) -> torch.Tensor:
    """Apply a fused node's ``fused_ops`` (BiasAdd then an optional activation) with its extra ``args``."""
    ops = list(node.attr.get("fused_ops") or [])
    args = list(args)
    if ops and ops[0] == "BiasAdd":
        y = y + args.pop(0)
        ops = ops[1:]
    if len(ops) > 1:
        raise UnsupportedOpError(f"node {node.name} ({node.op}): fused_ops {node.attr.get('fused_ops')}")
    if ops:
        if ops[0] == "Prelu":
            if not args:
                raise TFJSGraphError(f"node {node.name}: fused Prelu without its alpha argument")
            return _prelu(y, args.pop(0))
        act = _ACTIVATIONS.get(ops[0])
        if act is None:
            raise UnsupportedOpError(f"node {node.name} ({node.op}): fused op {ops[0]!r}")
        y = act(y, node)
    return y


def _torch_filter(filter_hwio: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """TF filter → torch weight. Conv2D: HWIO → OIHW. Depthwise: H×W×C×M → (C·M)×1×H×W (channel c·M+m)."""
    if depthwise:
        kh, kw, c, m = filter_hwio.shape
        return filter_hwio.reshape(kh, kw, c * m).permute(2, 0, 1).unsqueeze(1)
    return filter_hwio.permute(3, 2, 0, 1)


def _conv(node: _Node, x: torch.Tensor, weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """NHWC convolution with a torch-layout ``weight`` (see :func:`_torch_filter`)."""
    _check_nhwc(node)
    strides = _hw(node.attr.get("strides"), node, "strides")
    dilations = _hw(node.attr.get("dilations"), node, "dilations")
    kernel = (weight.shape[2], weight.shape[3])
    top, bottom, left, right = _spatial_padding(node, x, kernel, strides, dilations)
    padding: tuple[int, int] = (0, 0)
    if top == bottom and left == right:
        padding = (top, left)  # symmetric: let the convolution pad
    else:
        x = _pad_nhwc(x, (top, bottom, left, right))
    groups = x.shape[3] if depthwise else 1
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, None, strides, padding, dilations, groups)
    return y.permute(0, 2, 3, 1)


def _max_pool(node: _Node, x: torch.Tensor) -> torch.Tensor:
    _check_nhwc(node)
    kernel = _hw(node.attr.get("ksize"), node, "ksize")
    strides = _hw(node.attr.get("strides"), node, "strides")
    pads = _spatial_padding(node, x, kernel, strides, (1, 1))
    # TF ignores padded positions in a max: pad with -inf.
    x = _pad_nhwc(x, pads, value=-math.inf)
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel, strides).permute(0, 2, 3, 1)


def _matmul(node: _Node, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if node.attr.get("transpose_a"):
        a = a.transpose(-1, -2)
    if node.attr.get("transpose_b"):
        b = b.transpose(-1, -2)
    return a @ b


def _axes(value: Any, rank: int) -> list[int]:
    axes = [value] if isinstance(value, int) else list(value)
    return sorted(a % rank for a in axes)


def _reduce(fn):
    def run(node: _Node, x: torch.Tensor, axes: Any) -> torch.Tensor:
        dims = _axes(axes, x.ndim)
        keep = bool(node.attr.get("keep_dims", False))
        return fn(x, dim=dims, keepdim=keep) if dims else x
    return run


def _squeeze(node: _Node, x: torch.Tensor) -> torch.Tensor:
    dims = node.attr.get("squeeze_dims") or []
    if not dims:
        return x.squeeze()
    for d in sorted((d % x.ndim for d in dims), reverse=True):
        if x.shape[d] != 1:
            raise ShapeError(f"node {node.name}: cannot squeeze dimension {d} of shape {tuple(x.shape)}")
        x = x.squeeze(d)
    return x


def _pad(node: _Node, x: torch.Tensor, paddings: Any) -> torch.Tensor:
    pairs = [tuple(p) for p in paddings]
    if len(pairs) != x.ndim:
        raise ShapeError(f"node {node.name}: {len(pairs)} padding pairs for a rank-{x.ndim} tensor")
    flat: list[int] = []
    for before, after in reversed(pairs):
        flat += [before, after]
    return F.pad(x, flat) if any(flat) else x


def _reshape(node: _Node, x: torch.Tensor, shape: Any) -> torch.Tensor:
    # Row-major over TF's own layout (we keep it), so torch.reshape has exactly TF's semantics.
    return x.reshape([int(s) for s in shape])


# Ops whose listed inputs must be compile-time constants (axes, shapes, paddings): name → input positions.
_STATIC_INPUTS = {"Mean": (1,), "Sum": (1,), "Reshape": (1,), "Pad": (1,)}

_ELEMENTWISE: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add,
    "AddV2": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Maximum": torch.maximum,
    "Minimum": torch.minimum,
    "Abs": torch.abs,
    "Square": torch.square,
    "Rsqrt": torch.rsqrt,
    "Relu": F.relu,
    "Relu6": F.relu6,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Identity": lambda x: x,
    "Softmax": lambda x: torch.softmax(x, dim=-1),
    "Prelu": _prelu,
}

_WITH_NODE: dict[str, Callable[..., torch.Tensor]] = {
    "MatMul": _matmul,
    "_FusedMatMul": lambda node, a, b, *args: _fused_epilogue(node, _matmul(node, a, b), list(args)),
    "MaxPool": _max_pool,
    "Mean": _reduce(torch.mean),
    "Sum": _reduce(torch.sum),
    "Squeeze": _squeeze,
    "Pad": _pad,
    "Reshape": _reshape,
}

# Maximum / Minimum against a scalar constant (how TF exports ReLU6 and clip_by_value), as hardtanh: the same
# values as torch.maximum / clamp, and a single-kernel backward, several times cheaper than theirs (which build
# comparison masks) — a third of faceres' backward pass before.
_CLAMPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "Maximum": lambda x, bound: F.hardtanh(x, bound, math.inf),
    "Minimum": lambda x, bound: F.hardtanh(x, -math.inf, bound),
}

_CONV_OPS = {
    "Conv2D": False,
    "_FusedConv2D": False,
    "DepthwiseConv2dNative": True,
    "FusedDepthwiseConv2dNative": True,
}

SUPPORTED_OPS: frozenset[str] = frozenset(
    {"Const", "Placeholder", *_ELEMENTWISE, *_WITH_NODE, *_CONV_OPS}
)


def _validate(node: _Node, model_name: str) -> None:
    """Refuse, at load time, attribute variants the op implementations would only refuse when run."""
    try:
        if node.op in _CONV_OPS or node.op == "MaxPool":
            _check_nhwc(node)
            if node.attr.get("padding", "VALID") not in ("VALID", "SAME", "EXPLICIT"):
                raise UnsupportedOpError(f"node {node.name} ({node.op}): padding {node.attr.get('padding')!r}")
        fused = list(node.attr.get("fused_ops") or [])
        if fused:
            rest = fused[1:] if fused[0] == "BiasAdd" else fused
            if len(rest) > 1 or (rest and rest[0] != "Prelu" and rest[0] not in _ACTIVATIONS):
                raise UnsupportedOpError(f"node {node.name} ({node.op}): fused_ops {fused}")
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(f"TF.js model {model_name}: {exc}") from None


# --- the module -----------------------------------------------------------------------------------------------


@dataclass
class _Step:
    node: _Node
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]  # value names (node names or buffer keys)
    static: tuple[Any, ...]  # compile-time arguments passed after the node


class TFJSGraph(nn.Module):
    """A TF.js graph model as a PyTorch module (see the module docstring for the layout convention).

    ``forward(x)``: ``x`` is ``B×C×H×W`` float (the graph's single image input, permuted to NHWC inside; C, H, W
    must match the graph's input where the graph fixes them). Returns the requested output tensor, or a tuple of
    them in the order of ``output_names`` when there are several. :meth:`run` returns them by name.

    Attributes:
        model_name: the model.json file stem, used in messages.
        input_name: the graph's Placeholder node.
        input_shape: the Placeholder's declared NHWC shape (-1 where free).
        output_names: node names of the outputs, in order.
    """

    def __init__(self, model_name: str, nodes: list[_Node], weights: dict[str, np.ndarray], outputs: list[str]):
        super().__init__()
        self.model_name = model_name
        by_name = {n.name: n for n in nodes}
        for out in outputs:
            if out not in by_name:
                raise TFJSGraphError(f"{model_name}: no node named {out!r} to use as output")
        order = self._topological_order(by_name, outputs)
        unsupported = sorted({f"{by_name[n].op} (node {n})" for n in order if by_name[n].op not in SUPPORTED_OPS})
        if unsupported:
            raise UnsupportedOpError(
                f"TF.js model {model_name}: unsupported op(s) {', '.join(unsupported)}; "
                f"faceshield's executor implements {', '.join(sorted(SUPPORTED_OPS))}"
            )
        for n in order:
            _validate(by_name[n], model_name)
        placeholders = [n for n in order if by_name[n].op == "Placeholder"]
        if len(placeholders) != 1:
            raise TFJSGraphError(f"{model_name}: expected one input (Placeholder), found {placeholders}")
        self.input_name = placeholders[0]
        shape_attr = by_name[self.input_name].attr.get("shape") or {}
        dims = (shape_attr.get("shape") or {}).get("dim") or []
        self.input_shape = tuple(int(d.get("size", -1)) for d in dims)
        if len(self.input_shape) != 4:
            raise TFJSGraphError(f"{model_name}: input {self.input_name} has shape {self.input_shape}, expected NHWC")
        self.output_names = list(outputs)

        self._buffer_keys: dict[str, str] = {}
        self._steps: list[_Step] = []
        consts = {n for n in order if by_name[n].op == "Const"}
        for n in consts:
            if n not in weights:
                raise TFJSGraphError(f"{model_name}: constant {n} has no data in the weights manifest")

        def const_key(name: str, array: np.ndarray | torch.Tensor) -> str:
            key = f"c{len(self._buffer_keys)}"
            tensor = torch.as_tensor(np.array(array)) if isinstance(array, np.ndarray) else array
            self.register_buffer(key, tensor.contiguous(), persistent=False)
            self._buffer_keys[name] = key
            return key

        for name in order:
            node = by_name[name]
            if node.op in ("Const", "Placeholder"):
                continue
            inputs = [_tensor_name(i) for i in node.inputs]
            static: tuple[Any, ...] = ()
            if node.op in _STATIC_INPUTS:
                positions = _STATIC_INPUTS[node.op]
                for p in positions:
                    if inputs[p] not in consts:
                        raise UnsupportedOpError(f"{model_name}: node {name} ({node.op}) needs a constant input {p}")
                static = tuple(weights[inputs[p]].tolist() for p in positions)
                inputs = [i for k, i in enumerate(inputs) if k not in positions]
            if node.op in _CONV_OPS:
                depthwise = _CONV_OPS[node.op]
                if inputs[1] not in consts:
                    raise UnsupportedOpError(f"{model_name}: node {name} ({node.op}) needs a constant filter")
                filt = torch.from_numpy(np.array(weights[inputs[1]], dtype=np.float32))
                inputs[1] = f"{inputs[1]}#{'depthwise' if depthwise else 'conv'}"
                if inputs[1] not in self._buffer_keys:
                    const_key(inputs[1], _torch_filter(filt, depthwise))
                fn = self._conv_fn(depthwise)
            elif node.op in _WITH_NODE:
                fn = _WITH_NODE[node.op]
            elif node.op in _CLAMPS and len(inputs) == 2 and inputs[1] in consts and weights[inputs[1]].size == 1:
                bound = float(np.asarray(weights[inputs[1]]).reshape(()))
                fn = lambda node, x, _op=_CLAMPS[node.op], _b=bound: _op(x, _b)  # noqa: E731
                inputs = inputs[:1]
            else:
                op = _ELEMENTWISE[node.op]
                fn = lambda node, *xs, _op=op: _op(*xs)  # noqa: E731
            for i in inputs:
                if i in consts and i not in self._buffer_keys:
                    const_key(i, weights[i])
            refs = tuple(self._buffer_keys.get(i, i) for i in inputs)
            self._steps.append(_Step(node, fn, refs, static))
        # Outputs that are plain constants are unusual but legal.
        for out in outputs:
            if out in consts and out not in self._buffer_keys:
                const_key(out, weights[out])
        self._last_use = self._last_uses()

    @staticmethod
    def _conv_fn(depthwise: bool):
        def run(node: _Node, x: torch.Tensor, weight: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
            y = _conv(node, x, weight, depthwise)
            return _fused_epilogue(node, y, list(args)) if node.op.startswith(("_Fused", "Fused")) else y
        return run

    @staticmethod
    def _topological_order(by_name: dict[str, _Node], outputs: list[str]) -> list[str]:
        """Nodes the outputs depend on, each after its inputs (iterative DFS; graphs can be deep)."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        for root in outputs:
            stack = [(root, False)]
            while stack:
                name, expanded = stack.pop()
                if expanded:
                    state[name] = 2
                    order.append(name)
                    continue
                if state.get(name) == 2:
                    continue
                if state.get(name) == 1:
                    raise TFJSGraphError(f"graph has a cycle through node {name}")
                if name not in by_name:
                    raise TFJSGraphError(f"node input {name!r} does not exist")
                state[name] = 1
                stack.append((name, True))
                for ref in reversed(by_name[name].inputs):
                    dep = _tensor_name(ref)
                    if state.get(dep) != 2:
                        stack.append((dep, False))
        return order

    def _last_uses(self) -> dict[str, int]:
        """Index of the last step reading each intermediate value, so it can be released early."""
        last: dict[str, int] = {}
        for k, step in enumerate(self._steps):
            for ref in step.inputs:
                last[ref] = k
        return last

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluate the graph on ``x`` (``B×C×H×W`` float); returns ``{output name: tensor}``."""
        if x.ndim != 4:
            raise ShapeError(f"TF.js model {self.model_name} expects a B×C×H×W batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ShapeError(f"TF.js model {self.model_name} expects float input, got {x.dtype}")
        _, h, w, c = self.input_shape
        for got, want, what in ((x.shape[1], c, "channels"), (x.shape[2], h, "height"), (x.shape[3], w, "width")):
            if want != -1 and got != want:
                raise ShapeError(
                    f"TF.js model {self.model_name} expects B×{c}×{h}×{w} input, got {tuple(x.shape)} ({what})"
                )
        buffers = dict(self.named_buffers())
        values: dict[str, torch.Tensor] = {self.input_name: x.permute(0, 2, 3, 1)}
        keep = set(self.output_names)
        for k, step in enumerate(self._steps):
            args = [values[r] if r in values else buffers[r] for r in step.inputs]
            try:
                values[step.node.name] = step.fn(step.node, *args, *step.static)
            except (RuntimeError, ValueError) as exc:
                raise TFJSGraphError(
                    f"TF.js model {self.model_name}: node {step.node.name} ({step.node.op}) failed: {exc}"
                ) from exc
            for r in step.inputs:
                if self._last_use.get(r) == k and r not in keep and r in values:
                    del values[r]
        out = {}
        for name in self.output_names:
            out[name] = values[name] if name in values else buffers[self._buffer_keys[name]]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.run(x)
        tensors = tuple(out[n] for n in self.output_names)
        return tensors[0] if len(tensors) == 1 else tensors

    def extra_repr(self) -> str:
        return (
            f"{self.model_name}: {len(self._steps)} ops, input {self.input_name} {self.input_shape}, "
            f"outputs {self.output_names}"
        )


def load_tfjs_graph(
    model_json: Path | str,
    outputs: list[str] | None = None,
    weight_files: Mapping[str, Path] | None = None,
    rewrite: GraphRewrite | None = None,
) -> TFJSGraph:
    """Load a TF.js graph model into a :class:`TFJSGraph` (float32, eval mode, no gradients on weights).

    Args:
        model_json: path of ``model.json``.
        outputs: node names to return (``":0"`` suffixes allowed); default: the model's signature outputs, or
            the graph's sink nodes when it has no signature.
        weight_files: where each shard named in ``weightsManifest.paths`` is, when not beside ``model_json``.
        rewrite: a repair for one known graph (:data:`GraphRewrite`), applied to the parsed nodes and decoded
            weights before the module is built.

    Raises:
        TFJSGraphError: unreadable model, missing weights, or unknown output names.
        UnsupportedOpError: an op on the path to the outputs is not implemented (message names op and model).
    """
    model_json = Path(model_json)
    try:
        spec = json.loads(model_json.read_text())
        raw_nodes = spec["modelTopology"]["node"]
        spec["weightsManifest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TFJSGraphError(f"cannot read TF.js graph model {model_json}: {exc}") from exc
    if spec.get("format") not in (None, "graph-model"):
        raise TFJSGraphError(f"{model_json}: format {spec.get('format')!r}, expected a graph-model")
    nodes = [
        _Node(
            name=n["name"],
            op=n["op"],
            # "^name" entries are control dependencies: ordering only, no data.
            inputs=tuple(i for i in n.get("input", []) if not i.startswith("^")),
            attr={k: _attr_value(v) for k, v in (n.get("attr") or {}).items()},
        )
        for n in raw_nodes
    ]
    model_name = model_json.stem
    weights = _read_weights(spec, model_name, weight_files, model_json.parent)
    if rewrite is not None:
        nodes = rewrite(nodes, weights)
    if outputs is None:
        outputs = _signature_outputs(spec)
        if not outputs:
            used = {_tensor_name(i) for n in nodes for i in n.inputs}
            outputs = [n.name for n in nodes if n.name not in used and n.op not in ("Const", "Placeholder")]
    graph = TFJSGraph(model_name, nodes, weights, [_tensor_name(o) for o in outputs])
    log.debug("loaded %r", graph)
    return graph.eval()
