"""Any ONNX face network as a trainable torch module and a kit backbone.

The graph (folded by `kinret.models.onnx_graph.fold_constants`) is run node by node in graph order with the torch op
table of `kinret.models.onnx_ops`. Every initializer a layer uses as a weight (Conv, Gemm, MatMul, BatchNorm scale
and bias, PReLU slopes, a bias or scale vector of Add/Mul) becomes an `nn.Parameter`; BatchNorm running statistics
and scalar constants become buffers; integer constants (shapes, axes) are non-persistent buffers. With `freeze_bn`
(default) BatchNorm uses its running statistics and Dropout is off even in train mode, as `SFaceNet` does.

The backbone interface of `kinret.models.networks` comes from the graph's own structure (`kinret.models.onnx_chain`):
`forward_features` gives the feature map (the last 4-D tensor everything flows through before the embedding is
flattened or pooled), `forward_native` the graph's own output from it, and the units between cut points give the
unit chain (`kinret.models.units.UnitChain`: `forward_prefix` / `forward_rest`, parameter names grouped per unit as
`units.K.`), so `freeze_units` freezes and caches the leading units. `to_onnx` writes the module's weights back into
the graph for the fast runtimes.

The input convention (`CONVENTIONS`) says how the kit's RGB input in 0..1 is normalised (the data config's mean/std)
and whether the graph wants BGR; the module flips the channels and transposes to NHWC where the graph asks.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kinret.errors import KinretInputError
from kinret.models.onnx_chain import WEIGHTED, Chain, GraphNode, chain_of
from kinret.models.onnx_graph import (
    GraphInfo,
    attributes,
    constants_of,
    fold_constants,
    graph_with_weights,
    inspect_graph,
    read_graph,
)
from kinret.models.onnx_ops import OPS, OpContext
from kinret.models.units import NativeEmbedding, UnitChain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputConvention:
    """How a network wants its pixels: ((x / 255) - mean) / std per RGB channel, then BGR when `bgr`."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool
    note: str

    def data_config(self, size: int) -> dict:
        """The kit's data config (input size, mean and std in 0..1 units) for this convention."""
        return {"input_size": (3, size, size), "mean": self.mean, "std": self.std}


CONVENTIONS: dict[str, InputConvention] = {
    "insightface": InputConvention((0.5,) * 3, (0.5,) * 3, False, "RGB, (x - 127.5) / 127.5 (ArcFace model packs)"),
    "sface": InputConvention((0.0,) * 3, (1 / 255,) * 3, True, "BGR, raw 0..255 (OpenCV Zoo SFace)"),
    "facenet": InputConvention((0.5,) * 3, (128 / 255,) * 3, False, "RGB, (x - 127.5) / 128"),
    "imagenet": InputConvention((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False, "RGB, ImageNet mean/std"),
    "raw-rgb": InputConvention((0.0,) * 3, (1 / 255,) * 3, False, "RGB, raw 0..255 (graphs that normalise inside)"),
    "unit-rgb": InputConvention((0.0,) * 3, (1.0,) * 3, False, "RGB, x / 255 in 0..1"),
}
# (operator, input index) slots read as trained weights, and BatchNorm's running statistics
PARAM_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
               "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
               "PRelu": (1,)}
STATS_SLOTS = {"BatchNormalization": (3, 4)}
VECTOR_PARAM_OPS = {"Add", "Sub", "Mul", "Div"}  # a float constant of more than one element here is a weight
CHECK_COSINE = 0.999  # the torch module must agree this well with the graph run by cv2 / onnxruntime


def convention(name: str) -> InputConvention:
    if name not in CONVENTIONS:
        raise KinretInputError(None, f"unknown input convention {name!r}; one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]


# ---- graph to node list -------------------------------------------------------------------------------------------
def graph_nodes(model: Any, label: str) -> list[GraphNode]:
    """The compute nodes of a folded graph; a KinretInputError naming the file and the operators the torch op
    table lacks."""
    nodes = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            raise KinretInputError(label, f"operator {n.domain}.{n.op_type} (node {n.name!r}) is outside the "
                                          "standard ONNX domain: no torch conversion")
        nodes.append(GraphNode(n.op_type, tuple(n.input), tuple(n.output), {**attributes(n), "_op": n.op_type},
                               n.name))
    missing = sorted({n.op for n in nodes} - set(OPS))
    if missing:
        raise KinretInputError(label, f"operators {missing} have no torch conversion (kinret.models.onnx_ops); "
                                      "the frozen runtimes (cv2, onnxruntime) may still run the graph")
    return nodes


def ancestors(nodes: Sequence[GraphNode], output: str) -> list[GraphNode]:
    """The nodes `output` depends on, in graph order."""
    needed, kept = {output}, []
    for n in reversed(nodes):
        if needed & set(n.outputs):
            kept.append(n)
            needed |= {t for t in n.inputs if t}
    return kept[::-1]


def run_nodes(nodes: Sequence[GraphNode], env: dict[str, torch.Tensor], const: Callable[[str], torch.Tensor],
              ctx: OpContext) -> None:
    """Run `nodes` in order, reading `env` (then the constants) and writing their outputs into `env`."""
    for n in nodes:
        args = [env[t] if t in env else const(t) if t else None for t in n.inputs]
        out = OPS[n.op](args, n.attrs, ctx)
        for name, value in zip(n.outputs, out if isinstance(out, tuple) else (out,), strict=False):
            if name:
                env[name] = value


def fold_static(nodes: Sequence[GraphNode], consts: dict[str, torch.Tensor], ctx: OpContext) -> list[GraphNode]:
    """Evaluate once the nodes that read constants only (shape arithmetic, say); their results join `consts`.
    Returns the nodes left, which all depend on the input."""
    dynamic = []
    for n in nodes:
        if all(t in consts for t in n.inputs if t):
            run_nodes([n], consts, consts.__getitem__, ctx)
        else:
            dynamic.append(n)
    return dynamic


def const_kinds(nodes: Sequence[GraphNode], consts: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each constant the nodes read: "param" (trained), "stats" (BatchNorm running statistics), "buffer" (other
    float constants) or "index" (integer and boolean constants)."""
    kinds: dict[str, str] = {}
    for n in nodes:
        for i, t in enumerate(n.inputs):
            if t not in consts:
                continue
            v = consts[t]
            if not v.is_floating_point():
                kind = "index"
            elif i in PARAM_SLOTS.get(n.op, ()) or (n.op in VECTOR_PARAM_OPS and v.numel() > 1):
                kind = "param"
            elif i in STATS_SLOTS.get(n.op, ()):
                kind = "stats"
            else:
                kind = "buffer"
            rank = ["index", "buffer", "stats", "param"]
            kinds[t] = max(kinds.get(t, "index"), kind, key=rank.index)
    return kinds


def _safe_name(name: str, module: nn.Module) -> str:
    base = re.sub(r"\W+", "_", name).strip("_") or "w"
    base = f"w_{base}" if base[0].isdigit() else base
    out, k = base, 1
    while hasattr(module, out):
        k += 1
        out = f"{base}_{k}"
    return out


class GraphPart(nn.Module):
    """A run of graph nodes with the constants it is the first to read, registered under names made from the
    graph's (`onnx_names`: graph name -> attribute)."""

    def __init__(self, nodes: Sequence[GraphNode], consts: dict[str, tuple[torch.Tensor, str]]):
        super().__init__()
        self.nodes = list(nodes)
        self.onnx_names: dict[str, str] = {}
        for name, (value, kind) in consts.items():
            attr = _safe_name(name, self)
            if kind == "param":
                self.register_parameter(attr, nn.Parameter(value.float().clone()))
            elif kind == "index":
                self.register_buffer(attr, value.clone(), persistent=False)
            else:
                self.register_buffer(attr, value.float().clone())
            self.onnx_names[name] = attr


def _skeleton(folded: Any, nodes: Sequence[GraphNode], output: str) -> bytes:
    """The graph of `nodes` without initializers, `output` its one output: what `to_onnx` fills with weights."""
    import onnx
    from onnx import TensorProto, helper

    keep = {n.outputs for n in nodes}
    model = onnx.ModelProto()
    model.ir_version = folded.ir_version
    model.opset_import.extend(folded.opset_import)
    model.graph.name = folded.graph.name or "graph"
    model.graph.input.extend(folded.graph.input)
    model.graph.node.extend(p for p in folded.graph.node if tuple(p.output) in keep)
    declared = {o.name: o for o in folded.graph.output}
    model.graph.output.append(declared.get(output) or helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
    return model.SerializeToString()


class OnnxBackbone(UnitChain, NativeEmbedding):
    """An ONNX face network as a kit backbone (see the module docstring); built by `build_onnx_backbone`."""

    def __init__(self, folded: Any, info: GraphInfo, conv: InputConvention, freeze_bn: bool = True):
        super().__init__()
        self.info, self.convention, self.freeze_bn = info, conv, freeze_bn
        self.opset = next((o.version for o in folded.opset_import if o.domain in ("", "ai.onnx")), 13)
        consts = {k: torch.from_numpy(np.array(v)) for k, v in constants_of(folded).items()}
        self._dtypes = {k: v.numpy().dtype for k, v in consts.items()}
        nodes = fold_static(ancestors(graph_nodes(folded, info.path), info.output), consts, OpContext(opset=self.opset))
        kinds = const_kinds(nodes, consts)
        shapes = self._trace(nodes, consts)
        chain = chain_of(nodes, info.input_name, info.output, shapes, info.layout,
                         lambda n: n.op in WEIGHTED and any(kinds.get(t) == "param" for t in n.inputs))
        if chain is None:
            raise KinretInputError(info.path, "no 4-D feature map (N, C, H, W) with H x W > 1 flows into the "
                                              f"embedding {info.output!r}: the poolings need one")
        parts = [nodes[a:b] for a, b in chain.unit_ranges()] + [nodes[chain.fmap_index + 1:]]
        owner: dict[str, int] = {}
        for k, part in enumerate(parts):
            for n in part:
                owner.update({t: k for t in n.inputs if t in kinds and t not in owner})
        built = [GraphPart(part, {t: (consts[t], kinds[t]) for t in kinds if owner[t] == k})
                 for k, part in enumerate(parts)]
        self.units, self.head = nn.ModuleList(built[:-1]), built[-1]
        self._where = {t: (k, p.onnx_names[t]) for k, p in enumerate(built) for t in p.onnx_names}
        self.chain: Chain = chain
        fmap_shape = shapes[chain.fmap]
        self.num_features = fmap_shape[1] if chain.fmap_layout == "NCHW" else fmap_shape[3]
        self.native_features = int(np.prod(shapes[info.output][1:]))
        self.shapes = shapes  # of every tensor on a one-image pass
        self._skeleton = _skeleton(folded, nodes, info.output)
        self.eval()

    def _trace(self, nodes: Sequence[GraphNode], consts: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor on a probe pass of one image."""
        s = self.info.size
        shape = (1, 3, s, s) if self.info.layout == "NCHW" else (1, s, s, 3)
        env = {self.info.input_name: torch.randn(shape, generator=torch.Generator().manual_seed(0))}
        with torch.no_grad():
            run_nodes(nodes, env, consts.__getitem__, OpContext(opset=self.opset))
        return {k: tuple(v.shape) for k, v in env.items()}

    # ---- running the graph -----------------------------------------------------------------------------------
    def _const(self, name: str) -> torch.Tensor:
        k, attr = self._where[name]
        return getattr(self.head if k == len(self.units) else self.units[k], attr)

    def _run(self, parts: Sequence[GraphPart], env: dict[str, torch.Tensor]) -> None:
        train = self.training and not self.freeze_bn
        ctx = OpContext(bn_train=train, dropout_train=train, opset=self.opset)
        for part in parts:
            run_nodes(part.nodes, env, self._const, ctx)

    def graph_input(self, x: torch.Tensor) -> torch.Tensor:
        """The kit's normalised RGB NCHW batch as the graph takes it (BGR and NHWC where the graph asks)."""
        x = x.flip(1) if self.convention.bgr else x
        return x.permute(0, 2, 3, 1) if self.info.layout == "NHWC" else x

    def _to_nchw(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.permute(0, 3, 1, 2) if self.chain.fmap_layout == "NHWC" else fmap

    def forward_prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """The tensor after the first `cut` units (`chain.cut_names[cut]`) on the kit's input."""
        if not 0 <= cut <= len(self.units):
            raise ValueError(f"cut {cut} outside 0..{len(self.units)}")
        env = {self.info.input_name: self.graph_input(x)}
        self._run(self.units[:cut], env)
        return env[self.chain.cut_names[cut]]

    def forward_rest(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        """The units after `cut`: forward_rest(forward_prefix(x, k), k) == forward_features(x) for every k."""
        env = {self.chain.cut_names[cut]: h}
        self._run(self.units[cut:], env)
        return self._to_nchw(env[self.chain.fmap])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The kit's input -> the feature map (N, C, H, W)."""
        return self.forward_rest(self.forward_prefix(x, 0), 0)

    def forward_native(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> the graph's own output, flattened to (N, D)."""
        env = {self.chain.fmap: fmap.permute(0, 2, 3, 1) if self.chain.fmap_layout == "NHWC" else fmap}
        self._run([self.head], env)
        return env[self.info.output].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_native(self.forward_features(x))

    def chain_units(self) -> nn.ModuleList:
        return self.units

    # ---- writing back -----------------------------------------------------------------------------------------
    def onnx_weights(self) -> dict[str, np.ndarray]:
        """Every constant of the module under its graph name, in the graph's own type."""
        return {t: self._const(t).detach().cpu().numpy().astype(self._dtypes[t]) for t in self._where}

    def to_onnx(self, outputs: Sequence[str] | None = None) -> bytes:
        """The graph with this module's current weights (float32 where they were quantised), its outputs `outputs`
        (default: the embedding), serialised: what cv2.dnn or onnxruntime runs."""
        return graph_with_weights(self._skeleton, self.onnx_weights(), list(outputs or [self.info.output]),
                                  self.shapes)


# ---- building and checking ------------------------------------------------------------------------------------------
_CHECKED: set[tuple] = set()  # files whose conversion this process has already checked against the graph
_BUILT: dict[tuple, tuple[OnnxBackbone, Any]] = {}  # the last conversion (and its folded graph) this process made


def probe_batch(backbone: OnnxBackbone) -> torch.Tensor:
    """A fixed batch of two random faces in the kit's input (normalised by the convention's mean/std)."""
    from kinret.data.pixels import normalize, to_float

    s = backbone.info.size
    pixels = np.random.default_rng(0).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    return normalize(to_float(pixels, torch.device("cpu")), backbone.convention.mean, backbone.convention.std)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def check_against_graph(backbone: OnnxBackbone, graph: bytes, engine: str = "auto") -> float:
    """The lowest cosine between the torch module's output and the serialised `graph` run by cv2.dnn (or
    onnxruntime) on `probe_batch`, one image at a time; a KinretInputError naming the file below CHECK_COSINE."""
    from kinret.models.onnx_graph import open_engine

    x = probe_batch(backbone)
    with torch.no_grad():
        was = backbone.training
        ref = backbone.eval()(x).numpy()
        backbone.train(was)
        gin = backbone.graph_input(x).contiguous().numpy()
    out = [backbone.info.output]
    eng, first = open_engine(graph, backbone.info.input_name, out, gin[:1], engine)
    got = np.concatenate([first[0].reshape(1, -1)] + [eng.run(g[None], out)[0].reshape(1, -1) for g in gin[1:]])
    cos = float(cosines(ref, got).min())
    log.info("%s: torch conversion against %s: cosine %.6f", backbone.info.path, eng.engine, cos)
    if not cos >= CHECK_COSINE:
        raise KinretInputError(backbone.info.path, f"the torch conversion computes other numbers than the graph run "
                                                   f"by {eng.engine} (cosine {cos:.4f} < {CHECK_COSINE})")
    return cos


def build_onnx_backbone(path: str | Path, input_convention: str = "insightface", size: int | None = None,
                        output: str | None = None, freeze_bn: bool = True,
                        check: bool = True) -> tuple[OnnxBackbone, dict]:
    """The ONNX face network in `path` as a backbone (eval mode) and its data config. `size` must match the
    graph's input where the graph fixes it; `output` chooses the embedding of a graph with several outputs. With
    `check`, the conversion is compared with the graph run by cv2.dnn / onnxruntime once per file and process.
    A process converts a file once: later calls get a copy of that conversion."""
    conv = convention(input_convention)
    stat = Path(path).stat() if Path(path).is_file() else None
    key = (str(Path(path).resolve()), stat and stat.st_size, stat and stat.st_mtime_ns, size, output, input_convention)
    if key not in _BUILT:
        model = read_graph(path)
        info = inspect_graph(model, path, size, output)
        folded = fold_constants(model)
        del model
        _BUILT.clear()  # one conversion kept: a process uses one network at a time
        _BUILT[key] = (OnnxBackbone(folded, info, conv, freeze_bn), folded)
    built, folded = _BUILT[key]
    backbone = copy.deepcopy(built)
    backbone.freeze_bn = freeze_bn
    if check and key not in _CHECKED:
        check_against_graph(backbone, graph_with_weights(folded, {}, [backbone.info.output]))
        _CHECKED.add(key)
    return backbone, conv.data_config(backbone.info.size)
