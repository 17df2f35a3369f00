"""Experiments: one small python file per experiment in this folder, and the loader.

An experiment file (``src/kinret/train/experiments/<name>.py`` or any ``path/to/file.py``) defines
``cfg = replace(TrainConfig(), ...)`` and, for the grid runner, optionally ``GRID = {"field": [values], ...}`` (the
product of the lists) or a list of such dicts (the union of their products).
"""

from __future__ import annotations

import importlib.util
from dataclasses import fields, replace
from pathlib import Path

from kinret.errors import KinretInputError

from ...models.config import TrainConfig

EXPERIMENTS_DIR = Path(__file__).resolve().parent


def experiment_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise KinretInputError(path, "experiment file does not exist")
        return path
    path = EXPERIMENTS_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise KinretInputError(None, f"no experiment {name!r} in {EXPERIMENTS_DIR}; known: {', '.join(known)}")
    return path


def load_experiment(name: str) -> tuple[TrainConfig, list[dict[str, list]]]:
    """The experiment's config (its `name` set to the file's stem) and its grid as a list of blocks, each a dict
    of value lists whose product is trained (a list of blocks is their union; empty when it defines none)."""
    path = experiment_path(name)
    spec = importlib.util.spec_from_file_location(f"kinret_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = getattr(module, "cfg", None)
    if not isinstance(cfg, TrainConfig):
        raise KinretInputError(path, "must define `cfg = replace(TrainConfig(), ...)`")
    grid = getattr(module, "GRID", {})
    blocks = [grid] if isinstance(grid, dict) else list(grid)
    known = {f.name for f in fields(TrainConfig)} | {"fold"}
    for block in blocks:
        if not isinstance(block, dict):
            raise KinretInputError(path, "GRID must be a dict of lists or a list of such dicts")
        for key, values in block.items():
            if key not in known:
                raise KinretInputError(path, f"GRID key {key!r} is not a config field")
            if not isinstance(values, (list, tuple)) or not values:
                raise KinretInputError(path, f"GRID[{key!r}] must be a non-empty list")
    return replace(cfg, name=path.stem if cfg.name == "default" else cfg.name), [dict(b) for b in blocks if b]


