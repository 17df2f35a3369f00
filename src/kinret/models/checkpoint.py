"""A trained run's checkpoint read back, and frozen networks shared between the models that read them; a model is
rebuilt from its checkpoint by its feed (`kinret.features.feeds.load_model`)."""

from __future__ import annotations

from pathlib import Path

import torch

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, config_from_dict
from kinret.models.networks import build_backbone


def shared_backbone(cfg: TrainConfig, backbones: dict) -> tuple[torch.nn.Module, dict]:
    """`build_backbone(cfg)`, built once per backbone and weights and kept in `backbones` (frozen backbones only)."""
    if cfg.backbone_key not in backbones:
        backbones[cfg.backbone_key] = build_backbone(cfg)
    return backbones[cfg.backbone_key]


def read_checkpoint(run_dir: str | Path) -> tuple[dict, TrainConfig, Path]:
    """(the checkpoint's contents, its config, its path) of ``run_dir/checkpoint.pt``."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise KinretInputError(None, f"{path} does not exist: train this run first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt, config_from_dict(ckpt["config"]), path
