"""Which runtime computes a frozen backbone's pooled features, and the fast one for the shipped SFace: its ONNX file
run by OpenCV's cv2.dnn.

`frozen_runtime` picks "cv2-int8" for an `SFaceBackbone` whose weights are still the shipped ones (its state digest
equals the pristine one) on a CPU, with SFace's own input convention; anything else (a fine-tuned SFace, a timm
network, a GPU) keeps "torch-fp32", the torch module. cv2.dnn dequantises the block-quantised int8 weights and
computes in float32: its embeddings and pooled feature maps agree with the torch module's (cosine > 0.9999, checked
on first use and tested). The runtime name is part of the feature cache key, so the two never share a cache file.

The feature map for avg/max/gem pooling comes from the same cv2 pass: `bn1` is declared as a second graph output
(`kinret.models.sface.sface_onnx_with_feature_map`), since OpenCV 5 only returns graph outputs.

Both cores: `threads` worker threads, each with its own cv2 net run single-threaded, each decoding (or slicing) its
own batch, so decoding, the BGR conversion and the pooling of one batch overlap inference of the other (cv2 releases
the GIL while it runs); the two nets never wait on each other. `benchmarks/bench_embed.py` compares this path with a
bare cv2.dnn loop and with torch float32 (see docs/decisions.md for the figures).
"""

from __future__ import annotations

import importlib.util
import logging
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from kinret.log import progress
from kinret.models.networks import POOLS, SFaceBackbone, state_digest
from kinret.models.sface import (
    EMBED_DIM,
    EMBEDDING,
    FEATURE_CHANNELS,
    FEATURE_MAP,
    INPUT_SIZE,
    sface_cv2_net,
    sface_onnx_with_feature_map,
)

log = logging.getLogger(__name__)
CV2_INT8 = "cv2-int8"  # the shipped block-quantised SFace file run by cv2.dnn (float32 maths on dequantised weights)
TORCH_FP32 = "torch-fp32"  # the torch module in float32 (forward_pooled)
CV2_BATCH = 32  # images per cv2 forward (each with its mirror image: 64 rows)
CHECK_COSINE = 0.9999  # the cv2 run must agree this well with the torch module on a probe batch before it is used


@lru_cache(maxsize=1)
def pristine_sface_digest() -> str:
    """`state_digest` of SFaceBackbone as built from the shipped file (built once per process, about a second)."""
    return state_digest(SFaceBackbone())


def _cv2_ready() -> bool:
    if importlib.util.find_spec("cv2") is None:
        return False
    import cv2

    return int(cv2.__version__.split(".")[0]) >= 5  # batched runs and extra graph outputs are tested on OpenCV 5


def is_sface_input(data_cfg: dict) -> bool:
    """Whether the data config feeds SFace's own convention: 112 px, pixels scaled to 0..255 (mean 0, std 1/255)."""
    return (tuple(data_cfg["input_size"]) == (3, INPUT_SIZE, INPUT_SIZE)
            and all(m == 0 for m in data_cfg["mean"]) and all(abs(s * 255 - 1) < 1e-9 for s in data_cfg["std"]))


def frozen_runtime(backbone: nn.Module, digest: str, data_cfg: dict, device: torch.device) -> str:
    """CV2_INT8 when the features are the shipped SFace file's (an SFaceBackbone whose `digest` is the pristine
    one, SFace's input convention, a CPU device, OpenCV >= 5); TORCH_FP32 otherwise (a fine-tuned SFace included)."""
    if device.type != "cpu" or not isinstance(backbone, SFaceBackbone) or not is_sface_input(data_cfg):
        return TORCH_FP32
    if not _cv2_ready() or digest != pristine_sface_digest():
        return TORCH_FP32
    return CV2_INT8


def bgr_views(pixels: np.ndarray, flip: bool) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (V*N, 3, H, W) BGR 0..255 (cv2's input): x[c, h, w] = pixels[h, w, 2 - c];
    with `flip` the N mirror images x[c, h, W - 1 - w] follow the N images."""
    x = np.ascontiguousarray(np.asarray(pixels)[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    return np.concatenate([x, x[..., ::-1]]) if flip else x


def pool_map(fmap: np.ndarray, names: Sequence[str], gem_p: float) -> dict[str, np.ndarray]:
    """Every pooling of `names` but "native" over a (N, C, H, W) feature map, with the torch runtime's own
    functions (`kinret.models.networks.POOLS`): avg = mean over positions, max, gem = (mean of x^p)^(1/p)."""
    t = torch.from_numpy(np.asarray(fmap, dtype=np.float32))
    return {k: POOLS[k](t, gem_p).numpy() for k in names if k != "native"}


class Cv2SFace:
    """The shipped SFace file run by cv2.dnn: `nets` independent nets (one per worker thread) that return the
    128-d embedding and the bn1 feature map from one pass."""

    def __init__(self, nets: int = 1):
        model = sface_onnx_with_feature_map()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(nets, 1)):
            self.free.put(sface_cv2_net(model))

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 3, 112, 112) BGR 0..255 -> (embedding (N, 128), feature map (N, 1024, 7, 7)); thread-safe:
        each call takes a net no other thread is using."""
        net = self.free.get()
        try:
            net.setInput(x, "data")
            emb, fmap = net.forward([EMBEDDING, FEATURE_MAP])
        finally:
            self.free.put(net)
        return np.asarray(emb, dtype=np.float32), np.asarray(fmap, dtype=np.float32)

    def pooled(self, pixels: np.ndarray, names: Sequence[str], gem_p: float, flip: bool) -> dict[str, np.ndarray]:
        """uint8 (N, 112, 112, 3) RGB -> {pooling: (V, N, D)}: "native" is the embedding, the others pool bn1."""
        emb, fmap = self.forward(bgr_views(pixels, flip))
        out = pool_map(fmap, names, gem_p)
        if "native" in names:
            out["native"] = emb
        views = 2 if flip else 1
        return {k: out[k].reshape(views, len(pixels), -1) for k in names}

    def check(self, backbone: nn.Module, gem_p: float) -> None:
        """Raise unless this engine agrees with the torch module (cosine >= CHECK_COSINE on every pooling) on a
        fixed probe batch: another OpenCV build that computed other numbers must not fill a cache silently."""
        probe = np.random.default_rng(0).integers(0, 256, (2, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
        names = [k for k in POOLS] + ["native"]
        mine = self.pooled(probe, names, gem_p, flip=False)
        x = torch.from_numpy(probe).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            fmap = backbone.eval().forward_features(x)
            ref = {"native": backbone.forward_native(fmap).numpy(), **pool_map(fmap.numpy(), names, gem_p)}
        for k in names:
            a, b = mine[k][0], ref[k]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            if not (cos >= CHECK_COSINE).all():
                import cv2

                raise RuntimeError(f"OpenCV {cv2.__version__} runs SFace to other numbers than the torch module "
                                   f"({k}: cosine {cos.min():.6f}); install the pinned opencv-python-headless "
                                   "(requirements.txt)")


_ENGINES: dict[int, Cv2SFace] = {}


def cv2_engine(nets: int, backbone: nn.Module, gem_p: float) -> Cv2SFace:
    """This process's engine with `nets` nets, built and checked against `backbone` (the pristine SFace) once: about
    2 s the first time (graph edit, nets, the engine's first run), nothing after."""
    if nets not in _ENGINES:
        engine = Cv2SFace(nets)
        engine.check(backbone, gem_p)
        _ENGINES[nets] = engine
    return _ENGINES[nets]


@contextmanager
def engine_threads(n: int):
    """cv2's and torch's thread counts (both process-wide) set to `n` inside the block, restored after: each worker
    is one of the parallel streams, so its cv2 run and its pooling stay on one core each."""
    import cv2

    before = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before[0])
        torch.set_num_threads(before[1])


def cv2_pooled(engine: Cv2SFace, load: Callable[[int, int], np.ndarray], n: int, names: Sequence[str],
               gem_p: float, flip: bool, batch: int = CV2_BATCH, workers: int = 1, threads_each: int = 1,
               desc: str = "features") -> dict[str, np.ndarray]:
    """{pooling: (V, n, D)} of rows 0..n-1, `load(a, b)` giving the uint8 RGB pixels of rows a..b-1. `workers`
    threads each load a batch and run it on a net of their own with cv2 using `threads_each` threads (the engine
    needs `workers` nets); results are joined in row order, so the arrangement does not change the numbers' order."""
    bounds = [(a, min(a + batch, n)) for a in range(0, n, batch)]

    def one(ab: tuple[int, int]) -> dict[str, np.ndarray]:
        return engine.pooled(load(*ab), names, gem_p, flip)

    with engine_threads(threads_each), ThreadPoolExecutor(max(workers, 1)) as pool:
        parts = list(progress(pool.map(one, bounds), desc=desc, total=len(bounds)))
    if not parts:
        views = 2 if flip else 1
        return {k: np.zeros((views, 0, EMBED_DIM if k == "native" else FEATURE_CHANNELS), np.float32) for k in names}
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in names}


def default_threads(threads: int = 0) -> int:
    """`threads`, or torch's thread count when 0 (the trainer and the CLI set it from the config's `threads`)."""
    return threads if threads > 0 else max(torch.get_num_threads(), 1)
