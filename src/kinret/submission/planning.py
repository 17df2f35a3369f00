"""The dry run and the space check of `make_submission.py`: what the run still has to build (`workload`), its time
and disk space (`estimate`) against the free space of each disk (`disk`); and what each stage records when it ran,
for the next estimate."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from kinret.data import DEFAULT_ROOT
from kinret.ensemble.discovery import discover_groups, filter_groups, fold_plan
from kinret.ensemble.run import pending_embeddings, plan
from kinret.features.sources import BackboneSource
from kinret.models.config import TrainConfig
from kinret.scoring.protocols import SplitData
from kinret.scoring.variants import Group
from kinret.submission.disk import space_lines, tree_bytes
from kinret.submission.estimate import Estimate, estimate_lines, estimates, read_record, record
from kinret.submission.options import Options
from kinret.submission.workload import (
    experiment_of,
    feature_key,
    feature_work,
    pending_feature_images,
    run_kind,
    run_units,
    score_work,
    synthetic_work,
    train_work,
)
from kinret.train.experiments import Run, experiment_runs, scoped_overrides

log = logging.getLogger("kinret.submission")


def frozen_images(groups: Sequence[Group], splits: Mapping[str, SplitData], scores_dir: Path) -> tuple[list, int]:
    """(source, image set) pairs whose frozen-backbone features a score matrix still needs, and their image count
    (the out-of-fold sets are rows of the training set: counted, and computed, once)."""
    frozen = [g for g in groups if isinstance(g.sources.get(None), BackboneSource)]  # untrained runs have no key
    todo = pending_embeddings(frozen, dict(splits), scores_dir)
    return todo, int(sum(n for _, n in pending_feature_images(todo).values()))


def _without_data(opts: Options) -> tuple[list[Run], list[Group], int]:
    """The runs, the groups of variants and the fold count of a run whose synthetic data is not made yet."""
    settings = opts.settings
    scoped = scoped_overrides(settings.experiments, settings.overrides)
    runs = [r for exp in settings.experiments
            for r in experiment_runs(exp, opts.root, opts.dirs.runs, scoped[exp])[1]]
    groups = discover_groups(runs, opts.dirs.runs / "_cache", opts.dirs.ensemble / "external", settings.raw_pixels,
                             settings.top_n, settings.fc_all)
    n_folds = fold_plan(runs)[0] or min(TrainConfig.n_folds, opts.synth.n_train)
    return runs, filter_groups(groups, settings.variants), n_folds


def work_of(opts: Options, groups: Sequence[Group] | None = None, splits: Mapping[str, SplitData] | None = None,
            runs: Sequence[Run] = (), found: Sequence[tuple[str, str]] = ()) -> list:
    """What the run still has to build (`found`: the runs' states); with no `splits`, the whole run on synthetic data
    not made yet, from its expected size."""
    known = read_record(opts.dirs.record) | read_record(None)
    if splits is None:
        runs, groups, n_folds = _without_data(opts)
        return synthetic_work(opts.synth, runs, groups, n_folds, known)
    scores_dir = opts.dirs.ensemble / "scores"
    todo = [r for r, (state, _) in zip(runs, found, strict=True) if state != "finished"]
    n_train = next((len(sd.images.parent.paths) for sd in splits.values() if sd.images.parent is not None), 0)
    return [*feature_work(pending_feature_images(frozen_images(groups, splits, scores_dir)[0])),
            *train_work(todo, n_train, known), *score_work(groups, splits, scores_dir, {r.cfg.name for r in todo})]


def space_check(opts: Options, found: Sequence[Estimate]) -> tuple[list[str], bool]:
    """The disk space the estimated work needs against what is free, one line per disk, and whether one is short."""
    dirs = opts.dirs
    folders = {"data": DEFAULT_ROOT.parent, "features": dirs.runs, "train": dirs.runs, "score": dirs.ensemble,
               "embed": dirs.runs, "submit": dirs.out}
    need: dict[Path, float] = {}
    for e in found:
        folder = folders[e.work.stage]
        need[folder] = need.get(folder, 0.0) + e.nbytes
    guesses = [e.work.label for e in found if e.basis.startswith(("a guess", "not measured"))]
    notes = [f"{', '.join(guesses)}: a guess until measured"] if guesses else []
    return space_lines(need, notes)


def warn_short(opts: Options, work: Sequence) -> None:
    """A warning at the start of a run when a disk has less free space than the work should write."""
    lines, short = space_check(opts, estimates(opts.dirs.record, work))
    if short:
        log.warning("%s", "; ".join(line for line in lines if "not enough" in line))


def dry_run(opts: Options, groups: Sequence[Group] | None = None, splits: Mapping[str, SplitData] | None = None,
            runs: Sequence[Run] = (), found: Sequence[tuple[str, str]] = ()) -> None:
    """What a run would build, each stage's estimated time and disk space, and the free space: printed; nothing is
    written. Without `splits`, the synthetic data is not made yet: the whole run from its expected size."""
    if splits is not None:
        todo = [(r, state) for r, (state, _) in zip(runs, found, strict=True) if state != "finished"]
        print("\n".join(plan(list(groups), dict(splits), opts.dirs.ensemble / "scores", todo)))
    found_estimates = estimates(opts.dirs.record, work_of(opts, groups, splits, runs, found))
    lines, short = space_check(opts, found_estimates)
    print("\n".join(estimate_lines(found_estimates) + lines))
    if short:
        log.warning("%s", "; ".join(line for line in lines if "not enough" in line))


def record_features(record_dir: Path, todo: Sequence[tuple], seconds: Mapping[int, float], nbytes: float) -> None:
    """Record each frozen network's pass of the features stage: its image views, its seconds, its share of the
    bytes the stage wrote (by views)."""
    work = pending_feature_images(todo)
    views = {i: (2 if src.cfg.flip_views else 1) * n for i, (src, n) in work.items()}
    total = sum(views.values()) or 1.0
    for i, (source, _) in work.items():
        record(record_dir, feature_key(source), views[i], seconds.get(i, 0.0), nbytes * views[i] / total,
               network=source.name, prefix=max((c.units for c in source.cuts), default=0))


def record_training(record_dir: Path, todo: Sequence[Run], n_train: float, seconds: float) -> None:
    """Record an experiment's training stage: its units of work (`run_units`), seconds, runs and their folders'
    bytes, and what kind of run they were (network, mode, prefix cut)."""
    if not todo:
        return
    units = sum(run_units(r.cfg, n_train) for r in todo)
    nbytes = sum(tree_bytes(r.run_dir) for r in todo)
    record(record_dir, f"train:{experiment_of(todo[0])}", units, seconds, nbytes, runs=len(todo),
           **run_kind(todo[0].cfg))
