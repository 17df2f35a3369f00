"""Where a face-network graph can be cut: the pure graph analysis behind `kinret.models.onnx_net`.

Given the compute nodes in graph (topological) order and the shapes of one traced pass:
- a *cut* is a tensor through which everything flows: right after the node that makes it, no other tensor computed
  from the input is still waiting to be read (inside a residual block the skip branch is, so blocks are not cut);
- the *feature map* is the last 4-D cut with more than one spatial position on the way to the embedding, in a known
  layout, skipping trailing Dropout/Identity (SFace: `bn1`, not the dropout after it);
- the *units* of the chain end at cuts: a new unit starts at the latest cut before a weighted layer (Conv, Gemm,
  MatMul) once the current unit holds one, so each unit is a layer with its normalisation and activation (SFace's
  27 Conv-BN-PReLU units) or a whole residual block (a ResNet's blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}  # the layers a unit is built around
PASS_THROUGH = {"Dropout", "Identity"}  # skipped when the feature map is chosen: eval-mode no-ops
KEEPS_LAYOUT = {"BatchNormalization", "InstanceNormalization", "PRelu", "Relu", "LeakyRelu", "Sigmoid", "Tanh",
                "HardSwish", "HardSigmoid", "Elu", "Clip", "Add", "Sub", "Mul", "Div", "Dropout", "Identity", "Pad",
                "Max", "Min", "Sum", "Mish", "Softplus", "Concat"}
MAKES_NCHW = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


@dataclass(frozen=True)
class GraphNode:
    """One compute node: its operator, tensor names and attributes (with the operator again under "_op")."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(hash=False)
    name: str = ""


@dataclass(frozen=True)
class Chain:
    """The cut of a graph: nodes [0, bounds[0]] are unit 0, (bounds[k-1], bounds[k]] unit k, the last unit ends at
    `fmap_index`; the nodes after it are the head. `cut_names[k]` is the tensor after k units (0: the input)."""

    bounds: tuple[int, ...]
    fmap_index: int
    fmap: str
    fmap_layout: str
    cut_names: tuple[str, ...]

    def unit_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) node ranges of the units, in order."""
        starts = [0] + [b + 1 for b in self.bounds]
        stops = [b + 1 for b in self.bounds] + [self.fmap_index + 1]
        return list(zip(starts, stops, strict=True))


def cuts(nodes: Sequence[GraphNode], input_name: str, output: str) -> dict[int, str]:
    """node index -> the tensor it makes when that tensor is all that flows on (every node reads only the input,
    earlier node outputs or constants, which are not counted)."""
    made = {input_name} | {t for n in nodes for t in n.outputs}
    last_read: dict[str, int] = {output: len(nodes)}
    for i, n in enumerate(nodes):
        for t in n.inputs:
            if t in made:
                last_read[t] = max(last_read.get(t, -1), i)
    live = {input_name}
    found = {}
    for i, n in enumerate(nodes):
        live |= {t for t in n.outputs if t}
        live = {t for t in live if last_read.get(t, -1) > i}
        if len(live) == 1 and next(iter(live)) in n.outputs:
            found[i] = next(iter(live))
    return found


def layouts(nodes: Sequence[GraphNode], shapes: dict[str, tuple[int, ...]], input_name: str,
            input_layout: str) -> dict[str, str]:
    """The layout ("NCHW" or "NHWC") of each 4-D tensor where its lineage tells it: the input's is declared, a Conv
    or pooling makes NCHW, a (0,2,3,1) / (0,3,1,2) Transpose swaps them, elementwise and normalising layers keep
    their first 4-D input's; anything else (a Reshape, say) leaves it unknown."""
    out = {input_name: input_layout}
    for n in nodes:
        y = n.outputs[0]
        if len(shapes.get(y, ())) != 4:
            continue
        src = next((out[t] for t in n.inputs if t in out and len(shapes.get(t, ())) == 4), None)
        if n.op in MAKES_NCHW:
            out[y] = "NCHW"
        elif n.op == "Transpose":
            perm = list(n.attrs.get("perm", []))
            if (src, perm) in (("NCHW", [0, 2, 3, 1]), ("NHWC", [0, 3, 1, 2])):
                out[y] = "NHWC" if src == "NCHW" else "NCHW"
            elif perm == [0, 1, 2, 3] and src:
                out[y] = src
        elif n.op in KEEPS_LAYOUT and src and shapes[y][1:] == shapes[_first_4d(n, shapes)][1:]:
            out[y] = src
    return out


def _first_4d(node: GraphNode, shapes: dict[str, tuple[int, ...]]) -> str:
    return next(t for t in node.inputs if len(shapes.get(t, ())) == 4)


def spatial_positions(shape: Sequence[int], layout: str) -> int:
    return shape[2] * shape[3] if layout == "NCHW" else shape[1] * shape[2]


def feature_map(nodes: Sequence[GraphNode], cut_at: dict[int, str], shapes: dict[str, tuple[int, ...]],
                layout_of: dict[str, str]) -> tuple[int, str, str] | None:
    """(node index, tensor, layout) of the feature map (see the module docstring), or None when there is none."""
    for i in sorted(cut_at, reverse=True):
        t = cut_at[i]
        shape, layout = shapes.get(t, ()), layout_of.get(t)
        if len(shape) == 4 and layout and nodes[i].op not in PASS_THROUGH and spatial_positions(shape, layout) > 1:
            return i, t, layout
    return None


def unit_bounds(nodes: Sequence[GraphNode], cut_at: dict[int, str], fmap_index: int,
                weighted: Callable[[GraphNode], bool] | None = None) -> list[int]:
    """Indices of the nodes that end a unit (before the feature map); `weighted(node)` says whether a node is a
    weighted layer (default: its operator is in WEIGHTED)."""
    is_weighted = weighted or (lambda n: n.op in WEIGHTED)
    bounds: list[int] = []
    holds_weights = False
    for i, n in enumerate(nodes[:fmap_index + 1]):
        if not is_weighted(n):
            continue
        start = bounds[-1] + 1 if bounds else 0
        latest = max((j for j in cut_at if start <= j < i), default=None)
        if holds_weights and latest is not None:
            bounds.append(latest)
        holds_weights = True
    return bounds


def chain_of(nodes: Sequence[GraphNode], input_name: str, output: str, shapes: dict[str, tuple[int, ...]],
             input_layout: str, weighted: Callable[[GraphNode], bool] | None = None) -> Chain | None:
    """The chain of units up to the feature map, or None when the graph has no 4-D feature map."""
    cut_at = cuts(nodes, input_name, output)
    found = feature_map(nodes, cut_at, shapes, layouts(nodes, shapes, input_name, input_layout))
    if found is None:
        return None
    fmap_index, fmap, layout = found
    bounds = unit_bounds(nodes, cut_at, fmap_index, weighted)
    names = (input_name,) + tuple(cut_at[b] for b in bounds) + (fmap,)
    return Chain(tuple(bounds), fmap_index, fmap, layout, names)
