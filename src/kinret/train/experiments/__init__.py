"""Experiments: one small python file per experiment in this folder, and the loader.

An experiment file (``src/kinret/train/experiments/<name>.py`` or any ``path/to/file.py``) defines
``cfg = replace(TrainConfig(), ...)`` and, for the grid runner, optionally ``GRID = {"field": [values], ...}`` (the
product of the lists) or a list of such dicts (the union of their products).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import NamedTuple

from kinret.errors import KinretInputError

from ...models.config import TrainConfig, apply_overrides

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


class Run(NamedTuple):
    """One run of an experiment: its config, its fold, and the grid point's overrides (empty without a GRID)."""

    cfg: TrainConfig
    fold: int
    overrides: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir(self.fold)


def _text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def expand(cfg: TrainConfig, grid: list[dict[str, list]]) -> list[Run]:
    """The run of every grid point and fold, in a stable order; a point listed twice runs once."""
    jobs, seen = [], set()
    for block in grid or [{}]:
        folds = list(block.get("fold", range(cfg.n_folds)))
        keys = [k for k in block if k != "fold"]
        for values in itertools.product(*(block[k] for k in keys)):
            variant = "-".join(_text(v).replace(",", "x").replace("/", "_") for v in values)
            # no GRID: the experiment's single run is runs/{experiment}/fold{k}, as `kinret.train -C` writes it
            sets = ([f"name={cfg.name}/{variant}"] if variant else []) + [f"{k}={_text(v)}"
                                                                        for k, v in zip(keys, values, strict=True)]
            vcfg = apply_overrides(cfg, sets)
            for fold in folds:
                if (vcfg.name, fold) not in seen:
                    seen.add((vcfg.name, fold))
                    jobs.append(Run(vcfg, fold, tuple(sets)))
    return jobs


def scoped_overrides(experiments: Sequence[str], overrides: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """experiment -> its ``key=value`` overrides out of `overrides`, each given as ``key=value`` (every experiment)
    or ``EXPERIMENT:key=value`` (the experiment of that name or file stem only); a scope naming none of
    `experiments` raises, and so do data_root and out_root, which the commands' own options set."""
    stems = {name: experiment_path(name).stem for name in experiments}
    out: dict[str, list[str]] = {name: [] for name in experiments}
    for item in overrides:
        target, sep, rest = item.partition("=")
        scope, colon, key = target.rpartition(":")
        if not sep or not key.strip():
            raise KinretInputError(None, f"--set expects [EXPERIMENT:]key=value, got {item!r}")
        if key.strip() in ("data_root", "out_root"):
            raise KinretInputError(None, f"--set {key.strip()}: give the data folder with --data-root and the runs "
                                         "folder with --runs")
        hit = [n for n in experiments if not colon or scope.strip() in (n, stems[n])]
        if not hit:
            raise KinretInputError(None, f"--set {item}: {scope!r} is none of the experiments "
                                         f"({', '.join(experiments) or 'none given'})")
        for name in hit:
            out[name].append(f"{key.strip()}={rest}")
    return {name: tuple(v) for name, v in out.items()}


def experiment_runs(name: str, data_root: str | Path, out_root: str | Path, overrides: Sequence[str] = ()
                    ) -> tuple[TrainConfig, list[Run]]:
    """The experiment's config, with `overrides` (``key=value``) applied, and every run of its grid, on this data
    folder and into this runs folder."""
    cfg, grid = load_experiment(name)
    cfg = replace(apply_overrides(cfg, overrides), data_root=str(data_root), out_root=str(out_root))
    return cfg, expand(cfg, grid)
