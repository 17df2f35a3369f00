"""The inputs a run is built from, rebuilt the same way by the trainer and by a later scorer: which families a fold
trains on and holds out (`training_families`), the image table over both in family-id order (`family_table`), the
run's cache folder, and the frozen pass a grid's head-only runs share, built ahead of its workers
(`shared_features`)."""

from __future__ import annotations

from pathlib import Path

import torch

from kinret.data import DEFAULT_ROOT
from kinret.data.layout import DataLayout
from kinret.data.pixels import ImageTable
from kinret.data.synth import ensure_default
from kinret.features.feeds import feed_class
from kinret.models.config import TrainConfig, seed_of
from kinret.models.networks import build_backbone


def training_families(cfg: TrainConfig, fold: int) -> tuple[list, list, DataLayout]:
    """(families to train on, families to evaluate on, the data folder's layout); the synthetic default is generated
    on first use."""
    if Path(cfg.data_root) == DEFAULT_ROOT:
        ensure_default()
    layout = DataLayout.of(cfg.data_root)
    train, held = layout.fold_families(cfg.n_folds, cfg.fold_seed, fold)
    return train, held, layout


def family_table(train_fams: list, eval_fams: list) -> ImageTable:
    # in family-id order whatever the fold, so every fold shares one pixel cache and one frozen pass
    return ImageTable.from_families(sorted(train_fams + eval_fams, key=lambda f: f.fid))


def cache_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_root) / "_cache"


def shared_features(cfg: TrainConfig, fold: int, device: torch.device) -> None:
    """Build, or find, the frozen pass the runs of `cfg` read, from the network their trainer builds (a scratch
    network seeded as there): every fold and every head of one network shares it, so a grid fills it once, with
    every core, before its workers start."""
    train, held, _ = training_families(cfg, fold)
    torch.manual_seed(seed_of(cfg.seed))
    backbone, data_cfg = build_backbone(cfg)
    backbone.to(device)
    feed_class(cfg)(cfg, device, cache_dir(cfg)).load(backbone, data_cfg, family_table(train, held), True)
