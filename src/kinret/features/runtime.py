"""Which runtime computes a frozen backbone's features: an ONNX face network on a CPU runs as its graph (with the
module's current weights) in cv2.dnn, or onnxruntime where cv2 cannot (`kinret.features.graph_runtime`); anything
else (a timm network, an IResNet, any network on a GPU) runs as the torch module. The runtime's name is part of the
feature cache key, so the two never share a cache file; the graph runtime is checked against the torch module
(cosine >= 0.999 on every output) before a process first uses it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kinret.features.graph_runtime import GraphRuntime
from kinret.models.onnx_net import OnnxBackbone

log = logging.getLogger(__name__)
GRAPH = "graph"  # the ONNX graph of the backbone's current weights, run by cv2.dnn or onnxruntime
TORCH_FP32 = "torch-fp32"  # the torch module in float32 (forward_pooled)
RUNTIMES = (GRAPH, TORCH_FP32)
GRAPH_BATCH = 32  # images per graph run (each with its mirror image with flip: 64 rows)


def frozen_runtime(backbone: nn.Module, device: torch.device) -> str:
    """GRAPH for an ONNX backbone on a CPU, TORCH_FP32 otherwise."""
    return GRAPH if device.type == "cpu" and isinstance(backbone, OnnxBackbone) else TORCH_FP32


_RUNTIMES: dict[tuple, GraphRuntime] = {}


def graph_runtime(backbone: OnnxBackbone, digest: str, cuts: tuple[int, ...], nets: int, gem_p: float
                  ) -> GraphRuntime:
    """This process's graph runtime of `backbone` (its weights hashing to `digest`) with `nets` engines returning
    the outputs of `cuts` too: built and checked against the torch module once, then reused."""
    key = (digest, tuple(cuts), nets)
    if key not in _RUNTIMES:
        runtime = GraphRuntime(backbone, cuts, nets)
        runtime.check(gem_p)
        _RUNTIMES[key] = runtime
    return _RUNTIMES[key]


def default_threads(threads: int = 0) -> int:
    """`threads`, or torch's thread count when 0 (the trainer and the CLI set it from the config's `threads`)."""
    return threads if threads > 0 else max(torch.get_num_threads(), 1)
