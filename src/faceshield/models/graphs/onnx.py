"""A small ONNX graph interpreter in PyTorch: load an ``.onnx`` file and run it as a differentiable ``nn.Module``.

Only the ops that face-recognition graphs use are implemented (convolutions, BN, activations, pooling,
element-wise arithmetic, Gemm/MatMul and the usual reshaping ops, see :data:`SUPPORTED_OPS`); an op outside that
table fails at load time with an :class:`UnsupportedOnnxOpError` naming the op, the node and the file.

Initializers and ``Constant`` nodes become buffers (no gradient; they follow ``.to()`` / ``.double()``), so the
graph is differentiable with respect to its inputs only. Semantics follow the ONNX operator specs
(https://onnx.ai/onnx/operators/) for the opset the file declares, with one deliberate extension: graphs
exported with a fixed batch dimension (e.g. ``1×3×112×112``) accept any batch size, see :class:`OnnxGraph`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import external_data_helper, numpy_helper
from torch import nn

from faceshield.errors import FaceshieldError, ShapeError
from faceshield.models.graphs import prelu

log = logging.getLogger(__name__)

__all__ = ["OnnxGraph", "OnnxGraphError", "UnsupportedOnnxOpError", "SUPPORTED_OPS", "load_onnx_graph"]


class OnnxGraphError(FaceshieldError):
    """An ONNX file cannot be loaded or run (malformed graph, missing external data, unsupported attribute)."""


class UnsupportedOnnxOpError(OnnxGraphError, NotImplementedError):
    """The graph uses an op (or an op variant) that this interpreter does not implement."""


# An op kernel: called with the node's inputs (None for an omitted optional input) and a run context;
# returns one tensor or a tuple (one per node output).
Kernel = Callable[[list, "_RunContext"], Any]


@dataclass
class _RunContext:
    """Per-call facts a kernel may need: the batch size of this call and the one the graph was exported with."""

    batch: int
    exported_batch: int | None


@dataclass
class _NodeSpec:
    """What a kernel builder sees of one node: its attributes (python values), opset, names for messages, its
    input names ("" = omitted optional input) and the values of those inputs that are graph constants."""

    op_type: str
    name: str
    attrs: dict[str, Any]
    opset: int
    source: str
    n_outputs: int
    inputs: tuple[str, ...] = ()
    constants: dict[str, np.ndarray] = field(default_factory=dict)

    def fail(self, what: str) -> OnnxGraphError:
        return UnsupportedOnnxOpError(f"ONNX {self.op_type} node {self.name!r} in {self.source}: {what}")


_BUILDERS: dict[str, Callable[[_NodeSpec], Kernel]] = {}


def _op(*names: str):
    def register(builder: Callable[[_NodeSpec], Kernel]) -> Callable[[_NodeSpec], Kernel]:
        for name in names:
            _BUILDERS[name] = builder
        return builder

    return register


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- convolution and pooling -----------------------------------------------------------------------------------


def _spatial_padding(spec: _NodeSpec, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int],
                     dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` ([begin_1..begin_n, end_1..end_n]) for this input, resolving ``auto_pad``."""
    n = len(kernel)
    auto_pad = spec.attrs.get("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        return list(spec.attrs.get("pads", [0] * (2 * n)))
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    raise spec.fail(f"auto_pad={auto_pad!r} is not supported")


def _torch_pad_order(pads: Sequence[int]) -> list[int]:
    """ONNX [b_1..b_n, e_1..e_n] over the last n dims -> torch.nn.functional.pad order (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@_op("Conv")
def _conv(spec: _NodeSpec) -> Kernel:
    group = spec.attrs.get("group", 1)

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        n = w.ndim - 2
        if n not in _CONV:
            raise spec.fail(f"{n}-D convolution is not supported")
        strides = spec.attrs.get("strides", [1] * n)
        dilations = spec.attrs.get("dilations", [1] * n)
        pads = _spatial_padding(spec, x, w.shape[2:], strides, dilations)
        if pads[:n] == pads[n:]:
            padding: Sequence[int] = pads[:n]
        else:  # asymmetric: pad explicitly (zeros), then convolve without padding
            x = F.pad(x, _torch_pad_order(pads))
            padding = [0] * n
        return _CONV[n](x, w, b, stride=strides, padding=padding, dilation=dilations, groups=group)

    return run


@_op("MaxPool", "AveragePool")
def _pool(spec: _NodeSpec) -> Kernel:
    kernel = list(spec.attrs["kernel_shape"])
    n = len(kernel)
    if n not in (1, 2, 3):
        raise spec.fail(f"{n}-D pooling is not supported")
    strides = spec.attrs.get("strides", [1] * n)
    dilations = spec.attrs.get("dilations", [1] * n)
    ceil_mode = bool(spec.attrs.get("ceil_mode", 0))
    if spec.attrs.get("storage_order", 0) != 0:
        raise spec.fail("storage_order=1 is not supported")
    if spec.n_outputs > 1:
        raise spec.fail("the Indices output is not supported")
    is_max = spec.op_type == "MaxPool"
    count_include_pad = bool(spec.attrs.get("count_include_pad", 0))
    if not is_max and any(d != 1 for d in dilations):
        raise spec.fail("dilated average pooling is not supported")
    max_pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    avg_pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        pads = _spatial_padding(spec, x, kernel, strides, dilations)
        symmetric = pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel))
        if is_max:
            if not symmetric:  # padded cells must never win the max
                x = F.pad(x, _torch_pad_order(pads), value=-math.inf)
            padding = pads[:n] if symmetric else [0] * n
            return max_pool(x, kernel, strides, padding, dilations, ceil_mode=ceil_mode)
        if not symmetric:
            raise spec.fail(f"asymmetric pads {pads} are not supported for AveragePool")
        return avg_pool(x, kernel, strides, pads[:n], ceil_mode=ceil_mode, count_include_pad=count_include_pad)

    return run


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(spec: _NodeSpec) -> Kernel:
    is_max = spec.op_type == "GlobalMaxPool"

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        dims = tuple(range(2, x.ndim))
        return x.amax(dim=dims, keepdim=True) if is_max else x.mean(dim=dims, keepdim=True)

    return run


@_op("BatchNormalization")
def _batch_norm(spec: _NodeSpec) -> Kernel:
    eps = spec.attrs.get("epsilon", 1e-5)
    if spec.attrs.get("training_mode", 0) or spec.n_outputs > 1:
        raise spec.fail("training-mode batch normalization is not supported")

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x, scale, bias, mean, var = inputs[:5]
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)

    return run


# --- activations and element-wise ops --------------------------------------------------------------------------


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[_NodeSpec], Kernel]:
    def build(spec: _NodeSpec) -> Kernel:
        return lambda inputs, ctx: fn(inputs[0])

    return build


for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Identity": lambda x: x,
}.items():
    _BUILDERS[_name] = _unary(_fn)


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[_NodeSpec], Kernel]:
    def build(spec: _NodeSpec) -> Kernel:
        return lambda inputs, ctx: fn(inputs[0], inputs[1])  # numpy-style broadcasting, as ONNX

    return build


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow}.items():
    _BUILDERS[_name] = _binary(_fn)


@_op("Sum")
def _sum(spec: _NodeSpec) -> Kernel:
    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        out = inputs[0]
        for t in inputs[1:]:
            out = out + t
        return out

    return run


@_op("PRelu")
def _prelu(spec: _NodeSpec) -> Kernel:
    # f(x) = x for x >= 0, slope * x otherwise; slope broadcasts to x (unidirectionally), e.g. C×1×1.
    return lambda inputs, ctx: prelu(inputs[0], inputs[1], channel_dim=1)


@_op("LeakyRelu")
def _leaky_relu(spec: _NodeSpec) -> Kernel:
    alpha = spec.attrs.get("alpha", 0.01)
    return lambda inputs, ctx: F.leaky_relu(inputs[0], alpha)


@_op("HardSigmoid", "HardSwish")
def _hard_sigmoid(spec: _NodeSpec) -> Kernel:
    swish = spec.op_type == "HardSwish"
    alpha = 1.0 / 6.0 if swish else spec.attrs.get("alpha", 0.2)
    beta = 0.5 if swish else spec.attrs.get("beta", 0.5)

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        gate = torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)
        return inputs[0] * gate if swish else gate

    return run


def _clip_to_tensors(inputs: list, ctx: _RunContext) -> torch.Tensor:
    lo, hi = (inputs[1:3] + [None, None])[:2]
    return inputs[0] if lo is None and hi is None else torch.clamp(inputs[0], lo, hi)


@_op("Clip")
def _clip(spec: _NodeSpec) -> Kernel:
    if spec.opset < 11:  # bounds were attributes before opset 11
        lo, hi = spec.attrs.get("min"), spec.attrs.get("max")
    else:
        names = (list(spec.inputs[1:3]) + ["", ""])[:2]  # "" = no bound
        if any(n and (n not in spec.constants or spec.constants[n].size != 1) for n in names):
            return _clip_to_tensors  # bounds computed by the graph, or not scalars
        lo, hi = (float(spec.constants[n].reshape(())) if n else None for n in names)
    # Constant scalar bounds (ReLU6), decided once here: hardtanh gives clamp's values with a single-kernel
    # backward, several times cheaper than clamp's (comparison masks and where).
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    return lambda inputs, ctx: F.hardtanh(inputs[0], lo, hi)


@_op("Softmax", "LogSoftmax")
def _softmax(spec: _NodeSpec) -> Kernel:
    fn = torch.softmax if spec.op_type == "Softmax" else torch.log_softmax
    legacy = spec.opset < 13  # before 13 the input was coerced to 2-D at `axis` (default 1)
    axis = spec.attrs.get("axis", 1 if legacy else -1)

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        if not legacy:
            return fn(x, dim=axis)
        a = _norm_axis(axis, x.ndim)
        return fn(x.reshape(math.prod(x.shape[:a]), -1), dim=1).reshape(x.shape)

    return run


# --- linear algebra -----------------------------------------------------------------------------------------------


@_op("Gemm")
def _gemm(spec: _NodeSpec) -> Kernel:
    alpha, beta = spec.attrs.get("alpha", 1.0), spec.attrs.get("beta", 1.0)
    trans_a, trans_b = spec.attrs.get("transA", 0), spec.attrs.get("transB", 0)

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        a = inputs[0].t() if trans_a else inputs[0]
        b = inputs[1].t() if trans_b else inputs[1]
        y = a @ b
        if alpha != 1.0:
            y = y * alpha
        c = inputs[2] if len(inputs) > 2 else None
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return run


@_op("MatMul")
def _matmul(spec: _NodeSpec) -> Kernel:
    return lambda inputs, ctx: torch.matmul(inputs[0], inputs[1])


# --- shape ops -----------------------------------------------------------------------------------------------------


@_op("Flatten")
def _flatten(spec: _NodeSpec) -> Kernel:
    axis = spec.attrs.get("axis", 1)

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        a = _norm_axis(axis, x.ndim)
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return run


@_op("Reshape")
def _reshape(spec: _NodeSpec) -> Kernel:
    allowzero = spec.attrs.get("allowzero", 0)

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x, shape = inputs[0], _ints(inputs[1])
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        # Batch extension: a graph exported with a fixed batch b0 bakes b0 into its reshape targets
        # (x.view(x.size(0), -1) becomes Reshape(x, [b0, -1])); run with batch B, that leading b0 means B.
        if (ctx.exported_batch is not None and ctx.batch != ctx.exported_batch and shape
                and shape[0] == ctx.exported_batch and x.ndim > 0 and x.shape[0] == ctx.batch):
            shape = [ctx.batch] + shape[1:]
        return x.reshape(shape)

    return run


@_op("Transpose")
def _transpose(spec: _NodeSpec) -> Kernel:
    perm = spec.attrs.get("perm")

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        return x.permute(perm if perm is not None else list(reversed(range(x.ndim))))

    return run


@_op("Squeeze", "Unsqueeze")
def _squeeze(spec: _NodeSpec) -> Kernel:
    squeeze = spec.op_type == "Squeeze"
    attr_axes = spec.attrs.get("axes") if spec.opset < 13 else None  # axes became an input in opset 13

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        axes = attr_axes if spec.opset < 13 else _ints(inputs[1] if len(inputs) > 1 else None)
        if squeeze:
            if axes is None:
                return x.reshape([s for s in x.shape if s != 1])
            axes = sorted(_norm_axis(a, x.ndim) for a in axes)
            for a in reversed(axes):
                if x.shape[a] != 1:
                    raise ShapeError(f"{spec.source}: Squeeze {spec.name!r} on axis {a} of size {x.shape[a]}")
                x = x.squeeze(a)
            return x
        rank = x.ndim + len(axes)
        for a in sorted(_norm_axis(a, rank) for a in axes):
            x = x.unsqueeze(a)
        return x

    return run


@_op("Concat")
def _concat(spec: _NodeSpec) -> Kernel:
    axis = spec.attrs["axis"]
    return lambda inputs, ctx: torch.cat([t for t in inputs if t is not None], dim=axis)


@_op("Shape")
def _shape(spec: _NodeSpec) -> Kernel:
    start, end = spec.attrs.get("start", 0), spec.attrs.get("end")

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        dims = list(inputs[0].shape)[start:end]
        return torch.tensor(dims, dtype=torch.int64, device=inputs[0].device)

    return run


@_op("Gather")
def _gather(spec: _NodeSpec) -> Kernel:
    axis = spec.attrs.get("axis", 0)

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x, idx = inputs[0], inputs[1].long()
        a = _norm_axis(axis, x.ndim)
        idx = torch.where(idx < 0, idx + x.shape[a], idx)
        out = x.index_select(a, idx.reshape(-1))
        return out.reshape(*x.shape[:a], *idx.shape, *x.shape[a + 1:])

    return run


@_op("Pad")
def _pad(spec: _NodeSpec) -> Kernel:
    mode = spec.attrs.get("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise spec.fail(f"mode={mode!r} is not supported")

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        if spec.opset < 11:
            pads, value, axes = list(spec.attrs["pads"]), spec.attrs.get("value", 0.0), None
        else:
            pads = _ints(inputs[1])
            value_t = inputs[2] if len(inputs) > 2 else None
            value = 0.0 if value_t is None else float(value_t.reshape(-1)[0])
            axes = _ints(inputs[3]) if len(inputs) > 3 else None
        if axes is not None:  # expand to all axes
            full = [0] * (2 * x.ndim)
            for i, a in enumerate(_norm_axis(a, x.ndim) for a in axes):
                full[a], full[a + x.ndim] = pads[i], pads[i + len(axes)]
            pads = full
        torch_pads = _torch_pad_order(pads)
        while torch_pads and torch_pads[-2:] == [0, 0]:  # drop untouched leading dims (reflect/replicate need it)
            torch_pads = torch_pads[:-2]
        if not torch_pads:
            return x
        if torch_mode == "constant":
            return F.pad(x, torch_pads, mode="constant", value=value)
        return F.pad(x, torch_pads, mode=torch_mode)

    return run


@_op("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(spec: _NodeSpec) -> Kernel:
    keepdims = bool(spec.attrs.get("keepdims", 1))
    noop_empty = bool(spec.attrs.get("noop_with_empty_axes", 0))
    # axes moved from attribute to input: ReduceSum in opset 13, the others in opset 18
    axes_is_input = spec.opset >= (13 if spec.op_type == "ReduceSum" else 18)
    attr_axes = None if axes_is_input else spec.attrs.get("axes")

    def run(inputs: list, ctx: _RunContext) -> torch.Tensor:
        x = inputs[0]
        axes = _ints(inputs[1] if len(inputs) > 1 else None) if axes_is_input else attr_axes
        if not axes:
            if noop_empty:
                return x
            axes = list(range(x.ndim))
        dims = tuple(_norm_axis(a, x.ndim) for a in axes)
        if spec.op_type == "ReduceMean":
            return x.mean(dim=dims, keepdim=keepdims)
        if spec.op_type == "ReduceSum":
            return x.sum(dim=dims, keepdim=keepdims)
        return x.amax(dim=dims, keepdim=keepdims)

    return run


@_op("Dropout")
def _dropout(spec: _NodeSpec) -> Kernel:
    # Inference: identity; the optional mask output is all true.
    def run(inputs: list, ctx: _RunContext):
        x = inputs[0]
        return (x, torch.ones_like(x, dtype=torch.bool)) if spec.n_outputs > 1 else x

    return run


SUPPORTED_OPS: frozenset[str] = frozenset(_BUILDERS) | {"Constant"}


# --- the graph module ---------------------------------------------------------------------------------------------


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, list):
            value = [v.decode("utf-8") if isinstance(v, bytes) else v for v in value]
        attrs[attr.name] = value
    return attrs


def _constant_value(node: onnx.NodeProto, source: str) -> np.ndarray:
    attrs = _attributes(node)
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise UnsupportedOnnxOpError(
        f"ONNX Constant node {node.name!r} in {source}: attributes {sorted(attrs)} are not supported")


def _static_shape(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """Declared shape of a graph input/output (None for an unknown dim), or None if no shape is declared."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


class OnnxGraph(nn.Module):
    """An ONNX graph run node by node with torch ops.

    ``forward(*inputs)`` takes one float tensor per graph input (in the graph's input order) and returns the
    graph's output tensor, or a tuple of them when the graph has several outputs. Shapes are checked against the
    declared input shapes, except the leading (batch) dimension: a graph exported with a fixed batch size b0
    runs with any batch B, reading a leading ``b0`` in a Reshape target as ``B`` (which is what the exporter
    baked in for ``x.view(x.size(0), -1)``); at B = b0 the ONNX semantics are unchanged.

    Attributes:
        source: the file (or label) the graph came from, for messages.
        opset: the default-domain opset version.
        input_names, output_names: graph input / output names.
        input_shapes, output_shapes: declared shapes (None for a symbolic dim; None if undeclared).
    """

    def __init__(self, model: onnx.ModelProto, source: str = "<onnx model>"):
        super().__init__()
        self.source = source
        graph = model.graph
        opsets = {o.domain: o.version for o in model.opset_import}
        self.opset = opsets.get("", opsets.get("ai.onnx", 1))

        consts: dict[str, np.ndarray] = {}
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
                raise OnnxGraphError(f"{source}: initializer {tensor.name!r} lives in external data that was not "
                                     "loaded; pass external_data_dir to load_onnx_graph")
            consts[tensor.name] = numpy_helper.to_array(tensor)

        inputs = [vi for vi in graph.input if vi.name not in consts]
        self.input_names = [vi.name for vi in inputs]
        self.output_names = [vi.name for vi in graph.output]
        self.input_shapes = [_static_shape(vi) for vi in inputs]
        self.output_shapes = [_static_shape(vi) for vi in graph.output]
        first = self.input_shapes[0] if self.input_shapes else None
        self._exported_batch = first[0] if first else None

        # Kernels first (so an unsupported op fails before anything else), then a topological order.
        nodes: list[tuple[onnx.NodeProto, Kernel | None]] = []
        for i, node in enumerate(graph.node):
            name = node.name or f"#{i}"
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedOnnxOpError(
                    f"unsupported ONNX op {node.domain}::{node.op_type} (node {name!r}) in {source}; "
                    f"only the default domain is implemented")
            if node.op_type == "Constant":
                consts[node.output[0]] = _constant_value(node, source)
                continue
            builder = _BUILDERS.get(node.op_type)
            if builder is None:
                raise UnsupportedOnnxOpError(
                    f"unsupported ONNX op {node.op_type!r} (node {name!r}) in {source}; "
                    f"supported: {', '.join(sorted(SUPPORTED_OPS))}")
            spec = _NodeSpec(node.op_type, name, _attributes(node), self.opset, source, len(node.output),
                             tuple(node.input), {n: consts[n] for n in node.input if n in consts})
            nodes.append((node, builder(spec)))

        available = set(consts) | set(self.input_names)
        ordered = self._toposort([n for n, _ in nodes], available)
        kernels = {id(n): k for n, k in nodes}

        # Constants become buffers under safe names (ONNX names contain '.', '/', ':').
        self._const_keys: dict[str, str] = {}
        for j, (name, array) in enumerate(consts.items()):
            key = f"const_{j}"
            self.register_buffer(key, torch.from_numpy(np.array(array, copy=True)), persistent=True)
            self._const_keys[name] = key

        # Steps: (kernel, input names, output names, names whose last use is this step).
        last_use: dict[str, int] = {}
        for step, node in enumerate(ordered):
            for name in node.input:
                if name:
                    last_use[name] = step
        keep = set(self.output_names)
        self._steps: list[tuple[Kernel, list[str], list[str], list[str]]] = []
        self._step_ops: list[str] = []
        for step, node in enumerate(ordered):
            dead = [n for n in set(node.input) if n and last_use.get(n) == step and n not in keep
                    and n not in self._const_keys]
            self._steps.append((kernels[id(node)], list(node.input), list(node.output), dead))
            self._step_ops.append(node.op_type)

        missing = [n for n in self.output_names if n not in available and n not in self._const_keys
                   and not any(n in node.output for node in ordered)]
        if missing:
            raise OnnxGraphError(f"{source}: graph outputs {missing} are produced by no node")
        log.debug("loaded ONNX graph %s: opset %d, %d nodes, %d constants", source, self.opset,
                  len(self._steps), len(self._const_keys))

    def _toposort(self, nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
        """Kahn's order over the nodes (files are usually sorted already; this also catches dangling inputs)."""
        ready = set(available)
        pending = list(nodes)
        ordered: list[onnx.NodeProto] = []
        while pending:
            rest = []
            for node in pending:
                if all(not n or n in ready for n in node.input):
                    ordered.append(node)
                    ready.update(node.output)
                else:
                    rest.append(node)
            if len(rest) == len(pending):
                node = rest[0]
                absent = [n for n in node.input if n and n not in ready]
                raise OnnxGraphError(f"{self.source}: node {node.name!r} ({node.op_type}) needs {absent}, "
                                     "which no node or initializer produces (or the graph has a cycle)")
            pending = rest
        return ordered

    def _check_inputs(self, inputs: tuple[torch.Tensor, ...]) -> int:
        if len(inputs) != len(self.input_names):
            raise ShapeError(f"{self.source}: expects {len(self.input_names)} input(s) {self.input_names}, "
                             f"got {len(inputs)}")
        batch = None
        for name, shape, x in zip(self.input_names, self.input_shapes, inputs):
            if not isinstance(x, torch.Tensor):
                raise ShapeError(f"{self.source}: input {name!r} must be a tensor, got {type(x).__name__}")
            if shape is None:
                continue
            expected = "×".join("B" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(shape))
            if x.ndim != len(shape) or any(d is not None and d != s
                                           for d, s in zip(shape[1:], x.shape[1:])):
                raise ShapeError(f"{self.source}: input {name!r} must be {expected}, got {tuple(x.shape)}")
            if batch is None and x.ndim > 0:
                batch = x.shape[0]
        return batch if batch is not None else 1

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        ctx = _RunContext(batch=self._check_inputs(inputs), exported_batch=self._exported_batch)
        values: dict[str, torch.Tensor] = {name: getattr(self, key) for name, key in self._const_keys.items()}
        values.update(zip(self.input_names, inputs))
        for kernel, in_names, out_names, dead in self._steps:
            result = kernel([values[n] if n else None for n in in_names], ctx)
            if isinstance(result, torch.Tensor):
                result = (result,)
            for name, tensor in zip(out_names, result):
                if name:
                    values[name] = tensor
            for name in dead:  # free intermediates early: matters for large batches under autograd-free runs
                values.pop(name, None)
        outputs = tuple(values[n] for n in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each op type the graph runs (Constant nodes excluded: they are buffers)."""
        counts: dict[str, int] = {}
        for op in self._step_ops:
            counts[op] = counts.get(op, 0) + 1
        return counts


def _uses_external_data(model: onnx.ModelProto) -> bool:
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)


def load_onnx_graph(path: Path | str, external_data_dir: Path | str | None = None) -> OnnxGraph:
    """Load an ``.onnx`` file as an :class:`OnnxGraph` (eval mode, constants as buffers, on CPU, float32 as stored).

    Args:
        path: the ``.onnx`` file.
        external_data_dir: folder holding the graph's external-data files (tensors stored outside the
            ``.onnx``, e.g. ``model.onnx.data``), under the file names the graph records. Default: the
            folder of ``path``. Only read when the graph refers to external data.

    Raises:
        OnnxGraphError: the file cannot be parsed, or external data is missing.
        UnsupportedOnnxOpError: the graph uses an op this interpreter does not implement (names the op and file).
    """
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError; report it in one line with the file
        raise OnnxGraphError(f"cannot parse ONNX file {path}: {exc}") from exc
    if _uses_external_data(model):
        base = Path(external_data_dir) if external_data_dir is not None else path.parent
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # missing/irregular file, bad offsets
            raise OnnxGraphError(f"cannot load external data of {path} from {base}: {exc}") from exc
    return OnnxGraph(model, source=str(path)).eval()
