"""A trained run's checkpoint and config read back (checked: a damaged config.json is written again from its
checkpoint's copy), and frozen networks shared between the models that read them; a model is rebuilt from its
checkpoint by its feed (`kinret.features.feeds.load_model`)."""

from __future__ import annotations

from pathlib import Path

import torch

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, config_from_dict, save_config, seed_of
from kinret.models.networks import build_backbone
from kinret.readback import DamagedFile, read_json, read_torch, rebuilt

CONFIG_KEYS = ("name", "backbone", "mode", "epochs")  # fields every config.json the kit wrote holds
RETRAIN = ("delete it and run the same command again: make_submission.py (or python -m kinret.train / kinret.grid) "
           "trains this run again from the start")


def shared_backbone(cfg: TrainConfig, backbones: dict) -> tuple[torch.nn.Module, dict]:
    """`build_backbone(cfg)`, built once per backbone and weights and kept in `backbones` (frozen backbones only);
    a scratch network seeded as its trainer seeded it, so every reader builds the same one."""
    if cfg.backbone_key not in backbones:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(cfg.seed))
            backbones[cfg.backbone_key] = build_backbone(cfg)
    return backbones[cfg.backbone_key]


def read_checkpoint(run_dir: str | Path) -> tuple[dict, TrainConfig, Path]:
    """(the checkpoint's contents, its config, its path) of ``run_dir/checkpoint.pt``; a damaged one is named with
    what to do (train the run again)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise KinretInputError(None, f"{path} does not exist: train this run first")
    try:
        ckpt = read_torch(path, ("model", "config", "data_config"))
    except DamagedFile as exc:
        raise exc.advise(RETRAIN) from None
    return ckpt, config_from_dict(ckpt["config"]), path


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
