"""Experiments: one small python file per experiment in this folder, and the loader.

An experiment file (``src/kinret/train/experiments/<name>.py`` or any ``path/to/file.py``) defines
``cfg = replace(TrainConfig(), ...)`` and, for the grid runner, optionally ``GRID = {"field": [values], ...}`` (the
product of the lists) or a list of such dicts (the union of their products).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import NamedTuple

from kinret.data.workspace import work_dirs
from kinret.errors import KinretInputError

from ...models.config import TrainConfig, apply_overrides

EXPERIMENTS_DIR = Path(__file__).resolve().parent
log = logging.getLogger("kinret.train")


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
            # no GRID: the experiment's single run is {runs}/{experiment}/fold{k}, as `kinret.train -C` writes it
            sets = ([f"name={cfg.name}/{variant}"] if variant else []) + [f"{k}={_text(v)}"
                                                                        for k, v in zip(keys, values, strict=True)]
            vcfg = apply_overrides(cfg, sets)
            for fold in folds:
                if (vcfg.name, fold) not in seen:
                    seen.add((vcfg.name, fold))
                    jobs.append(Run(vcfg, fold, tuple(sets)))
    return jobs


def _is_graph(weights: str) -> bool:
    return weights.strip().lower().endswith(".onnx")


def backbones(name: str) -> set[str]:
    """Every backbone an experiment trains: its config's and its GRID's."""
    cfg, grid = load_experiment(name)
    return {cfg.backbone} | {b for block in grid for b in block.get("backbone", [])}


def check_weights(cfg: TrainConfig) -> None:
    """Refuse a weights file the backbone cannot read, before anything opens it: an ONNX graph is read by
    ``backbone=onnx`` only (another backbone's loader would unpickle it), and that backbone needs one."""
    if cfg.weights and _is_graph(cfg.weights) != (cfg.backbone == "onnx"):
        what = "an ONNX graph, which only backbone=onnx reads" if _is_graph(cfg.weights) else "not an ONNX graph"
        raise KinretInputError(None, f"{cfg.name}: weights={cfg.weights} is {what}; backbone={cfg.backbone} takes "
                                     + ("an .onnx file" if cfg.backbone == "onnx" else "a state dict or checkpoint"))
    if cfg.backbone == "onnx" and not cfg.weights:
        stem = cfg.name.split("/")[0]
        raise KinretInputError(None, f"{stem}: backbone=onnx needs the network's graph: --set weights=FILE.onnx "
                                     f"(--set {stem}:weights=FILE.onnx beside other experiments)")


def _weights_targets(item: str, value: str, experiments: Sequence[str], stems: dict[str, str]) -> list[str]:
    """The experiments an unscoped ``weights=FILE`` reaches: those whose backbone reads that kind of file (an ONNX
    graph: backbone=onnx; any other file: the other backbones). None of them: one line saying what would."""
    graph = _is_graph(value)
    kinds = {name: backbones(name) for name in experiments}
    hit = [n for n in experiments if ("onnx" in kinds[n]) == graph]
    names = ", ".join(f"{stems[n]} (backbone={'/'.join(sorted(kinds[n]))})" for n in experiments)
    if not hit and experiments and graph:
        raise KinretInputError(None, f"--set {item}: an ONNX graph, which only backbone=onnx reads, and none of "
                                     f"{names} has it; to add the network, run the kit's experiment for one beside "
                                     f"them: --experiments {' '.join(experiments)} arcface_onnx_heads --set "
                                     f"arcface_onnx_heads:{item}")
    if not hit and experiments:
        raise KinretInputError(None, f"--set {item}: not an ONNX graph, and every experiment given reads only one "
                                     f"({names}): give it to an experiment whose backbone reads it, as --set "
                                     f"EXPERIMENT:{item}")
    if len(hit) < len(experiments):
        log.warning("--set %s goes to %s only: the backbones of %s do not read %s (--set EXPERIMENT:%s names one)",
                    item, ", ".join(stems[n] for n in hit), ", ".join(stems[n] for n in experiments if n not in hit),
                    "an ONNX graph" if graph else "this kind of file", item)
    return hit


def scoped_overrides(experiments: Sequence[str], overrides: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """experiment -> its ``key=value`` overrides out of `overrides`, each given as ``key=value`` (every experiment)
    or ``EXPERIMENT:key=value`` (the experiment of that name or file stem only); a scope naming none of
    `experiments` raises, and so do data_root and out_root, which the commands' own options set. An unscoped
    ``weights=FILE`` reaches only the experiments whose backbone reads that kind of file (`_weights_targets`)."""
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
        if not colon and key.strip() == "weights":
            hit = _weights_targets(item, rest, experiments, stems)
        for name in hit:
            out[name].append(f"{key.strip()}={rest}")
    return {name: tuple(v) for name, v in out.items()}


def own_runs_folder(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`cfg` with its runs in its data set's runs folder (``runs/{data set}/``, `kinret.data.workspace`), unless the
    ``--set`` `overrides` or the experiment file name one (``out_root=DIR``: DIR itself): what ``kinret.train`` and
    ``kinret.grid`` train into, the folder ``make_submission.py`` and ``kinret.ensemble`` look in."""
    if cfg.out_root != TrainConfig.out_root or any(item.partition("=")[0].strip() == "out_root" for item in overrides):
        return cfg
    return replace(cfg, out_root=str(work_dirs(cfg.data_root).runs))


def experiment_runs(name: str, data_root: str | Path, out_root: str | Path, overrides: Sequence[str] = ()
                    ) -> tuple[TrainConfig, list[Run]]:
    """The experiment's config, with `overrides` (``key=value``) applied, and every run of its grid, on this data
    folder and into this runs folder."""
    cfg, grid = load_experiment(name)
    cfg = replace(apply_overrides(cfg, overrides), data_root=str(data_root), out_root=str(out_root))
    runs = expand(cfg, grid)
    for run_cfg in dict.fromkeys(r.cfg for r in runs):
        check_weights(run_cfg)
    return cfg, runs
