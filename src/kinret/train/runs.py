"""Run folders (``runs/{experiment}/fold{k}/``): what state a run is in, and the refusal to overwrite another
config's trained weights."""

from __future__ import annotations

import json
import shutil

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, config_from_dict

RUNTIME_FIELDS = {"threads", "device", "eval_batch_size"}  # how a run executes, not what it computes


def run_status(cfg: TrainConfig, fold: int) -> tuple[str, str]:
    """('todo' | 'partial' | 'finished' | 'conflict', detail) for the run folder of (cfg, fold).

    'conflict': the folder holds trained weights of another config; nothing may overwrite them silently.
    """
    run_dir = cfg.run_dir(fold)
    has_ckpt = (run_dir / "checkpoint.pt").is_file()
    cfg_path = run_dir / "config.json"
    if has_ckpt and cfg_path.is_file():
        saved = config_from_dict(json.loads(cfg_path.read_text())).to_dict()
        diff = {k: (v, getattr(cfg, k)) for k, v in saved.items() if v != cfg.to_dict()[k] and k not in RUNTIME_FIELDS}
        if diff:
            return "conflict", (f"{run_dir} holds a run with another config {diff} (saved, now): use another "
                                "experiment name or --restart")
    state_path = run_dir / "state.json"
    if has_ckpt and state_path.is_file() and json.loads(state_path.read_text())["finished"]:
        return "finished", ""
    return ("partial", "") if has_ckpt else ("todo", "")


def prepare_run_dir(cfg: TrainConfig, fold: int, resume: bool, restart: bool) -> str:
    """'fresh', 'resume' or 'finished'; refuses to overwrite another run's outputs silently."""
    if restart and cfg.run_dir(fold).exists():
        shutil.rmtree(cfg.run_dir(fold))
    status, detail = run_status(cfg, fold)
    if status == "conflict":
        raise KinretInputError(None, detail)
    if status == "partial" and not resume:
        raise KinretInputError(cfg.run_dir(fold), "holds an unfinished run: pass --resume to continue it or --restart")
    return {"todo": "fresh", "partial": "resume", "finished": "finished"}[status]
