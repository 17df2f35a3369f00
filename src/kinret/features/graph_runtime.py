"""The fast frozen runtime for any ONNX face network (`kinret.models.onnx_net.OnnxBackbone`): its graph, with the
module's current weights written back, run by cv2.dnn, or by onnxruntime where cv2 cannot read or run it.

One pass gives every tensor the kit wants from an image batch: the graph's embedding ("native"), the feature map
(pooled avg/max/gem with the torch runtime's own functions) and, on request, the output of a unit cut (the cached
prefix of a fine-tune, e.g. SFace's cut 24, 512x7x7): the tensors are declared as graph outputs, since cv2.dnn
returns graph outputs only. `nets` independent engines (one per worker thread, each single-threaded) let decoding and
pooling of one batch overlap inference of another.

Pixels are prepared in numpy exactly as the torch path prepares them (uint8 RGB / 255, minus the convention's mean,
over its std; BGR and NHWC where the graph asks; the mirror view flips the width), and `check` compares the engine
with the torch module on a fixed probe before it is trusted (cosine >= CHECK_COSINE on every output).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from kinret.data.pixels import normalize, to_float
from kinret.log import progress
from kinret.models.networks import POOLS
from kinret.models.onnx_graph import GraphEngine, open_engine
from kinret.models.onnx_net import CHECK_COSINE, OnnxBackbone, cosines

log = logging.getLogger(__name__)
AUTO = "auto"


def pool_map(fmap: np.ndarray, names: Sequence[str], gem_p: float) -> dict[str, np.ndarray]:
    """Every pooling of `names` but "native" over a (N, C, H, W) feature map, with the torch runtime's own
    functions (`kinret.models.networks.POOLS`): avg = mean over positions, max, gem = (mean of x^p)^(1/p)."""
    t = torch.from_numpy(np.asarray(fmap, dtype=np.float32))
    return {k: POOLS[k](t, gem_p).numpy() for k in names if k != "native"}


@contextmanager
def engine_threads(n: int):
    """cv2's and torch's thread counts (both process-wide) set to `n` inside the block, restored after: each worker
    is one of the parallel streams, so its engine run and its pooling stay on one core each."""
    import cv2

    before = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before[0])
        torch.set_num_threads(before[1])


def cut_key(cut: int) -> str:
    """The result key of a unit cut's output in `GraphRuntime.pooled`."""
    return f"cut{cut}"


class GraphRuntime:
    """`backbone`'s graph in `nets` engines returning the embedding, the feature map and the outputs of `cuts`."""

    def __init__(self, backbone: OnnxBackbone, cuts: Sequence[int] = (), nets: int = 1, engine: str = AUTO):
        self.backbone = backbone
        self.cuts = tuple(cuts)
        for k in self.cuts:
            if not 0 < k <= len(backbone.units):
                raise ValueError(f"cut {k} outside 1..{len(backbone.units)}")
        chain, info = backbone.chain, backbone.info
        wanted = [info.output, chain.fmap] + [chain.cut_names[k] for k in self.cuts]
        self.outputs = list(dict.fromkeys(wanted))
        model = backbone.to_onnx(self.outputs)
        probe = self.graph_input(self.probe_pixels(), flip=False)
        try:
            first, _ = open_engine(model, info.input_name, self.outputs, probe, engine)
            self.batched = True
        except RuntimeError:  # a graph that fixes its batch size (a Reshape to 1 x D, say) runs an image at a time
            first, _ = open_engine(model, info.input_name, self.outputs, probe[:1], engine)
            self.batched = False
        self.engine = first.engine
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.free.put(first)
        for _ in range(max(nets, 1) - 1):
            self.free.put(GraphEngine(model, info.input_name, self.engine))
        log.info("%s on %s (%d nets, %s), outputs %s", info.path, self.engine, max(nets, 1),
                 "batched" if self.batched else "one image a run", self.outputs)

    def probe_pixels(self) -> np.ndarray:
        s = self.backbone.info.size
        return np.random.default_rng(0).integers(0, 256, (2, s, s, 3), dtype=np.uint8)

    def graph_input(self, pixels: np.ndarray, flip: bool) -> np.ndarray:
        """(N, H, W, 3) RGB, uint8 or float in 0..1 -> float32 graph input of the V*N views (the N mirror images
        follow with `flip`), computed as the torch path computes it."""
        x = np.asarray(pixels).astype(np.float32)
        if np.asarray(pixels).dtype == np.uint8:
            x /= np.float32(255.0)
        conv = self.backbone.convention
        x = (x - np.asarray(conv.mean, np.float32)) / np.asarray(conv.std, np.float32)
        if flip:
            x = np.concatenate([x, x[:, :, ::-1]])
        if conv.bgr:
            x = x[..., ::-1]
        if self.backbone.info.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Graph input batch -> {tensor name: array}; thread-safe: each call takes an engine no other thread uses."""
        eng = self.free.get()
        try:
            if self.batched:
                got = eng.run(x, self.outputs)
            else:
                runs = [eng.run(x[i:i + 1], self.outputs) for i in range(len(x))]
                got = [np.concatenate([r[j] for r in runs]) for j in range(len(self.outputs))]
        finally:
            self.free.put(eng)
        return dict(zip(self.outputs, got, strict=True))

    def pooled(self, pixels: np.ndarray, names: Sequence[str], gem_p: float, flip: bool) -> dict[str, np.ndarray]:
        """(N, H, W, 3) RGB (uint8, or float in 0..1) -> {pooling: (V, N, D)} for `names` ("native" the embedding,
        the others pooled from the feature map) and {cut_key(k): (V, N, ...)} for each cut."""
        views, n = (2 if flip else 1), len(pixels)
        got = self.forward(self.graph_input(pixels, flip))
        chain = self.backbone.chain
        fmap = got[chain.fmap]
        if chain.fmap_layout == "NHWC":
            fmap = fmap.transpose(0, 3, 1, 2)
        out = pool_map(fmap, names, gem_p)
        if "native" in names:
            out["native"] = got[self.backbone.info.output].reshape(len(fmap), -1)
        out = {k: out[k].reshape(views, n, -1) for k in names}
        for k in self.cuts:
            h = got[chain.cut_names[k]]
            out[cut_key(k)] = h.reshape((views, n) + h.shape[1:])
        return out

    def check(self, gem_p: float = 3.0) -> float:
        """The lowest cosine between this engine and the torch module over every pooling, the embedding and the cuts
        on a fixed probe (both views); raises RuntimeError below CHECK_COSINE."""
        bb = self.backbone
        pixels = self.probe_pixels()
        names = list(POOLS) + ["native"]
        mine = self.pooled(pixels, names, gem_p, flip=True)
        x = normalize(to_float(pixels, torch.device("cpu")), bb.convention.mean, bb.convention.std)
        x = torch.cat([x, x.flip(3)])  # the kit's input of both views, as the torch feature path builds it
        with torch.no_grad():
            was = bb.training
            bb.eval()
            fmap = bb.forward_features(x)
            ref = {"native": bb.forward_native(fmap).numpy(), **pool_map(fmap.numpy(), names, gem_p)}
            ref.update({cut_key(k): bb.forward_prefix(x, k).numpy() for k in self.cuts})
            bb.train(was)
        worst = 1.0
        for key, value in ref.items():
            cos = cosines(mine[key].reshape(len(value), -1), value)
            worst = min(worst, float(cos.min()))
            if not (cos >= CHECK_COSINE).all():
                raise RuntimeError(f"{bb.info.path}: {self.engine} computes other numbers than the torch module "
                                   f"({key}: cosine {cos.min():.6f})")
        return worst


def graph_pooled(runtime: GraphRuntime, load: Callable[[int, int], np.ndarray], n: int, names: Sequence[str],
                 gem_p: float, flip: bool, batch: int = 32, workers: int = 1,
                 desc: str = "features") -> dict[str, np.ndarray]:
    """{key: (V, n, ...)} of rows 0..n-1 (`GraphRuntime.pooled`'s keys), `load(a, b)` giving the uint8 RGB pixels of
    rows a..b-1: `workers` threads each load a batch and run it on an engine of their own (the runtime needs
    `workers` nets), joined in row order."""
    bounds = [(a, min(a + batch, n)) for a in range(0, n, batch)]
    if not bounds:
        s = runtime.backbone.info.size
        return {k: v[:, :0] for k, v in runtime.pooled(np.zeros((1, s, s, 3), np.uint8), names, gem_p, flip).items()}

    def one(ab: tuple[int, int]) -> dict[str, np.ndarray]:
        return runtime.pooled(load(*ab), names, gem_p, flip)

    with engine_threads(1), ThreadPoolExecutor(max(workers, 1)) as pool:
        parts = list(progress(pool.map(one, bounds), desc=desc, total=len(bounds)))
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
