"""ONNX operators in torch, as face networks use them: the op table `OPS` that `kinret.models.onnx_net` runs a graph
with. Each entry takes the node's inputs (tensors, None for an omitted optional input), its attributes and the
`OpContext`, and returns its output tensor (or a tuple when the node has several outputs).

Semantics follow the ONNX operator specifications for the attribute defaults the common exporters write, including
the older opsets where an input used to be an attribute (Squeeze/Unsqueeze/Reduce* axes, Clip bounds, Pad pads,
Slice starts/ends, Dropout ratio). What a graph holds outside this table is refused by name when it is converted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class OpContext:
    """What an operator needs beyond its inputs: the BatchNorm and Dropout modes of this pass and the opset."""

    bn_train: bool = False  # batch statistics (and running-statistics updates) instead of the running ones
    dropout_train: bool = False
    opset: int = 13


Op = Callable[[list, dict, OpContext], Any]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _ints(t: Tensor | Sequence[int] | None) -> list[int] | None:
    if t is None:
        return None
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, Tensor) else t)]


def _arg_or_attr(args: list, index: int, a: dict, name: str) -> list[int] | None:
    """Opset-dependent parameters: an attribute in older opsets, an input in newer ones."""
    if name in a:
        return _ints(a[name])
    return _ints(args[index]) if len(args) > index and args[index] is not None else None


# ---- elementwise ------------------------------------------------------------------------------------------------
UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Erf": torch.erf,
    "Floor": torch.floor, "Ceil": torch.ceil, "Softplus": F.softplus, "HardSwish": F.hardswish, "Mish": F.mish,
}
BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
}
for _name, _fn in UNARY.items():
    OPS[_name] = lambda args, a, ctx, _fn=_fn: _fn(args[0])
for _name, _fn in BINARY.items():
    OPS[_name] = lambda args, a, ctx, _fn=_fn: _fn(args[0], args[1])

OPS["Identity"] = lambda args, a, ctx: args[0]
OPS["Gelu"] = lambda args, a, ctx: F.gelu(args[0], approximate=a.get("approximate", "none"))
OPS["LeakyRelu"] = lambda args, a, ctx: F.leaky_relu(args[0], a.get("alpha", 0.01))
OPS["Elu"] = lambda args, a, ctx: F.elu(args[0], a.get("alpha", 1.0))
OPS["HardSigmoid"] = lambda args, a, ctx: torch.clamp(a.get("alpha", 0.2) * args[0] + a.get("beta", 0.5), 0, 1)
OPS["Max"] = lambda args, a, ctx: _reduce_pairwise(torch.maximum, args)
OPS["Min"] = lambda args, a, ctx: _reduce_pairwise(torch.minimum, args)
OPS["Sum"] = lambda args, a, ctx: _reduce_pairwise(torch.add, args)


def _reduce_pairwise(fn: Callable[[Tensor, Tensor], Tensor], args: list) -> Tensor:
    out = args[0]
    for t in args[1:]:
        out = fn(out, t)
    return out


@op("PRelu")
def prelu(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, slope = args
    aligned = (1,) * (x.ndim - slope.ndim) + tuple(slope.shape)
    if x.ndim >= 2 and (slope.numel() == 1 or aligned[1] == slope.numel() == x.shape[1]):
        return F.prelu(x, slope.reshape(-1))  # per-channel (or shared) slope: torch's fused kernel
    return torch.where(x >= 0, x, x * slope)  # any other broadcast the spec allows


@op("Clip")
def clip(args: list, a: dict, ctx: OpContext) -> Tensor:
    lo = a.get("min", args[1] if len(args) > 1 else None)
    hi = a.get("max", args[2] if len(args) > 2 else None)
    lo, hi = (float(v) if v is not None else None for v in (lo, hi))
    return torch.clamp(args[0], lo, hi)


@op("Softmax", "LogSoftmax")
def softmax(args: list, a: dict, ctx: OpContext) -> Tensor:
    axis = a.get("axis", -1 if ctx.opset >= 13 else 1)
    return F.log_softmax(args[0], axis) if a["_op"] == "LogSoftmax" else F.softmax(args[0], axis)


@op("LpNormalization")
def lp_normalization(args: list, a: dict, ctx: OpContext) -> Tensor:
    return F.normalize(args[0], p=a.get("p", 2), dim=a.get("axis", -1), eps=0.0)


# ---- layers with weights ----------------------------------------------------------------------------------------
def _same_pads(x: Tensor, kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int], mode: str) -> list[int]:
    """auto_pad SAME_UPPER/SAME_LOWER as explicit ONNX pads (begins then ends)."""
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dil, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


def _explicit_pads(x: Tensor, a: dict, kernel: Sequence[int], strides: Sequence[int],
                   dil: Sequence[int]) -> list[int]:
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(x, kernel, strides, dil, mode)
    return list(a.get("pads", [0] * 2 * len(kernel))) if mode != "VALID" else [0] * 2 * len(kernel)


def _split_pads(x: Tensor, pads: list[int], value: float) -> tuple[Tensor, list[int]]:
    """Symmetric pads go to the layer; asymmetric ones are applied to x first (F.pad lists the last axis first)."""
    n = len(pads) // 2
    begins, ends = pads[:n], pads[n:]
    if begins == ends:
        return x, begins
    torch_pads = [p for i in reversed(range(n)) for p in (begins[i], ends[i])]
    return F.pad(x, torch_pads, value=value), [0] * n


@op("Conv")
def conv(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = w.ndim - 2
    strides, dil = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    pads = _explicit_pads(x, a, w.shape[2:], strides, dil)
    x, padding = _split_pads(x, pads, 0.0)
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, tuple(strides), tuple(padding), tuple(dil), a.get("group", 1))


@op("BatchNormalization")
def batch_norm(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, scale, bias, mean, var = args[:5]
    # ONNX: running = running * momentum + batch * (1 - momentum); torch's momentum is the batch's weight
    return F.batch_norm(x, mean, var, scale, bias, training=ctx.bn_train, momentum=1.0 - a.get("momentum", 0.9),
                        eps=a.get("epsilon", 1e-5))


@op("InstanceNormalization")
def instance_norm(args: list, a: dict, ctx: OpContext) -> Tensor:
    return F.instance_norm(args[0], weight=args[1], bias=args[2], eps=a.get("epsilon", 1e-5))


@op("LayerNormalization")
def layer_norm(args: list, a: dict, ctx: OpContext) -> Tensor:
    x = args[0]
    axis = a.get("axis", -1) % x.ndim
    scale = args[1]
    bias = args[2] if len(args) > 2 else None
    shape = x.shape[axis:]
    return F.layer_norm(x, shape, scale.expand(shape) if scale is not None else None,
                        bias.expand(shape) if bias is not None else None, eps=a.get("epsilon", 1e-5))


@op("Gemm")
def gemm(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, w = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    x = x.t() if a.get("transA", 0) else x
    if a.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (c is None or c.ndim == 1):
        return F.linear(x, w, c)
    y = alpha * (x @ (w.t() if a.get("transB", 0) else w))
    return y if c is None else y + beta * c


OPS["MatMul"] = lambda args, a, ctx: torch.matmul(args[0], args[1])


@op("Dropout")
def dropout(args: list, a: dict, ctx: OpContext) -> Tensor:
    ratio = a.get("ratio", float(args[1]) if len(args) > 1 and args[1] is not None else 0.5)
    return F.dropout(args[0], ratio, training=ctx.dropout_train)


# ---- pooling ----------------------------------------------------------------------------------------------------
OPS["GlobalAveragePool"] = lambda args, a, ctx: args[0].mean(dim=tuple(range(2, args[0].ndim)), keepdim=True)
OPS["GlobalMaxPool"] = lambda args, a, ctx: args[0].amax(dim=tuple(range(2, args[0].ndim)), keepdim=True)


@op("MaxPool", "AveragePool")
def pool(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, kernel = args[0], a["kernel_shape"]
    nd = len(kernel)
    strides, dil = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    pads = _explicit_pads(x, a, kernel, strides, dil)
    ceil = bool(a.get("ceil_mode", 0))
    if a["_op"] == "MaxPool":
        x, padding = _split_pads(x, pads, -math.inf)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return fn(x, kernel, strides, padding, dil, ceil_mode=ceil)
    include = bool(a.get("count_include_pad", 0))
    n = len(pads) // 2
    if pads[:n] != pads[n:] and not include:
        raise NotImplementedError("AveragePool with asymmetric pads and count_include_pad=0")
    x, padding = _split_pads(x, pads, 0.0)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return fn(x, kernel, strides, padding, ceil_mode=ceil, count_include_pad=include)


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2")
def reduce(args: list, a: dict, ctx: OpContext) -> Tensor:
    x = args[0]
    axes = _arg_or_attr(args, 1, a, "axes")
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    dims = tuple(v % x.ndim for v in axes)
    kind = a["_op"]
    if kind == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if kind == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    if kind == "ReduceL2":
        return torch.linalg.vector_norm(x, dim=dims, keepdim=keep)
    return x.amax(dim=dims, keepdim=keep) if kind == "ReduceMax" else x.amin(dim=dims, keepdim=keep)


# ---- shapes -------------------------------------------------------------------------------------------------------
@op("Flatten")
def flatten(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, axis = args[0], a.get("axis", 1)
    axis %= max(x.ndim, 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


@op("Reshape")
def reshape(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, shape = args[0], _ints(args[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


OPS["Transpose"] = lambda args, a, ctx: args[0].permute(a.get("perm", list(reversed(range(args[0].ndim)))))
OPS["Concat"] = lambda args, a, ctx: torch.cat([t for t in args if t is not None], dim=a["axis"])
OPS["Shape"] = lambda args, a, ctx: torch.tensor(args[0].shape[a.get("start", 0):a.get("end", None)],
                                                 dtype=torch.int64, device=args[0].device)


@op("Squeeze")
def squeeze(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, axes = args[0], _arg_or_attr(args, 1, a, "axes")
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(v % x.ndim for v in axes))


@op("Unsqueeze")
def unsqueeze(args: list, a: dict, ctx: OpContext) -> Tensor:
    x, axes = args[0], _arg_or_attr(args, 1, a, "axes")
    rank = x.ndim + len(axes)
    for ax in sorted(v % rank for v in axes):
        x = x.unsqueeze(ax)
    return x


@op("Gather")
def gather(args: list, a: dict, ctx: OpContext) -> Tensor:
    data, idx = args
    axis = a.get("axis", 0) % data.ndim
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])


@op("Slice")
def slice_(args: list, a: dict, ctx: OpContext) -> Tensor:
    x = args[0]
    starts, ends = _arg_or_attr(args, 1, a, "starts"), _arg_or_attr(args, 2, a, "ends")
    axes = _arg_or_attr(args, 3, a, "axes") or list(range(len(starts)))
    steps = _arg_or_attr(args, 4, a, "steps") or [1] * len(starts)
    index: list[slice] = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        if st <= 0:
            raise NotImplementedError("Slice with a negative step")
        size = x.shape[ax % x.ndim]
        index[ax % x.ndim] = slice(max(min(s, size), -size), max(min(e, size), -size - 1), st)
    return x[tuple(index)]


@op("Pad")
def pad(args: list, a: dict, ctx: OpContext) -> Tensor:
    x = args[0]
    pads = _arg_or_attr(args, 1, a, "pads")
    value = a.get("value", float(args[2]) if len(args) > 2 and args[2] is not None and args[2].numel() else 0.0)
    axes = _arg_or_attr(args, 3, a, "axes") or list(range(x.ndim))
    n = len(axes)
    full = [0] * (2 * x.ndim)
    for i, ax in enumerate(axes):
        full[ax % x.ndim], full[x.ndim + ax % x.ndim] = pads[i], pads[n + i]
    torch_pads = [p for i in reversed(range(x.ndim)) for p in (full[i], full[x.ndim + i])]
    while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:
        torch_pads = torch_pads[:-2]  # torch pads only trailing axes in reflect/replicate mode
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[a.get("mode", "constant")]
    return F.pad(x, torch_pads, mode=mode, value=value if mode == "constant" else None)


CAST_TYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16, 6: torch.int32,
              7: torch.int64, 9: torch.bool, 2: torch.uint8, 3: torch.int8}
OPS["Cast"] = lambda args, a, ctx: args[0].to(CAST_TYPES[a["to"]])
