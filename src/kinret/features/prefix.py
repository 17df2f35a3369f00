"""The cached frozen prefix of a fine-tune: the output of a face network's first `cut` units (all frozen) for every
image and view, kept on disk so that training and embedding run only the rest of the network.

Where it comes from: on a CPU an ONNX network's graph runtime returns the cut's output from the same pass as the
frozen features (`kinret.features.cache.FrozenFeatures` with a `Prefix`), so the prefix costs nothing beyond the
feature pass a run makes anyway, and training sees exactly the numbers evaluation feeds the tail. Rows no pass has
produced are computed on their own (the graph runtime on a CPU, the torch module elsewhere).

What it costs: a feature map per image and view (SFace cut 24: 512x7x7, 50 KB a view in float16), memory-mapped from
one `.npy` per image list (views, N, C, H, W) with its image ids beside it (`.ids.npy`), keyed by the prefix's own
weights (the frozen units only, so a fine-tuned model finds the prefix its training used), the cut, the input
convention, the views, the storage type and the image files. A prefix over `max_gb` is refused; float16 values that
overflow are refused (set prefix_dtype=float32).

Views: the image, its mirror image (`flip`), and the greyscale copies of both (`grey`): index = mirror + n_mirror *
grey. Colour jitter and affine warps change every step and do not commute with the prefix, so a config asking for
them with `cache_prefix` is refused by the trainer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kinret.data.pixels import decode_pixels, file_list_digest, gather, normalize, to_float
from kinret.errors import KinretInputError
from kinret.features.graph_runtime import cut_key, graph_pooled
from kinret.features.runtime import GRAPH, GRAPH_BATCH, default_threads, frozen_runtime, graph_runtime
from kinret.io import atomic_path
from kinret.log import progress
from kinret.models.config import TrainConfig
from kinret.models.networks import freeze_prefixes, frozen_cut
from kinret.readback import DamagedFile, check_ids, read_npy, rebuilt

log = logging.getLogger(__name__)
PREFIX_CODE_VERSION = 2  # bump when the prefix computation (views, preprocessing) changes
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B (torchvision's rgb_to_grayscale)


def prefix_cut(cfg: TrainConfig, backbone: nn.Module) -> int:
    """The units of `backbone`'s chain a config keeps frozen from the start (`freeze`, `freeze_units`): its cut."""
    return frozen_cut(backbone, freeze_prefixes(backbone, cfg))


def checked_cut(cfg: TrainConfig, backbone: nn.Module) -> int:
    """`prefix_cut` of a `cache_prefix` run, refusing a config a cached prefix cannot serve: not end to end, a
    network without a chain of units, augmentations the cached views cannot give, no frozen leading unit."""
    name = cfg.name
    if cfg.mode != "e2e":
        raise KinretInputError(None, f"{name}: cache_prefix is for end-to-end runs (head mode caches features)")
    if not hasattr(backbone, "unit_prefixes"):
        raise KinretInputError(None, f"{name}: cache_prefix needs a face network written as a chain of units (sface, "
                                     f"onnx, iresnet*), not {cfg.backbone!r}")
    if cfg.augment and (cfg.color_jitter > 0 or cfg.affine_degrees > 0 or cfg.affine_translate > 0
                        or cfg.affine_scale > 0):
        raise KinretInputError(None, f"{name}: with cache_prefix only flip and greyscale augmentation can apply "
                                     "(cached views); set color_jitter=0 and affine_degrees, affine_translate, "
                                     "affine_scale to 0, or cache_prefix=false to augment pixels")
    if cfg.augment and cfg.flip_p > 0 and not cfg.flip_views:
        raise KinretInputError(None, f"{name}: flip augmentation needs the mirror view cached: set flip_views=true, "
                                     "or flip_p=0")
    cut = prefix_cut(cfg, backbone)
    if cut == 0:
        raise KinretInputError(None, f"{name}: cache_prefix needs frozen leading units: set freeze_units")
    return cut


def gather_prefix(cache: np.ndarray, rows: np.ndarray, view: np.ndarray) -> np.ndarray:
    """cache[view[i], rows[i]] for every i, read from the memory map in ascending order."""
    flat = cache.reshape((-1,) + cache.shape[2:])
    return gather(flat, np.asarray(view) * cache.shape[1] + np.asarray(rows))


def grey_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 in 0..1, every channel 0.299 R + 0.587 G + 0.114 B: the greyscale view
    the trainer's augmentation makes of the same pixels."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    return np.repeat((x @ np.asarray(LUMA, dtype=np.float32))[..., None], 3, axis=-1)


@dataclass(frozen=True)
class Prefix:
    """The prefix of `backbone` at `cut` (its first `cut` units, frozen), over the views `flip` and `grey` ask for,
    stored as `dtype`; `label` names its files, `device`, `batch` and `threads` say how missing rows are computed."""

    backbone: nn.Module
    cut: int
    data_cfg: dict
    label: str
    flip: bool = False
    grey: bool = False
    dtype: str = "float16"
    device: torch.device = torch.device("cpu")
    batch: int = 128
    threads: int = 0
    max_gb: float = 8.0
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, cfg: TrainConfig, backbone: nn.Module, cut: int, data_cfg: dict, device: torch.device) -> Prefix:
        """A run config's prefix: the mirror view with `flip_views`, greyscale views when it augments with `grey_p`."""
        return cls(backbone, cut, data_cfg, cfg.backbone, cfg.flip_views, cfg.augment and cfg.grey_p > 0,
                   cfg.prefix_dtype, device, cfg.eval_batch_size, cfg.threads, cfg.prefix_cache_gb)

    @property
    def views(self) -> int:
        return (2 if self.flip else 1) * (2 if self.grey else 1)

    @cached_property
    def digest(self) -> str:
        """The frozen units' weights, the cut, the input convention and the code: what the numbers depend on."""
        convention = getattr(self.backbone, "convention", None)  # an ONNX network's channel order among the rest
        h = hashlib.sha256(f"cut{self.cut}|v{PREFIX_CODE_VERSION}|{sorted(self.data_cfg.items())}|{convention}"
                           .encode())
        units = tuple(self.backbone.unit_prefixes()[:self.cut])
        for k, v in sorted(self.backbone.state_dict().items()):
            if k.startswith(units):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @cached_property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of one view's prefix."""
        size = self.data_cfg["input_size"][-1]
        with torch.no_grad():
            was = self.backbone.training
            out = self.backbone.eval().forward_prefix(torch.zeros(1, 3, size, size, device=self.device), self.cut)
            self.backbone.train(was)
        return tuple(out.shape[1:])

    def path(self, cache_dir: Path, files_digest: str) -> Path:
        return Path(cache_dir) / f"prefix_{self.label}_{self.digest}_{self.dtype}_v{self.views}_{files_digest}.npy"

    # ---- computing ---------------------------------------------------------------------------------------------
    def check_size(self, n_images: int) -> None:
        """Refuse a prefix of `n_images` over `max_gb` (before anything is computed or reused)."""
        nbytes = self.views * n_images * math.prod(self.shape) * np.dtype(self.dtype).itemsize
        log.debug("prefix at unit %d: %d views x %d images x %s %s = %.1f MB", self.cut, self.views, n_images,
                 "x".join(map(str, self.shape)), self.dtype, nbytes / 1e6)
        if nbytes > self.max_gb * 1e9:
            raise KinretInputError(None, f"the prefix cache would take {nbytes / 1e9:.1f} GB, over prefix_cache_gb="
                                         f"{self.max_gb}: freeze more units (a deeper, smaller cut), use "
                                         "prefix_dtype=float16, or raise prefix_cache_gb")

    def stored(self, array: np.ndarray) -> np.ndarray:
        """float32 (V, n, C, H, W) as stored; refuses values the storage type cannot hold."""
        out = np.asarray(array).astype(self.dtype)
        if not np.isfinite(out).all():
            raise KinretInputError(None, f"the prefix output (|x| up to {np.abs(array).max():.3g}) overflows "
                                         f"{self.dtype}: set prefix_dtype=float32")
        return out

    def from_graph(self, pixels: np.ndarray) -> np.ndarray:
        """(V, n, C, H, W) float32 prefix of uint8 RGB `pixels`, by the graph runtime."""
        workers = default_threads(self.threads)
        runtime = graph_runtime(self.backbone, self.digest, (self.cut,), workers, 3.0)
        sets = [pixels, grey_images(pixels)] if self.grey else [pixels]
        parts = [graph_pooled(runtime, lambda a, b, p=p: p[a:b], len(p), [], 3.0, self.flip,
                              min(self.batch, GRAPH_BATCH), workers)[cut_key(self.cut)] for p in sets]
        return np.concatenate(parts)

    @torch.no_grad()
    def from_torch(self, pixels: np.ndarray) -> np.ndarray:
        """(V, n, C, H, W) float32 prefix of uint8 RGB `pixels`, by the torch module (a batch at a time)."""
        self.backbone.eval()
        out = []
        for start in range(0, len(pixels), self.batch):
            chunk = np.asarray(pixels[start:start + self.batch])
            views = []
            for image in [chunk, grey_images(chunk)] if self.grey else [chunk]:
                x = to_float(image, self.device) if image.dtype == np.uint8 else (
                    torch.from_numpy(image).to(self.device).permute(0, 3, 1, 2))
                for view in (x, x.flip(3)) if self.flip else (x,):
                    v = normalize(view, self.data_cfg["mean"], self.data_cfg["std"])
                    views.append(self.backbone.forward_prefix(v, self.cut).float().cpu().numpy())
            out.append(np.stack(views))
        return np.concatenate(out, axis=1)

    def compute(self, paths: Sequence[Path]) -> np.ndarray:
        """(V, n, C, H, W) float32 prefix of the images `paths` (decoded here)."""
        pixels = decode_pixels(paths, self.data_cfg["input_size"][-1], None)
        if frozen_runtime(self.backbone, self.device) == GRAPH:
            return self.from_graph(pixels)
        return self.from_torch(pixels)

    # ---- the files ------------------------------------------------------------------------------------------------
    def write(self, target: Path, ids: np.ndarray, fill: Callable[[np.ndarray], None]) -> np.ndarray:
        """Write the prefix file `target` for `ids`: `fill(out)` fills the (V, N, C, H, W) memmap; then its ids."""
        with atomic_path(target, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(self.views, len(ids),
                                                                                     *self.shape))
            fill(out)
            out.flush()
            del out
        with atomic_path(target.with_suffix(".ids.npy"), suffix=".npy") as tmp:
            np.save(tmp, ids)
        self._index.clear()
        return self.load(target, ids)

    def load(self, path: Path, ids: np.ndarray | None = None) -> np.ndarray:
        """The prefix file `path` memory-mapped, checked (`DamagedFile`): `views` views of `shape` in `dtype`, and,
        with `ids`, its ids file holding exactly those."""
        found = read_npy(path, (self.views, None if ids is None else len(ids), *self.shape), self.dtype, mmap=True)
        if ids is not None:
            check_ids(path.with_suffix(".ids.npy"), read_npy(path.with_suffix(".ids.npy"), (len(ids),)), ids)
        return found

    def index(self, cache_dir: Path) -> dict[str, tuple[Path, int]]:
        """image id -> (prefix file, row) over every finished prefix file of this prefix in `cache_dir`."""
        if not self._index:
            stem = f"prefix_{self.label}_{self.digest}_{self.dtype}_v{self.views}_"
            for ids_file in sorted(Path(cache_dir).glob(f"{stem}*.ids.npy")):
                data = ids_file.with_name(ids_file.name.removesuffix(".ids.npy") + ".npy")
                if data.is_file():
                    try:  # a damaged file lends no rows: they are computed again
                        ids = read_npy(ids_file, (None,))
                        self.load(data, ids)
                    except DamagedFile as exc:
                        rebuilt(exc, "its rows are computed again")
                        continue
                    if not _holds(data, ids):
                        continue
                    for row, i in enumerate(ids.tolist()):
                        self._index.setdefault(i, (data, row))
        return self._index

    def table(self, paths: Sequence[Path], cache_dir: Path) -> np.ndarray:
        """The (V, N, C, H, W) memmap of `paths` in order: its file when one covers exactly these images, else one
        assembled from the rows other files hold, the missing rows computed, and kept for the next call."""
        self.check_size(len(paths))
        target = self.path(cache_dir, file_list_digest(paths))
        ids = np.array([str(p) for p in paths])
        if target.is_file() and target.with_suffix(".ids.npy").is_file():
            try:
                return self.load(target, ids)
            except DamagedFile as exc:
                rebuilt(exc, "computed again")
        where = self.index(cache_dir)
        missing = [i for i, p in enumerate(ids) if p not in where]
        log.info("prefix of %d images into %s: %d from earlier passes, %d to compute", len(ids), target,
                 len(ids) - len(missing), len(missing))

        def fill(out: np.ndarray) -> None:
            by_file: dict[Path, list[tuple[int, int]]] = {}
            for i, p in enumerate(ids):
                if p in where:
                    by_file.setdefault(where[p][0], []).append((i, where[p][1]))
            for path, pairs in by_file.items():
                source = np.load(path, mmap_mode="r")
                mine, theirs = (np.array(x) for x in zip(*pairs, strict=True))
                for v in range(self.views):
                    for a in range(0, len(mine), 1024):
                        out[v, mine[a:a + 1024]] = gather(source[v], theirs[a:a + 1024])
            for a in progress(range(0, len(missing), 1024), desc=f"prefix cut {self.cut}", unit="chunk"):
                rows = missing[a:a + 1024]
                out[:, rows] = self.stored(self.compute([paths[r] for r in rows]))

        return self.write(target, ids, fill)

    def read(self, ids: Sequence[str], cache_dir: Path) -> np.ndarray | None:
        """(V, n, C, H, W) stored prefix rows of the images `ids` (paths as strings), or None when a row is missing."""
        where = self.index(cache_dir)
        if any(i not in where for i in ids):
            return None
        out = np.empty((self.views, len(ids), *self.shape), dtype=self.dtype)
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for k, i in enumerate(ids):
            by_file.setdefault(where[i][0], []).append((k, where[i][1]))
        for path, pairs in by_file.items():
            source = np.load(path, mmap_mode="r")
            mine, theirs = (np.array(x) for x in zip(*pairs, strict=True))
            for v in range(self.views):
                out[v, mine] = gather(source[v], theirs)
        return out


def _holds(path: Path, ids: np.ndarray) -> bool:
    """Whether the prefix file `path` holds the images its ids name, as they are now: its name ends with the digest
    of their paths and content (ids of other images, or images changed since, lend no rows)."""
    try:
        return path.stem.endswith("_" + file_list_digest([Path(i) for i in ids.tolist()]))
    except OSError:  # an image gone since
        return False


def save_parts(parts_dir: Path, start: int, stop: int, array: np.ndarray) -> None:
    """One chunk of a prefix computed by a feature pass, kept until the pass assembles its file."""
    with atomic_path(parts_dir / f"rows{start:09d}-{stop:09d}.npy", suffix=".npy") as tmp:
        np.save(tmp, array)


def _saved_part(prefix: Prefix, part: Path, n: int) -> np.ndarray | None:
    """A chunk's part saved by a feature pass, checked; None when there is none, or after one warning when it is
    damaged: the chunk is computed instead."""
    if not part.is_file():
        return None
    try:
        return read_npy(part, (prefix.views, n, *prefix.shape), prefix.dtype)
    except DamagedFile as exc:
        rebuilt(exc, "computed again")
        return None


def assemble_parts(prefix: Prefix, paths: Sequence[Path], parts_dir: Path, bounds: Sequence[tuple[int, int]],
                   cache_dir: Path) -> np.ndarray:
    """The prefix file of `paths` from a feature pass's chunk parts (`save_parts`); chunks without a part (a pass
    resumed from saved feature chunks) are computed; the parts are removed."""
    ids = np.array([str(p) for p in paths])
    prefix.check_size(len(ids))

    def fill(out: np.ndarray) -> None:
        for start, stop in bounds:
            part = parts_dir / f"rows{start:09d}-{stop:09d}.npy"
            found = _saved_part(prefix, part, stop - start)
            out[:, start:stop] = found if found is not None else prefix.stored(prefix.compute(paths[start:stop]))

    found = prefix.write(prefix.path(cache_dir, file_list_digest(paths)), ids, fill)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return found
