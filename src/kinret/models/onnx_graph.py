"""ONNX face-network graphs: read and check a file, fold its constant subgraphs into plain weights, expose inner
tensors as graph outputs, write (fine-tuned) weights back, and run a serialised graph with cv2.dnn or onnxruntime.

The folded graph is what the rest of the kit sees: every chain of constant-only nodes on initializers
(DequantizeLinear per tensor, axis or block, Reshape, Transpose, Cast, Identity, Squeeze, Unsqueeze, Constant) is
evaluated once, so a block-quantised int8 file such as the bundled SFace and an ordinary float32 export look alike:
compute nodes reading float initializers. Each folded output keeps its own name and its own copy, so weights an
exporter deduplicated behind Identity nodes stay separate weights. Declared inputs that are initializers or that no
node reads are dropped (onnxruntime otherwise asks for them), the batch dimension is made symbolic, and inner
`value_info` is cleared (runtimes infer it again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kinret.errors import KinretInputError

CV2, ORT = "cv2", "onnxruntime"  # the engines that run a serialised graph
ENGINES = (CV2, ORT)


@dataclass(frozen=True)
class GraphInfo:
    """What the kit needs to know about a face-network graph before converting or running it."""

    path: str  # the file (or a label for an in-memory graph), named in every error
    input_name: str
    size: int  # the square input side in pixels
    layout: str  # "NCHW", or "NHWC" (then the kit transposes its NCHW input)
    output: str  # the chosen embedding tensor
    outputs: tuple[str, ...]  # every graph output


def read_graph(path: str | Path) -> Any:
    """The ONNX model in `path`; a KinretInputError naming the file when it is missing, unreadable or no graph."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise KinretInputError(path, "ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own types: the bytes are no ONNX model
        raise KinretInputError(path, f"not an ONNX graph ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    if not model.graph.node or not model.graph.output:
        raise KinretInputError(path, "not an ONNX graph: no nodes or no outputs")
    return model


def _array(tensor: Any) -> np.ndarray:
    """A TensorProto as numpy, in its declared shape (a scalar stays 0-d)."""
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).reshape(tuple(tensor.dims))


def attributes(node: Any) -> dict[str, Any]:
    """A node's attributes as Python values (strings decoded, tensors as numpy arrays)."""
    from onnx import AttributeProto, helper

    out = {}
    for a in node.attribute:
        value = _array(a.t) if a.type == AttributeProto.TENSOR else helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def image_inputs(model: Any) -> list[Any]:
    """The graph inputs a caller must feed: declared inputs that are no initializer and that some node reads."""
    inits = {t.name for t in model.graph.initializer}
    read = {i for n in model.graph.node for i in n.input}
    return [i for i in model.graph.input if i.name not in inits and i.name in read]


def _dims(value_info: Any) -> list[int | None]:
    """A tensor's dimensions, None where symbolic or unknown."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _input_geometry(label: str, inp: Any, size: int | None) -> tuple[int, str]:
    dims = _dims(inp)
    if len(dims) != 4:
        raise KinretInputError(label, f"input {inp.name!r} has {len(dims)} dimensions {dims}, not an image batch "
                                      "(N, 3, H, W) or (N, H, W, 3)")
    layout = "NCHW" if dims[1] == 3 else "NHWC" if dims[3] == 3 else ""
    if not layout:
        raise KinretInputError(label, f"input {inp.name!r} of shape {dims} has no 3-channel axis (1 or 3): a face "
                                      "network here takes colour images")
    h, w = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if h is not None and w is not None and h != w:
        raise KinretInputError(label, f"input {inp.name!r} is {h}x{w}: not square (the kit feeds square faces)")
    side = h if h is not None else w
    if side is None and size is None:
        raise KinretInputError(label, f"input {inp.name!r} does not fix its size {dims}: set input_size")
    if side is not None and size is not None and side != size:
        raise KinretInputError(label, f"input {inp.name!r} is {side}x{side} but input_size {size} was asked")
    return int(side if side is not None else size), layout


def inspect_graph(model: Any, label: str | Path, size: int | None = None, output: str | None = None) -> GraphInfo:
    """Check a face-network graph and read its input name, size and layout; `label` names it in errors.

    Refused: a graph with other than one image input, an input without a 3-channel axis, not square, of another
    size than `size` (when given), several outputs without a chosen `output`, a chosen `output` the graph lacks.
    """
    label = str(label)
    inputs = image_inputs(model)
    if len(inputs) != 1:
        raise KinretInputError(label, f"expected one image input, found {[i.name for i in inputs]}")
    side, layout = _input_geometry(label, inputs[0], size)
    outputs = tuple(o.name for o in model.graph.output)
    if output is None:
        if len(outputs) != 1:
            raise KinretInputError(label, f"the graph has {len(outputs)} outputs {list(outputs)}: choose the "
                                          "embedding with onnx_output=NAME")
        output = outputs[0]
    elif output not in {t for n in model.graph.node for t in n.output}:
        raise KinretInputError(label, f"no tensor {output!r} in the graph; its outputs are {list(outputs)}")
    return GraphInfo(label, inputs[0].name, side, layout, output, outputs)


# ---- constant folding -----------------------------------------------------------------------------------------------
def dequantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1,
                      block_size: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear (opset 21): y = (x - zero_point) * scale, per tensor, per axis or per block.

    Blocked form: scale/zero_point have x's rank with ceil(D/block_size) entries along `axis`; element i on that
    axis uses entry i // block_size (the last block may be short). Returns the scale's dtype (float32 here).
    """
    axis = axis % max(x.ndim, 1)
    scale = np.asarray(scale)
    zp = np.zeros_like(scale, dtype=np.int64) if zero_point is None else np.asarray(zero_point)
    if zp.shape != scale.shape:
        raise ValueError(f"zero_point shape {zp.shape} != scale shape {scale.shape}")
    if block_size > 0:
        n_blocks = -(-x.shape[axis] // block_size)
        expected = x.shape[:axis] + (n_blocks,) + x.shape[axis + 1:]
        if scale.shape != expected:
            raise ValueError(f"blocked scale shape {scale.shape} != {expected} for x {x.shape}, block {block_size}")
        take = np.arange(x.shape[axis]) // block_size
        scale, zp = np.take(scale, take, axis=axis), np.take(zp, take, axis=axis)
    elif scale.ndim == 1 and scale.size != 1:
        if scale.shape[0] != x.shape[axis]:
            raise ValueError(f"per-axis scale shape {scale.shape} does not match x {x.shape} on axis {axis}")
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    diff = x.astype(np.int64) - zp.astype(np.int64)  # exact for every integer type DequantizeLinear accepts
    return (diff.astype(scale.dtype) * scale).astype(scale.dtype)


def _fold_dequantize(args: list, a: dict) -> np.ndarray:
    x, scale, zp = (args + [None] * 3)[:3]
    y = dequantize_linear(x, scale, zp, axis=a.get("axis", 1), block_size=a.get("block_size", 0))
    return y.astype(np.float32)


def _fold_reshape(args: list, a: dict) -> np.ndarray:
    x, shape = args[0], [int(s) for s in args[1]]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(args: list, a: dict) -> tuple[int, ...] | None:
    axes = a.get("axes", args[1] if len(args) > 1 and args[1] is not None else None)
    return None if axes is None else tuple(int(v) for v in np.asarray(axes).reshape(-1))


def _fold_unsqueeze(args: list, a: dict) -> np.ndarray:
    x, axes = args[0], _axes(args, a)
    rank = x.ndim + len(axes)
    for ax in sorted(v % rank for v in axes):
        x = np.expand_dims(x, ax)
    return x


def _fold_cast(args: list, a: dict) -> np.ndarray:
    from onnx import helper

    return args[0].astype(helper.tensor_dtype_to_np_dtype(a["to"]))


FOLDS: dict[str, Callable[[list, dict], np.ndarray]] = {
    "DequantizeLinear": _fold_dequantize,
    "Reshape": _fold_reshape,
    "Transpose": lambda args, a: np.transpose(args[0], a.get("perm")),
    "Cast": _fold_cast,
    "Identity": lambda args, a: args[0].copy(),
    "Squeeze": lambda args, a: np.squeeze(args[0], _axes(args, a)),
    "Unsqueeze": _fold_unsqueeze,
}


def constant_value(node: Any) -> np.ndarray:
    """The value of a Constant node (any of its attribute forms); Python floats become float32, ints int64."""
    name, value = next(iter(attributes(node).items()))
    if name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    if name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    return np.asarray(value)


def constants_of(model: Any) -> dict[str, np.ndarray]:
    """Every initializer as a numpy array."""
    return {t.name: _array(t) for t in model.graph.initializer}


def fold_constants(model: Any) -> Any:
    """A copy of `model` with its constant subgraphs folded into initializers (see the module docstring); a
    DequantizeLinear gives float32. The graph computes what the original computes."""
    import onnx
    from onnx import numpy_helper

    consts = constants_of(model)
    kept = []
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            consts[node.output[0]] = constant_value(node)
        elif node.op_type in FOLDS and ins and all(i in consts for i in ins):
            args = [consts[i] if i else None for i in node.input]
            consts[node.output[0]] = np.asarray(FOLDS[node.op_type](args, attributes(node)))
        else:
            kept.append(node)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    del graph.node[:], graph.initializer[:], graph.value_info[:]
    graph.node.extend(kept)
    read = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, order="C"), k) for k, v in consts.items() if k in read)
    inputs = [i for i in graph.input if i.name in read and i.name not in consts]
    del graph.input[:]
    graph.input.extend(inputs)
    _symbolic_batch(graph)
    folded.ir_version = max(folded.ir_version, 4)  # from IR 4 on, initializers need not be declared as inputs
    return folded


def _symbolic_batch(graph: Any) -> None:
    for vi in list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "N"


def with_outputs(model: Any, names: Sequence[str], shapes: Mapping[str, Sequence[int]] | None = None) -> Any:
    """A copy of `model` whose outputs are `names` in that order, since cv2.dnn returns graph outputs only. An inner
    tensor is declared float with its shape (cv2 requires one) from `shapes` (batch made symbolic), else from ONNX
    shape inference."""
    import onnx
    from onnx import TensorProto, helper

    produced = {t for n in model.graph.node for t in n.output} | {i.name for i in model.graph.input}
    missing = [n for n in names if n not in produced]
    if missing:
        raise ValueError(f"the graph computes no tensor {missing}")
    declared = {o.name: o for o in model.graph.output}
    shapes = dict(shapes or {})
    if any(n not in declared and n not in shapes for n in names):
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
        shapes.update({v.name: _dims(v) for v in inferred if v.name in names and v.name not in shapes})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    for name in names:
        dims = shapes.get(name)
        dims = None if dims is None else ["N"] + list(dims[1:])
        out.graph.output.append(declared.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    return out


def graph_with_weights(model: bytes | Any, weights: Mapping[str, np.ndarray], outputs: Sequence[str],
                       shapes: Mapping[str, Sequence[int]] | None = None) -> bytes:
    """`model` (serialised or loaded) with `weights` as initializers (replacing those of the same name) and `outputs`
    as its outputs, serialised: a torch module's (fine-tuned) weights written back for cv2.dnn or onnxruntime."""
    import onnx
    from onnx import numpy_helper

    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    kept = [t for t in model.graph.initializer if t.name not in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, order="C"), k) for k, v in weights.items())
    return with_outputs(model, outputs, shapes).SerializeToString()


# ---- running a serialised graph -------------------------------------------------------------------------------------
class GraphEngine:
    """One cv2.dnn net or onnxruntime session over a serialised graph, run single-threaded (callers run several
    engines in threads). `run(x, outputs)` gives the named tensors of one batch; not thread-safe itself."""

    def __init__(self, model: bytes, input_name: str, engine: str):
        if engine not in ENGINES:
            raise ValueError(f"unknown graph engine {engine!r}; one of {ENGINES}")
        self.engine, self.input_name = engine, input_name
        if engine == CV2:
            import cv2

            self._net = cv2.dnn.readNetFromONNX(np.frombuffer(model, dtype=np.uint8))
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # keep its warnings about the file's declared inputs off the terminal
            self._net = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.engine == CV2:
            self._net.setInput(x, self.input_name)
            got = self._net.forward(list(outputs))
        else:
            got = self._net.run(list(outputs), {self.input_name: x})
        return [np.asarray(g, dtype=np.float32) for g in got]


def open_engine(model: bytes, input_name: str, outputs: Sequence[str], probe: np.ndarray,
                engine: str = "auto") -> tuple[GraphEngine, list[np.ndarray]]:
    """An engine that reads `model` and runs `probe` (a batch of at least 2) to the right batch size, with its
    outputs on the probe: cv2.dnn first and onnxruntime where cv2 cannot (`engine="auto"`), or the one asked."""
    tried = []
    for kind in (CV2, ORT) if engine == "auto" else (engine,):
        try:
            eng = GraphEngine(model, input_name, kind)
            got = eng.run(probe, outputs)
        except Exception as exc:  # cv2.error, onnxruntime's own types, ImportError: try the next engine
            tried.append(f"{kind}: {exc.__class__.__name__}: {str(exc).strip()[:200]}")
            continue
        if all(g.shape[:1] == probe.shape[:1] for g in got):
            return eng, got
        tried.append(f"{kind}: a batch of {len(probe)} gave shapes {[g.shape for g in got]}")
    raise RuntimeError("no engine runs the graph: " + "; ".join(tried))
