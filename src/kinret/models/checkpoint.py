"""Rebuild a trained model from its run folder, for embedding and scoring outside the trainer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, config_from_dict, seed_of
from kinret.models.networks import FACE_NETWORKS, KinNet, build_backbone, pooled_dim, state_digest


def shared_backbone(cfg: TrainConfig, backbones: dict) -> tuple[torch.nn.Module, dict]:
    """`build_backbone(cfg)`, built once per backbone and weights and kept in `backbones` (frozen backbones only)."""
    if cfg.backbone_key not in backbones:
        backbones[cfg.backbone_key] = build_backbone(cfg)
    return backbones[cfg.backbone_key]


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", backbones: dict | None = None
               ) -> tuple[KinNet, TrainConfig, dict]:
    """(model in eval mode, its config, its data config) from ``run_dir/checkpoint.pt``.

    `backbones`, a dict kept by the caller, shares one frozen backbone between the head-only checkpoints built on
    it (they never change it), so scoring a grid of heads builds the backbone once.

    End-to-end checkpoints hold the whole network, so the backbone is built bare and filled from the checkpoint
    (no download). Head-only checkpoints hold the neck and head; their frozen backbone is rebuilt from its source
    and must hash to the digest recorded at training time, so features never come from other weights.
    """
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise KinretInputError(None, f"{path} does not exist: train this run first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = config_from_dict(ckpt["config"])
    torch.manual_seed(seed_of(cfg.seed))  # as the trainer did: a scratch backbone is rebuilt identically
    if cfg.mode == "e2e" and cfg.backbone not in FACE_NETWORKS:  # a timm network: its structure, no download
        backbone, data_cfg = build_backbone(replace(cfg, pretrained=False, weights=""))
    elif cfg.mode == "head" and backbones is not None:
        backbone, data_cfg = shared_backbone(cfg, backbones)
    else:
        backbone, data_cfg = build_backbone(cfg)
    model = KinNet(backbone, pooled_dim(backbone, cfg.pool), cfg)
    if cfg.mode == "head":
        digest = state_digest(backbone)
        if digest != ckpt["backbone_digest"]:
            raise KinretInputError(path, f"the frozen backbone {cfg.backbone!r} now has other weights (digest "
                                         f"{digest}, trained with {ckpt['backbone_digest']}): retrain the head")
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            raise KinretInputError(None, f"{path}: checkpoint does not fit the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    else:
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt["data_config"]
