"""The cached frozen prefix: when a fine-tune freezes the leading units of the backbone (`cfg.freeze`), their output
is computed once per image and view and kept on disk, so every training step runs only the trained rest.

What it buys and costs:
- Time: a step skips the prefix's forward pass (its backward is skipped anyway, nothing in it is trained). On SFace
  the early units run at full resolution (112x112, 56x56) where the CPU is memory-bound: they cost far more time
  than their share of the multiply-adds. `benchmarks/bench_finetune.py` measures the gain side by side.
- Space: the output of the cut is a feature map per image and view. SFace with its first `cut` units frozen:
  cut 24 (through conv_13_dw) 512x7x7, 50 KB a view in float16; cut 12 (through conv_7_dw) 256x14x14, 100 KB;
  cut 6 (through conv_4_dw) 128x56x56, 800 KB, i.e. 16 GB for 10,000 images with their mirror views. A deeper cut
  is smaller and faster but leaves fewer layers to adapt (on SFace few parameters sit early: cut 24 still trains
  8.0M of 9.6M). The size is estimated and logged before anything is computed, and a cache over `prefix_cache_gb`
  is refused. Storage is float16 by default (relative error ~5e-4; a value that overflows is refused) or float32
  (exact: the tests compare losses and gradients with the full model's).
- Augmentation: pixels are augmented before the prefix, so with a cached prefix only views that can be computed in
  advance apply: the mirror image (flip_p) and, when `grey_p` > 0, the greyscale image and its mirror (4 views
  instead of 2). Colour jitter and the affine warp change every step and do not commute with the prefix: a config
  asking for them with `cache_prefix` is refused (train from pixels for those).
- Exactness: the prefix must compute the same in training as at evaluation: no trained parameter, BatchNorm on its
  running statistics (SFace pins them) and no dropout. The evaluation still runs the whole network on pixels, so
  the held-out scores are exactly those a checkpoint gives when scored later.

The cache lives in the run's cache folder as one `.npy` (views, images, C, H, W), memory-mapped, written to a
temporary name and renamed, keyed by the backbone's weight digest, the cut, the views, the storage type, the
preprocessing and the image files (path and content).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kinret.data.pixels import file_list_digest, gather, normalize, to_float
from kinret.errors import KinretInputError
from kinret.io import atomic_path
from kinret.log import progress
from kinret.models.config import TrainConfig
from kinret.models.networks import freeze_prefixes, frozen_cut
from kinret.train.sampling import pixel_views

log = logging.getLogger("kinret.train")
PREFIX_CODE_VERSION = 1  # bump when the prefix computation (views, preprocessing) changes


def prefix_views(cfg: TrainConfig) -> int:
    """Views cached per image: image and mirror (index = flip), plus greyscale ones (index = flip + 2 grey)."""
    return 4 if cfg.augment and cfg.grey_p > 0 else 2


def prefix_cut(cfg: TrainConfig, backbone: nn.Module) -> int:
    """The cut a `cache_prefix` run caches at: every unit before it frozen (`cfg.freeze`, `cfg.freeze_units`).
    Raises when the config cannot use a cached prefix (see the module docstring for why)."""
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
    cut = frozen_cut(backbone, freeze_prefixes(backbone, cfg))
    if cut == 0:
        raise KinretInputError(None, f"{name}: cache_prefix needs frozen leading units: set freeze_units")
    return cut


def prefix_bytes(n_images: int, views: int, shape: Sequence[int], dtype: str) -> int:
    """Size of the cache: views x images x prod(shape) x bytes of the storage type."""
    return views * n_images * math.prod(shape) * np.dtype(dtype).itemsize


def prefix_key(digest: str, cut: int, views: int, dtype: str, data_cfg: dict, paths: Sequence[Path]) -> str:
    parts = [digest, f"cut{cut}", f"views{views}", dtype, str(tuple(data_cfg["input_size"])),
             str(tuple(data_cfg["mean"])), str(tuple(data_cfg["std"])), f"v{PREFIX_CODE_VERSION}",
             file_list_digest(paths)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def _fill(out: np.ndarray, backbone: nn.Module, cut: int, pixels: np.ndarray, data_cfg: dict,
          device: torch.device, batch: int) -> None:
    """out[v, i] = prefix(view v of image i), v = flip + 2 grey, computed a batch at a time."""
    backbone.eval()
    views = out.shape[0]
    for start in progress(range(0, len(pixels), batch), desc=f"prefix cut {cut}", total=math.ceil(len(pixels) / batch)):
        x = to_float(np.asarray(pixels[start:start + batch]), device)
        for v in range(views):
            flag = torch.ones(len(x), dtype=torch.bool)
            h = backbone.forward_prefix(normalize(pixel_views(x, flag & (v % 2 == 1), flag & (v >= 2)),
                                                  data_cfg["mean"], data_cfg["std"]), cut).float().cpu().numpy()
            stored = h.astype(out.dtype)
            if not np.isfinite(stored).all():
                raise KinretInputError(None, f"the prefix output (|x| up to {np.abs(h).max():.3g}) overflows "
                                             f"{out.dtype}: set prefix_dtype=float32")
            out[v, start:start + len(x)] = stored


def cached_prefix(backbone: nn.Module, digest: str, cut: int, cfg: TrainConfig, data_cfg: dict,
                  paths: Sequence[Path], pixels: Callable[[], np.ndarray], cache_dir: Path,
                  device: torch.device) -> np.ndarray:
    """(views, N, C, H, W) memory-mapped prefix outputs of `paths`, read from `cache_dir` when the key matches,
    else computed and written atomically. Refused over `cfg.prefix_cache_gb`; `pixels` is only called on a miss."""
    views, size = prefix_views(cfg), data_cfg["input_size"][-1]
    with torch.no_grad():
        shape = tuple(backbone.eval().forward_prefix(torch.zeros(1, 3, size, size, device=device), cut).shape[1:])
    nbytes = prefix_bytes(len(paths), views, shape, cfg.prefix_dtype)
    per_image = nbytes / max(len(paths), 1)
    log.info("prefix cache: cut after unit %d, %d views x %d images x %s %s = %.1f MB (%.0f KB an image)", cut,
             views, len(paths), "x".join(map(str, shape)), cfg.prefix_dtype, nbytes / 1e6, per_image / 1e3)
    if nbytes > cfg.prefix_cache_gb * 1e9:
        raise KinretInputError(None, f"{cfg.name}: the prefix cache would take {nbytes / 1e9:.1f} GB, over "
                                     f"prefix_cache_gb={cfg.prefix_cache_gb}: freeze more units (a deeper, smaller "
                                     "cut), use prefix_dtype=float16, or raise prefix_cache_gb")
    key = prefix_key(digest, cut, views, cfg.prefix_dtype, data_cfg, paths)
    cache = Path(cache_dir) / f"prefix_{cfg.backbone}_cut{cut}_{key}.npy"
    if not cache.is_file():
        log.info("computing the frozen prefix of %d images into %s", len(paths), cache)
        with atomic_path(cache, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=cfg.prefix_dtype, shape=(views, len(paths), *shape))
            _fill(out, backbone, cut, pixels(), data_cfg, device, cfg.eval_batch_size)
            out.flush()
            del out
    found = np.load(cache, mmap_mode="r")
    if found.shape != (views, len(paths), *shape):
        raise ValueError(f"prefix cache {cache}: shape {found.shape}, expected {(views, len(paths), *shape)}")
    return found


def gather_prefix(cache: np.ndarray, rows: np.ndarray, view: np.ndarray) -> np.ndarray:
    """cache[view[i], rows[i]] for every i, read from the memory map in ascending order."""
    flat = cache.reshape((-1,) + cache.shape[2:])
    return gather(flat, np.asarray(view) * cache.shape[1] + np.asarray(rows))
