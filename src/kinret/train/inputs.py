"""The inputs a run is built from, rebuilt the same way by the trainer and by a later scorer: which families a fold
trains on and holds out (`training_families`), the image table over both in family-id order (`family_table`), the
run's cache folder and the cached frozen features of its backbone (`frozen_features`, built ahead of a grid's
workers by `shared_features`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kinret.data import DEFAULT_ROOT
from kinret.data.layout import DataLayout
from kinret.data.pixels import ImageTable, decode_pixels
from kinret.data.synth import ensure_default
from kinret.features.cache import FrozenFeatures
from kinret.features.prefix import Prefix
from kinret.models.config import TrainConfig, seed_of
from kinret.models.networks import build_backbone, state_digest


def training_families(cfg: TrainConfig, fold: int) -> tuple[list, list, DataLayout]:
    """(families to train on, families to evaluate on, the data folder's layout); the synthetic default is generated
    on first use."""
    if Path(cfg.data_root) == DEFAULT_ROOT:
        ensure_default()
    layout = DataLayout.of(cfg.data_root)
    train, held = layout.fold_families(cfg.n_folds, cfg.fold_seed, fold)
    return train, held, layout


def family_table(train_fams: list, eval_fams: list) -> ImageTable:
    # in family-id order whatever the fold, so every fold shares one pixel and one feature cache
    return ImageTable.from_families(sorted(train_fams + eval_fams, key=lambda f: f.fid))


def cache_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_root) / "_cache"


def frozen_features(backbone: nn.Module, digest: str, data_cfg: dict, table: ImageTable, cfg: TrainConfig,
                    device: torch.device, prefix: Prefix | None = None) -> torch.Tensor:
    """(V, N, D) pooled features of the table's images and (V = 2, `flip_views`) their mirror images, from the shared
    feature cache; a pass that computes them writes `prefix` too (the graph runtime gives both at once)."""
    cache = cache_dir(cfg)
    feats = FrozenFeatures.of(cfg, backbone, digest, data_cfg, device, prefix).cached(
        table.paths, lambda: decode_pixels(table.paths, data_cfg["input_size"][-1], cache), cache)
    return torch.from_numpy(feats[cfg.pool])


def shared_features(cfg: TrainConfig, fold: int, device: torch.device) -> None:
    """Build, or find, the frozen feature cache a head-only run of `cfg` reads, from the backbone its trainer builds
    (a scratch backbone seeded as there): every fold and every head of one backbone shares it, so a grid fills it
    once, with every core, before its workers start."""
    train, held, _ = training_families(cfg, fold)
    torch.manual_seed(seed_of(cfg.seed))
    backbone, data_cfg = build_backbone(cfg)
    backbone.to(device)
    frozen_features(backbone, state_digest(backbone), data_cfg, family_table(train, held), cfg, device)
