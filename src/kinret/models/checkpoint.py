"""Rebuild a trained model from its run folder, for embedding and scoring outside the trainer; the config a run
folder records (config.json, written again from its checkpoint's copy when damaged)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, config_from_dict, save_config, seed_of
from kinret.models.networks import FACE_NETWORKS, KinNet, build_backbone, pooled_dim, state_digest
from kinret.readback import DamagedFile, read_json, read_torch, rebuilt

CONFIG_KEYS = ("name", "backbone", "mode", "epochs")  # fields every config.json the kit wrote holds
RETRAIN = ("delete it and run the same command again: make_submission.py (or python -m kinret.train / kinret.grid) "
           "trains this run again from the start")


def shared_backbone(cfg: TrainConfig, backbones: dict) -> tuple[torch.nn.Module, dict]:
    """`build_backbone(cfg)`, built once per backbone and weights and kept in `backbones` (frozen backbones only)."""
    if cfg.backbone_key not in backbones:
        backbones[cfg.backbone_key] = build_backbone(cfg)
    return backbones[cfg.backbone_key]


def _checked_config(path: Path) -> dict:
    """The config dict in `path`, checked: a JSON object with `CONFIG_KEYS` that makes a valid `TrainConfig`."""
    data = read_json(path, dict, CONFIG_KEYS)
    try:
        config_from_dict(data)
    except (KinretInputError, TypeError, ValueError) as exc:
        raise DamagedFile(path, f"not a run config: {exc}") from None
    return data


def saved_config(run_dir: str | Path) -> dict | None:
    """What a run folder's config.json records (None when it has none). A damaged one is written again from the
    copy of the config its checkpoint holds, with one warning; without a readable checkpoint it stays damaged
    (`DamagedFile`: delete the run folder to train it again)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return _checked_config(path)
    except DamagedFile as exc:
        try:
            saved = config_from_dict(read_torch(run_dir / "checkpoint.pt", ("config",), mmap=True)["config"])
        except (DamagedFile, FileNotFoundError):
            raise exc.advise(f"and the run has no readable checkpoint to rebuild it from: delete {run_dir} "
                             "(python -m kinret.train ... --restart does that) to train it again") from None
        rebuilt(exc, "written again from the copy of the config its checkpoint holds")
        save_config(saved, path)
        return _checked_config(path)


def run_config(run_dir: str | Path) -> TrainConfig:
    """The config of a trained run folder, from its config.json (`saved_config`)."""
    saved = saved_config(run_dir)
    if saved is None:
        raise KinretInputError(None, f"{Path(run_dir) / 'config.json'} does not exist: train this run first")
    return config_from_dict(saved)


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
    try:
        ckpt = read_torch(path, ("model", "config", "data_config"))
    except DamagedFile as exc:
        raise exc.advise(RETRAIN) from None
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
