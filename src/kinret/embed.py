"""Pooled backbone features of many images, every pooling from one forward pass, with the horizontal flip, cached as
`.npz` (ids + arrays) under a key that covers everything that changes the numbers."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import file_list_digest, normalize, to_float
from .io import atomic_path
from .log import progress
from .models import POOLS

log = logging.getLogger(__name__)
FEATURE_CODE_VERSION = 1  # bump when the feature path (preprocessing, pooling, flip) changes


def pool_names(backbone: nn.Module) -> list[str]:
    return list(POOLS) + (["native"] if hasattr(backbone, "forward_native") else [])


@torch.no_grad()
def forward_pooled(backbone: nn.Module, pixels: np.ndarray, data_cfg: dict, device: torch.device, batch: int = 128,
                   gem_p: float = 3.0, desc: str = "features", channels_last: bool = True) -> dict[str, np.ndarray]:
    """For each pooling, float32 (2, N, D): row 0 the image, row 1 its mirror image. The backbone runs in eval mode
    once per batch and view; every pooling is read off the same feature map."""
    backbone.eval()
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    names = pool_names(backbone)
    out: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in progress(range(0, len(pixels), batch), desc=desc, total=math.ceil(len(pixels) / batch)):
        x = normalize(to_float(pixels[start:start + batch], device), data_cfg["mean"], data_cfg["std"])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = []
        for view in (x, x.flip(3)):
            fmap = backbone.forward_features(view)
            views.append({k: (backbone.forward_native(fmap) if k == "native" else POOLS[k](fmap, gem_p))
                          for k in names})
        for k in names:
            out[k].append(torch.stack([views[0][k], views[1][k]]).float().cpu().numpy())
    return {k: np.concatenate(v, axis=1) for k, v in out.items()}


def feature_key(backbone_digest: str, data_cfg: dict, paths: Sequence[Path], gem_p: float, channels_last: bool
                ) -> str:
    parts = [backbone_digest, str(tuple(data_cfg["input_size"])), str(tuple(data_cfg["mean"])),
             str(tuple(data_cfg["std"])), f"gem{gem_p}", f"cl{int(channels_last)}", f"v{FEATURE_CODE_VERSION}",
             file_list_digest(paths)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cached_features(backbone: nn.Module, backbone_digest: str, data_cfg: dict, paths: Sequence[Path],
                    pixels: Callable[[], np.ndarray], cache_dir: Path, label: str, device: torch.device,
                    batch: int = 128, gem_p: float = 3.0, channels_last: bool = True) -> dict[str, np.ndarray]:
    """`forward_pooled` of `paths`, read from `cache_dir` when the key matches, else computed and written atomically.

    `pixels` is only called on a cache miss. On load the stored ids must equal `paths`, row for row.
    """
    key = feature_key(backbone_digest, data_cfg, paths, gem_p, channels_last)
    cache = Path(cache_dir) / f"features_{label}_{key}.npz"
    ids = np.array([str(p) for p in paths])
    if cache.is_file():
        with np.load(cache) as data:
            if data["ids"].shape != ids.shape or not (data["ids"] == ids).all():
                raise ValueError(f"feature cache {cache}: stored image ids do not match the requested images")
            return {k.removeprefix("pool_"): data[k] for k in data.files if k.startswith("pool_")}
    feats = forward_pooled(backbone, pixels(), data_cfg, device, batch, gem_p, f"features {label}", channels_last)
    with atomic_path(cache, suffix=".npz") as tmp:
        np.savez(tmp, ids=ids, **{f"pool_{k}": v for k, v in feats.items()})
    log.info("cached %s features of %d images in %s", label, len(paths), cache)
    return feats
