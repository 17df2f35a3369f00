"""One frozen pass of a network over a list of images, and everything that pass gives, kept under one key: every
pooling of its last feature map (avg, max, gem and, for a face network, its own embedding "native"), for the image
and (with `flip`) its mirror image, and the output of any unit cut it was asked for (`Cut`: the cached prefix a
fine-tune trains its later units on).

On disk a pass is one folder, ``{cache}/frozen_{label}_{key}/``: ``ids.npy`` (the image paths, in order) and one
``.npy`` per output, (V, N, ...) with V the views; poolings are read into memory, cuts memory-mapped. The key names
everything the numbers depend on: the network's weights, its input convention, the GeM power, the memory format,
the runtime (`kinret.features.runtime`: an ONNX network's graph on a CPU, the torch module otherwise), the views,
the images (paths and content) and the code that computes them. Outputs a later caller asks for are added to the
folder by another pass; each output is computed in chunks saved as they finish (a killed pass recomputes only the
chunks it had not saved) and renamed into place whole; under torchrun the processes split the chunks. An output
file (or saved chunk) that does not read back as what it should be is computed again, with one warning naming it
(`kinret.readback`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from kinret.data.pixels import decode_pixels, file_list_digest, normalize, to_float
from kinret.dist import dist_rank_world
from kinret.errors import KinretInputError
from kinret.features.augment import LUMA
from kinret.features.cache import CHUNK, chunk_bounds
from kinret.features.graph_runtime import cut_key, graph_pooled
from kinret.features.network import NetworkCard
from kinret.features.runtime import GRAPH, GRAPH_BATCH, RUNTIMES, TORCH_FP32, default_threads, graph_runtime
from kinret.io import atomic_path
from kinret.log import progress
from kinret.models.config import TrainConfig
from kinret.models.networks import POOLS, pool_names
from kinret.readback import DamagedFile, check_ids, read_npy, read_npz, rebuilt
from kinret.versions import code_version

log = logging.getLogger(__name__)
CODE = ("kinret.data.images", "kinret.data.pixels", "kinret.models", "kinret.features")  # what computes the numbers


def grey_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 in 0..1, every channel 0.299 R + 0.587 G + 0.114 B: the greyscale view
    the trainer's augmentation makes of the same pixels (`kinret.features.augment.grey_images`)."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    return np.repeat((x @ np.asarray(LUMA, dtype=np.float32))[..., None], 3, axis=-1)


@dataclass(frozen=True)
class Cut:
    """The output of a network's first `units` units, stored as `dtype`, of the images (or, with `grey`, of their
    greyscale copies): one output of a frozen pass."""

    units: int
    dtype: str = "float16"
    grey: bool = False

    @property
    def name(self) -> str:
        return f"cut{self.units}-{self.dtype}" + ("-grey" if self.grey else "")

    def stored(self, array: np.ndarray) -> np.ndarray:
        """float32 (V, n, C, H, W) as stored; refuses values the storage type cannot hold."""
        out = np.asarray(array).astype(self.dtype)
        if not np.isfinite(out).all():
            raise KinretInputError(None, f"the output of the first {self.units} units (|x| up to "
                                         f"{np.abs(array).max():.3g}) overflows {self.dtype}: set prefix_dtype=float32")
        return out


# ---- the torch runtime ----------------------------------------------------------------------------------------------
def _pooled(backbone: nn.Module, fmap: torch.Tensor, names: list[str], gem_p: float, neck: nn.Module | None,
            neck_pool: str) -> dict[str, torch.Tensor]:
    """Every pooling of one feature map (and, with a `neck`, "emb": neck(`neck_pool` pooling))."""
    pooled = {k: (backbone.forward_native(fmap) if k == "native" else POOLS[k](fmap, gem_p)) for k in names}
    if neck is not None:
        pooled["emb"] = neck(pooled[neck_pool])
    return pooled


def wanted_pools(backbone: nn.Module, names: Collection[str] | None, neck: nn.Module | None, neck_pool: str
                 ) -> tuple[list[str], list[str]]:
    """(the poolings to compute, the outputs to return) for the outputs `names` (None: every pooling, and "emb" with
    a `neck`): the neck's pooling is computed whenever "emb" is asked for."""
    produced = pool_names(backbone) + (["emb"] if neck is not None else [])
    out = [k for k in produced if names is None or k in names]
    return [k for k in pool_names(backbone) if k in out or ("emb" in out and k == neck_pool)], out


def _stack_views(out: dict[str, list[np.ndarray]], views: list[dict[str, torch.Tensor]]) -> None:
    for k in out:
        out[k].append(torch.stack([v[k] for v in views]).float().cpu().numpy())


def _view_outputs(backbone: nn.Module, x: torch.Tensor, cuts: Sequence[int]) -> tuple[torch.Tensor, dict]:
    """(feature map, {cut_key(k): output of the first k units}) of one view: the feature map continues from the
    first cut's output, so the cut costs nothing but its copy."""
    if not cuts:
        return backbone.forward_features(x), {}
    h = backbone.forward_prefix(x, cuts[0])
    out = {cut_key(cuts[0]): h}
    out.update({cut_key(k): backbone.forward_prefix(x, k) for k in cuts[1:]})
    return backbone.forward_rest(h, cuts[0]), out


@torch.no_grad()
def forward_pooled(backbone: nn.Module, pixels: np.ndarray, data_cfg: dict, device: torch.device, batch: int = 128,
                   gem_p: float = 3.0, desc: str = "features", channels_last: bool = True,
                   neck: nn.Module | None = None, neck_pool: str = "avg", flip: bool = True,
                   cuts: Sequence[int] = (), names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """For each pooling, float32 (V, N, D): row 0 the image, row 1 (with `flip`, V = 2) its mirror image; `pixels`
    uint8 RGB or float RGB in 0..1. The backbone runs in eval mode once per batch and view; every pooling is read off
    the same feature map. With a `neck`, "emb" holds neck(`neck_pool` features); with `cuts`, `cut_key(k)` holds the
    output of the first k units, from the same pass; `names`, the poolings and "emb" returned (None: all)."""
    backbone.eval()
    if neck is not None:
        neck.eval()
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    pools, kept = wanted_pools(backbone, names, neck, neck_pool)
    out: dict[str, list[np.ndarray]] = {k: [] for k in kept + [cut_key(k) for k in cuts]}
    for start in progress(range(0, len(pixels), batch), desc=desc, total=math.ceil(len(pixels) / batch)):
        chunk = np.asarray(pixels[start:start + batch])
        x = to_float(chunk, device) if chunk.dtype == np.uint8 else torch.from_numpy(chunk).to(device).permute(
            0, 3, 1, 2)
        x = normalize(x, data_cfg["mean"], data_cfg["std"])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = []
        for view in (x, x.flip(3)) if flip else (x,):
            fmap, at_cuts = _view_outputs(backbone, view, cuts)
            views.append({**_pooled(backbone, fmap, pools, gem_p, neck, neck_pool), **at_cuts})
        _stack_views(out, views)
    return {k: np.concatenate(v, axis=1) for k, v in out.items()}


@torch.no_grad()
def rest_pooled(backbone: nn.Module, prefix: Sequence[np.ndarray], cut: int, device: torch.device, batch: int = 128,
                gem_p: float = 3.0, neck: nn.Module | None = None, neck_pool: str = "avg",
                channels_last: bool = True, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """`forward_pooled` from the stored output of the backbone's first `cut` units: `prefix` one (N, C, H, W) array
    a view (the image, its mirror image); the rest of the network runs on each view; `names` as there."""
    backbone.eval()
    if neck is not None:
        neck.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    backbone.to(memory_format=fmt)
    pools, kept = wanted_pools(backbone, names, neck, neck_pool)
    out: dict[str, list[np.ndarray]] = {k: [] for k in kept}
    for start in range(0, len(prefix[0]), batch):
        # float16 rows to float32 in torch, in the layout the model wants (numpy's half cast is ~2.5x slower)
        views = [torch.from_numpy(np.array(v[start:start + batch])).to(device).contiguous(memory_format=fmt).float()
                 for v in prefix]
        _stack_views(out, [_pooled(backbone, backbone.forward_rest(h, cut), pools, gem_p, neck, neck_pool)
                           for h in views])
    return {k: np.concatenate(v, axis=1) for k, v in out.items()}


# ---- the pass -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrozenPass:
    """How a frozen network's outputs are computed and kept: the network, the digest of its weights and its input
    convention (`data_cfg`), the views (with the mirror image when `flip`), the GeM power, and how it runs (device,
    batch, cv2 worker threads, memory format, and the runtime: "" lets `frozen_runtime` pick). `label` names its
    folders. Without `backbone`, the network's `card` answers what the key needs and `build` gives the network when
    something is to be computed (a warm run builds no network)."""

    backbone: nn.Module | None
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
    chunk: int = CHUNK  # images per saved chunk while a pass runs
    card: NetworkCard | None = field(default=None, compare=False)
    build: Callable[[], nn.Module] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, cfg: TrainConfig, backbone: nn.Module, digest: str, data_cfg: dict, device: torch.device
           ) -> FrozenPass:
        """A run config's frozen pass of `backbone` (its weights hashing to `digest`)."""
        return cls(backbone, digest, data_cfg, cfg.backbone, device, cfg.eval_batch_size, cfg.gem_p,
                   cfg.channels_last, cfg.flip_views, cfg.threads)

    @cached_property
    def net(self) -> nn.Module:
        """The network itself (built now when the pass was given its card only)."""
        return self.backbone if self.backbone is not None else self.build()

    @cached_property
    def _card(self) -> NetworkCard:
        return self.card or NetworkCard.of(self.backbone, self.data_cfg, self.digest)

    @cached_property
    def engine(self) -> str:
        """The runtime that computes them: `runtime`, else the one `frozen_runtime` picks (an ONNX network's graph
        on a CPU)."""
        engine = self.runtime or (GRAPH if self._card.graph and self.device.type == "cpu" else TORCH_FP32)
        if engine not in RUNTIMES:
            raise ValueError(f"unknown feature runtime {engine!r}; one of {RUNTIMES}")
        return engine

    @property
    def views(self) -> int:
        return 2 if self.flip else 1

    @property
    def poolings(self) -> list[str]:
        return list(POOLS) + (["native"] if self._card.native else [])

    def key(self, files_digest: str) -> str:
        """Names a pass by everything that changes its numbers (see the module docstring)."""
        parts = [self.digest, str(tuple(self.data_cfg["input_size"])), str(tuple(self.data_cfg["mean"])),
                 str(tuple(self.data_cfg["std"])), self._card.convention, f"gem{self.gem_p}",
                 f"cl{int(self.channels_last)}",
                 code_version(*CODE), self.engine, f"views{self.views}", files_digest]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def folder(self, paths: Sequence[Path], cache_dir: Path) -> Path:
        return Path(cache_dir) / f"frozen_{self.label}_{self.key(file_list_digest(paths))}"

    def cut_shape(self, cut: int) -> tuple[int, ...]:
        """(C, H, W) of one view's output of the first `cut` units."""
        size = self.data_cfg["input_size"][-1]
        with torch.no_grad():
            was = self.net.training
            out = self.net.eval().forward_prefix(torch.zeros(1, 3, size, size, device=self.device), cut)
            self.net.train(was)
        return tuple(out.shape[1:])

    def outputs(self, paths: Sequence[Path], cache_dir: Path, cuts: Sequence[Cut] = (), shard: bool = False,
                pixels: Callable[[], np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """{pooling: float32 (V, N, D)} of `paths` and {cut.name: (V, N, C, H, W) memmap} for each of `cuts`, read
        from the pass's folder, the missing ones computed by one pass (see the module docstring). The graph runtime
        decodes its own batches; torch-fp32 runs on `pixels()` (all images decoded; called only when something is
        computed, and only without `shard` under torchrun, where a process decodes its own chunks)."""
        folder = self.folder(paths, cache_dir)
        ids = np.array([str(p) for p in paths])
        wanted = [*self.poolings, *(c.name for c in cuts)]
        missing = [n for n in wanted if not self._readable(folder, n, ids)]
        if missing:
            log.info("computing %s of %d images into %s (%s)", ", ".join(missing), len(paths), folder, self.engine)
            self._build(folder, paths, ids, missing, [c for c in cuts if c.name in missing], shard, pixels)
        return {n: np.load(folder / f"{n}.npy", mmap_mode="r" if n not in self.poolings else None) for n in wanted}

    def _readable(self, folder: Path, name: str, ids: np.ndarray) -> bool:
        """Whether output `name` is in `folder` and reads back as this pass's output of `ids`; a damaged one (or
        every one, when the folder's ids are damaged) is removed with one warning naming it, and computed again."""
        path = folder / f"{name}.npy"
        if not path.is_file():
            return False
        try:
            check_ids(folder / "ids.npy", read_npy(folder / "ids.npy"), ids)
        except (DamagedFile, FileNotFoundError) as exc:
            if isinstance(exc, DamagedFile):
                rebuilt(exc, "every output of its pass is computed again")
            for stale in folder.glob("*.npy"):
                stale.unlink()
            return False
        try:
            read_npy(path, (self.views, len(ids), *[None] * (3 if name.startswith("cut") else 1)), mmap=True)
        except DamagedFile as exc:
            rebuilt(exc, "computed again")
            path.unlink()
            return False
        return True

    def _compute(self, paths: Sequence[Path], start: int, stop: int, cuts: Sequence[Cut], decoded: Callable
                 ) -> dict[str, np.ndarray]:
        """The outputs of rows start..stop: every pooling and each cut."""
        colour = sorted({c.units for c in cuts if not c.grey})
        grey = sorted({c.units for c in cuts if c.grey})
        size, desc = self.data_cfg["input_size"][-1], f"features {self.label} {start}-{stop}"
        if self.engine == GRAPH:
            workers = default_threads(self.threads)
            batch = min(self.batch, GRAPH_BATCH)
            runtime = graph_runtime(self.net, self.digest, tuple(sorted(set(colour + grey))), workers, self.gem_p)
            out = graph_pooled(runtime, lambda a, b: decode_pixels(paths[start + a:start + b], size, None),
                               stop - start, self.poolings, self.gem_p, self.flip, batch, workers, desc=desc)
            if grey:
                out.update({f"{k}-grey": v for k, v in graph_pooled(
                    runtime, lambda a, b: grey_pixels(decode_pixels(paths[start + a:start + b], size, None)),
                    stop - start, [], self.gem_p, self.flip, batch, workers, desc=desc).items()})
        else:
            pixels = decoded(start, stop)
            out = forward_pooled(self.net, pixels, self.data_cfg, self.device, self.batch, self.gem_p, desc,
                                 self.channels_last, flip=self.flip, cuts=colour)
            if grey:
                out.update({f"{k}-grey": v for k, v in forward_pooled(
                    self.net, grey_pixels(pixels), self.data_cfg, self.device, self.batch, self.gem_p, desc,
                    self.channels_last, flip=self.flip, cuts=grey).items() if k.startswith("cut")})
        found = {k: v for k, v in out.items() if not k.startswith("cut")}
        for c in cuts:
            found[c.name] = c.stored(out[cut_key(c.units) + ("-grey" if c.grey else "")])
        return found

    def _build(self, folder: Path, paths: Sequence[Path], ids: np.ndarray, names: list[str], cuts: list[Cut],
               shard: bool, pixels: Callable[[], np.ndarray] | None) -> None:
        """Compute `names` of `ids` in saved chunks and write each output file whole (see the module docstring)."""
        rank, world = dist_rank_world() if shard else (0, 1)
        size = self.data_cfg["input_size"][-1]
        source: list[np.ndarray] = []  # the decoded pixels (torch runtime, one process), read at the first chunk

        def decoded(start: int, stop: int) -> np.ndarray:
            if world > 1 or pixels is None:  # a process decodes only its own chunks
                return decode_pixels(paths[start:stop], size, None)
            if not source:
                source.append(pixels())
            return source[0][start:stop]

        parts = folder / ("parts-" + hashlib.sha256("|".join(sorted(names)).encode()).hexdigest()[:8])
        bounds = chunk_bounds(len(ids), self.chunk)
        mine = [i for i in range(len(bounds)) if i % world == rank]
        for i in progress(mine, desc=f"features {self.label} ({len(ids):,} images)", unit="chunk"):
            start, stop = bounds[i]
            part = parts / f"rows{start:09d}-{stop:09d}.npz"
            if not _part_readable(part, names, stop - start):
                found = self._compute(paths, start, stop, cuts, decoded)
                with atomic_path(part, suffix=".npz") as tmp:
                    np.savez(tmp, **{n: found[n] for n in names})
        if world > 1:
            tdist.barrier()
        if rank == 0:
            _assemble(folder, ids, names, parts, bounds)
        if world > 1:
            tdist.barrier()


def _part_readable(part: Path, names: list[str], rows: int) -> bool:
    """A saved chunk that holds every output of `names` for its rows (one left by a killed pass is trusted only so;
    a damaged one is computed again, with one warning)."""
    if not part.is_file():
        return False
    try:
        data = read_npz(part, names)
        if any(data[n].ndim < 2 or data[n].shape[1] != rows for n in names):
            raise DamagedFile(part, f"does not hold {rows} rows of each output")
    except DamagedFile as exc:
        rebuilt(exc, "computed again")
        return False
    return True


def _assemble(folder: Path, ids: np.ndarray, names: list[str], parts: Path, bounds: Sequence[tuple[int, int]]
              ) -> None:
    """Each output of `names` joined from the saved chunks into its own file, written whole; ids first."""
    if not (folder / "ids.npy").is_file():
        with atomic_path(folder / "ids.npy", suffix=".npy") as tmp:
            np.save(tmp, ids)
    for name in names:
        chunks = [parts / f"rows{a:09d}-{b:09d}.npz" for a, b in bounds]
        with np.load(chunks[0]) as first:
            sample = first[name]
        with atomic_path(folder / f"{name}.npy", suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=sample.dtype,
                                            shape=(sample.shape[0], len(ids), *sample.shape[2:]))
            for (a, b), chunk in zip(bounds, chunks, strict=True):
                with np.load(chunk) as data:
                    out[:, a:b] = data[name]
            out.flush()
            del out
    shutil.rmtree(parts, ignore_errors=True)
