"""Per-image features of many images, every pooling from one forward pass, with the horizontal flip, cached as
`.npz` (ids + arrays) under a key that covers everything that changes the numbers.

Two caches live here: the pooled features of a frozen backbone (`FrozenFeatures`, keyed by the backbone's weight
digest and the runtime that computed them (`kinret.features.runtime`: the ONNX graph for an ONNX network on a CPU,
the torch module otherwise), shared by every head-only checkpoint on that backbone) and the embeddings of one trained
checkpoint (`kinret.features.sources.CheckpointSource`, keyed by the checkpoint file's content). Both are computed in
chunks of images, each chunk saved as it finishes, so a run killed half-way recomputes only the chunks it had not
saved; under torchrun the processes split the chunks between them (`build_in_chunks`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from kinret.data.pixels import decode_pixels, file_list_digest, normalize, to_float
from kinret.dist import dist_rank_world
from kinret.features.graph_runtime import cut_key, graph_pooled
from kinret.features.prefix import Prefix, assemble_parts, save_parts
from kinret.features.runtime import GRAPH, GRAPH_BATCH, RUNTIMES, default_threads, frozen_runtime, graph_runtime
from kinret.io import atomic_path
from kinret.log import progress
from kinret.models.config import TrainConfig
from kinret.models.networks import POOLS, pool_names
from kinret.readback import DamagedFile, check_ids, read_npz, rebuilt

log = logging.getLogger(__name__)
FEATURE_CODE_VERSION = 3  # bump when the feature path (preprocessing, pooling, flip, neck) changes
CHUNK = int(os.environ.get("KINRET_EMBED_CHUNK", 1024))  # images per saved part of a cache being built


def _pooled(backbone: nn.Module, fmap: torch.Tensor, names: list[str], gem_p: float, neck: nn.Module | None,
            neck_pool: str) -> dict[str, torch.Tensor]:
    """Every pooling of one feature map (and, with a `neck`, "emb": neck(`neck_pool` pooling))."""
    pooled = {k: (backbone.forward_native(fmap) if k == "native" else POOLS[k](fmap, gem_p)) for k in names}
    if neck is not None:
        pooled["emb"] = neck(pooled[neck_pool])
    return pooled


def _stack_views(out: dict[str, list[np.ndarray]], views: list[dict[str, torch.Tensor]]) -> None:
    for k in out:
        out[k].append(torch.stack([v[k] for v in views]).float().cpu().numpy())


@torch.no_grad()
def forward_pooled(backbone: nn.Module, pixels: np.ndarray, data_cfg: dict, device: torch.device, batch: int = 128,
                   gem_p: float = 3.0, desc: str = "features", channels_last: bool = True,
                   neck: nn.Module | None = None, neck_pool: str = "avg", flip: bool = True) -> dict[str, np.ndarray]:
    """For each pooling, float32 (V, N, D): row 0 the image, row 1 (with `flip`, V = 2) its mirror image. The
    backbone runs in eval mode once per batch and view; every pooling is read off the same feature map. With a
    `neck`, the key "emb" holds neck(`neck_pool` features): a trained model's embedding, from the same pass."""
    backbone.eval()
    if neck is not None:
        neck.eval()
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    names = pool_names(backbone)
    out: dict[str, list[np.ndarray]] = {k: [] for k in names + (["emb"] if neck is not None else [])}
    for start in progress(range(0, len(pixels), batch), desc=desc, total=math.ceil(len(pixels) / batch)):
        x = normalize(to_float(np.asarray(pixels[start:start + batch]), device), data_cfg["mean"], data_cfg["std"])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _stack_views(out, [_pooled(backbone, backbone.forward_features(view), names, gem_p, neck, neck_pool)
                           for view in ((x, x.flip(3)) if flip else (x,))])
    return {k: np.concatenate(v, axis=1) for k, v in out.items()}


@torch.no_grad()
def rest_pooled(backbone: nn.Module, prefix: np.ndarray, cut: int, device: torch.device, batch: int = 128,
                gem_p: float = 3.0, neck: nn.Module | None = None, neck_pool: str = "avg",
                channels_last: bool = True) -> dict[str, np.ndarray]:
    """`forward_pooled` from the cached output of the backbone's first `cut` units: `prefix` (V, N, C, H, W), one
    view a row (the image, its mirror image); the rest of the network runs on each view."""
    backbone.eval()
    if neck is not None:
        neck.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    backbone.to(memory_format=fmt)
    names = pool_names(backbone)
    out: dict[str, list[np.ndarray]] = {k: [] for k in names + (["emb"] if neck is not None else [])}
    for start in range(0, prefix.shape[1], batch):
        # float16 rows to float32 in torch, in the layout the model wants (numpy's half cast is ~2.5x slower)
        views = [torch.from_numpy(np.array(v[start:start + batch])).to(device).contiguous(memory_format=fmt).float()
                 for v in prefix]
        _stack_views(out, [_pooled(backbone, backbone.forward_rest(h, cut), names, gem_p, neck, neck_pool)
                           for h in views])
    return {k: np.concatenate(v, axis=1) for k, v in out.items()}


def file_digest(path: str | Path) -> str:
    """Content hash of a file (a checkpoint): a retrained or resumed checkpoint gets a new key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_cache(cache: Path, ids: np.ndarray, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` cache whose stored `ids` must equal `ids`, row for row, each (views, len(ids), ...),
    `keys` among them; `DamagedFile` otherwise."""
    data = read_npz(cache, ("ids", *keys))
    check_ids(cache, data.pop("ids"), ids)
    wrong = [k for k, v in data.items() if v.ndim < 2 or v.shape[1] != len(ids)]
    if wrong or not data:
        raise DamagedFile(cache, f"array {wrong[0]!r} has shape {data[wrong[0]].shape}, not (views, {len(ids)}, ...)"
                          if wrong else "holds no array beside its ids")
    return data


def chunk_bounds(n: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """The (start, stop) rows of each saved chunk of a cache of `n` rows."""
    return [(a, min(a + chunk, n)) for a in range(0, max(n, 1), chunk)]


def build_in_chunks(cache: Path, ids: np.ndarray, compute: Callable[[int, int], dict[str, np.ndarray]],
                    chunk: int = CHUNK, shard: bool = False, desc: str | None = None, keys: Sequence[str] = ()
                    ) -> dict[str, np.ndarray]:
    """`compute(start, stop)` -> arrays of shape (views, stop - start, ...) for every chunk of rows, each chunk saved
    under ``{cache}.parts/`` as soon as it is done; then the whole `.npz` (with `ids`) is written atomically and the
    parts removed. A chunk already saved by a killed run is read, not recomputed.

    With `shard`, under torchrun, every process must call this in the same order: process r computes chunks r,
    r + world, ...; after a barrier rank 0 joins the parts into the cache and the others read it after a second
    barrier. (The trainer instead lets rank 0 fill its caches alone, so it does not shard.) A damaged cache or
    chunk (`read_cache`: `keys` are the arrays it must hold) is computed again, with one warning, and replaced."""
    if cache.is_file():
        try:
            return read_cache(cache, ids, keys)
        except DamagedFile as exc:
            rebuilt(exc, "computed again")
    rank, world = dist_rank_world() if shard else (0, 1)
    parts_dir = cache.with_name(cache.name + ".parts")
    bounds = chunk_bounds(len(ids), chunk)
    pieces: dict[int, dict[str, np.ndarray]] = {}
    mine = [i for i in range(len(bounds)) if i % world == rank]
    for i in progress(mine, desc=f"{desc or cache.stem} ({len(ids):,} images)", unit="chunk"):
        start, stop = bounds[i]
        part = parts_dir / f"rows{start:09d}-{stop:09d}.npz"
        if part.is_file():
            continue
        pieces[i] = compute(start, stop)
        with atomic_path(part, suffix=".npz") as tmp:
            np.savez(tmp, ids=ids[start:stop], **pieces[i])
    if world > 1:
        tdist.barrier()
    if rank == 0:
        for i, (start, stop) in enumerate(bounds):
            if i not in pieces:
                try:
                    pieces[i] = read_cache(parts_dir / f"rows{start:09d}-{stop:09d}.npz", ids[start:stop], keys)
                except DamagedFile as exc:
                    rebuilt(exc, "computed again")
                    pieces[i] = compute(start, stop)
        whole = {k: np.concatenate([pieces[i][k] for i in range(len(bounds))], axis=1) for k in pieces[0]}
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, ids=ids, **whole)
        shutil.rmtree(parts_dir, ignore_errors=True)
    if world > 1:
        tdist.barrier()
    return whole if rank == 0 else read_cache(cache, ids, keys)


@dataclass(frozen=True)
class FrozenFeatures:
    """How a frozen backbone's pooled features are computed and cached: the network, the digest of its weights and
    its input convention (`data_cfg`), the views (with the mirror image when `flip`), the GeM power, and how it runs
    (device, batch, cv2 worker threads, memory format, and the runtime: "" lets `frozen_runtime` pick). `label`
    names its cache files."""

    backbone: nn.Module
    digest: str
    data_cfg: dict
    label: str
    device: torch.device = torch.device("cpu")
    batch: int = 128
    gem_p: float = 3.0
    channels_last: bool = True
    flip: bool = True
    threads: int = 0
    runtime: str = ""
    prefix: Prefix | None = None  # a fine-tune's prefix the graph pass returns too (its views must be the same)

    @classmethod
    def of(cls, cfg: TrainConfig, backbone: nn.Module, digest: str, data_cfg: dict, device: torch.device,
           prefix: Prefix | None = None) -> FrozenFeatures:
        """A run config's frozen features of `backbone` (its weights hashing to `digest`)."""
        return cls(backbone, digest, data_cfg, cfg.backbone, device, cfg.eval_batch_size, cfg.gem_p,
                   cfg.channels_last, cfg.flip_views, cfg.threads, prefix=prefix)

    @cached_property
    def engine(self) -> str:
        """The runtime that computes them: `runtime`, else the one `frozen_runtime` picks."""
        engine = self.runtime or frozen_runtime(self.backbone, self.device)
        if engine not in RUNTIMES:
            raise ValueError(f"unknown feature runtime {engine!r}; one of {RUNTIMES}")
        return engine

    def key(self, files_digest: str) -> str:
        """Names a cache by everything that changes its numbers: the weights, the input convention, the GeM power,
        the memory format, the runtime, the views, and the images (`files_digest`: paths and content)."""
        parts = [self.digest, str(tuple(self.data_cfg["input_size"])), str(tuple(self.data_cfg["mean"])),
                 str(tuple(self.data_cfg["std"])), f"gem{self.gem_p}", f"cl{int(self.channels_last)}",
                 f"v{FEATURE_CODE_VERSION}", self.engine, f"views{2 if self.flip else 1}", files_digest]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def cached(self, paths: Sequence[Path], pixels: Callable[[], np.ndarray], cache_dir: Path, shard: bool = False
               ) -> dict[str, np.ndarray]:
        """Every pooling of `paths` (pooling -> (V, N, D); V = 2 with `flip`: the image, then its mirror image),
        read from `cache_dir` when the key matches, else computed in saved chunks and written atomically.

        The graph runtime (an ONNX network on a CPU) runs `threads` engines side by side (0: torch's thread count),
        each decoding its own batches of `paths`; torch-fp32 runs `forward_pooled` on `pixels()` (all images
        decoded), called only on a cache miss. With `shard` under torchrun, each process computes (and decodes) only
        its share of the chunks. With `prefix`, the graph pass also writes the prefix file of `paths`."""
        sharded = shard and dist_rank_world()[1] > 1
        files_digest = file_list_digest(paths)
        cache = Path(cache_dir) / f"features_{self.label}_{self.key(files_digest)}.npz"
        ids = np.array([str(p) for p in paths])
        prefix = self.prefix if self.prefix is not None and self.engine == GRAPH and not sharded else None
        if prefix is not None and prefix.path(cache_dir, files_digest).is_file():
            prefix = None  # a pass already wrote it
        parts = prefix.path(cache_dir, files_digest).with_suffix(".parts") if prefix is not None else None
        if not cache.is_file():
            log.info("computing %s features of %d images into %s (%s)", self.label, len(paths), cache, self.engine)
        size = self.data_cfg["input_size"][-1]
        source: list[np.ndarray] = []  # the decoded pixels (torch runtime), read at the first chunk computed

        def compute(start: int, stop: int) -> dict[str, np.ndarray]:
            desc = f"features {self.label} {start}-{stop}"
            if self.engine == GRAPH:
                workers = default_threads(self.threads)
                cuts = (prefix.cut,) if prefix is not None else ()
                feats = graph_pooled(graph_runtime(self.backbone, self.digest, cuts, workers, self.gem_p),
                                     lambda a, b: decode_pixels(paths[start + a:start + b], size, None), stop - start,
                                     pool_names(self.backbone), self.gem_p, self.flip, min(self.batch, GRAPH_BATCH),
                                     workers, desc=desc)
                if prefix is not None:
                    save_parts(parts, start, stop, prefix.stored(feats.pop(cut_key(prefix.cut))))
            else:
                if sharded:  # a process decodes only its own chunks
                    chunk_pixels = decode_pixels(paths[start:stop], size, None)
                else:
                    if not source:
                        source.append(pixels())
                    chunk_pixels = source[0][start:stop]
                feats = forward_pooled(self.backbone, chunk_pixels, self.data_cfg, self.device, self.batch,
                                       self.gem_p, desc, self.channels_last, flip=self.flip)
            return {f"pool_{k}": v for k, v in feats.items()}

        built = not cache.is_file()
        found = build_in_chunks(cache, ids, compute, shard=shard, desc=f"features {self.label}",
                                keys=[f"pool_{k}" for k in pool_names(self.backbone)])
        if prefix is not None and built:
            assemble_parts(prefix, paths, parts, chunk_bounds(len(ids)), cache_dir)
        return {k.removeprefix("pool_"): v for k, v in found.items()}
