"""`make_submission.py`: from a data folder (or the embedded synthetic default) to a validated Codalab zip, building
only what is missing: train -> embed -> score -> select/blend -> submission.

Data folder layout (`--data-root DIR`):
    DIR/train/F0001/MID1/*.jpg        labelled FIW folders (optional F0001/mid.csv): training and out-of-fold scores
    DIR/test/probes/probe_subjects/s{i}/*.jpg, DIR/test/gallery/gallery_faces/face{j}.jpg,
    DIR/test/probe.txt, DIR/test/gallery.txt       the Codalab test layout and its index lists
    DIR/val/                          optional: labelled FIW folders, with or without probe_list.csv/gallery_list.csv
    DIR/test_truth/probe_list.csv, gallery_list.csv   optional test labels: if present, the run prints local scores

Stages: every run of the experiments' grids not yet trained is trained (`runs/{experiment}/{variant}/fold{k}/`);
every variant (raw pixels, each pooling of a frozen backbone, each trained model's cosine, FC and re-ranked FC
similarities, external variants in ensemble/external/) is scored on the out-of-fold protocols, val and test, from
cached embeddings; the best variant or a blend is chosen out of fold; the submission is named after the choice.
A rerun with everything cached takes seconds; `--dry-run` lists what would be built.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kinret.cli import parser, run_command
from kinret.data import DEFAULT_ROOT
from kinret.data.layout import DataLayout
from kinret.data.synth import SynthConfig, ensure_default, made_from
from kinret.ensemble.cli import add_ensemble_args, glance, settings_from_args
from kinret.ensemble.run import EnsembleResult, choice_splits, pending_embeddings, plan, prepare, run_ensemble
from kinret.ensemble.selection import POOL
from kinret.ensemble.settings import EnsembleSettings
from kinret.errors import KinretInputError
from kinret.features.sources import BackboneSource
from kinret.io import check_writable, remove_stale_temporaries, write_text_atomic
from kinret.log import minutes, setup_logging, stage, stage_times
from kinret.metrics import chance_level
from kinret.scoring.protocols import SplitData
from kinret.scoring.variants import Group, missing_scores
from kinret.submission.final_fit import final_fit
from kinret.submission.housekeeping import (
    Work,
    clean_cache,
    disk_line,
    disk_need,
    estimate_lines,
    expected_images,
    feature_units,
    feature_work,
    human_bytes,
    network_key,
    record_rate,
    record_size,
    record_train_rate,
    space_lines,
    train_work,
    training_images,
    tree_bytes,
)
from kinret.submission.predictions import SubmissionResult, submit
from kinret.submission.record import run_record, set_aside_old_zips, write_run_record
from kinret.submission.report import write_report
from kinret.train.experiments import Run, experiment_runs, scoped_overrides
from kinret.train.grid import plan_text, train_experiment
from kinret.train.runs import unfinished

log = logging.getLogger("kinret.submission")


def build_parser() -> argparse.ArgumentParser:
    p = parser("make_submission.py", __doc__)
    p.add_argument("--data-root", type=Path, default=None,
                   help="real data folder laid out as above; default: the synthetic dataset in "
                        f"{DEFAULT_ROOT} (generated on first use, reused afterwards)")
    p.add_argument("--out", type=Path, default=Path("submissions"),
                   help="where predictions.csv, the zip and the variant table go")
    p.add_argument("--zip-name", default=None, help="name of the zip in --out (default: named after the choice)")
    add_ensemble_args(p)
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel training processes for grids (default: head-only runs 2 at a time, end-to-end "
                        "runs one at a time with every core)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the stages that would run with their estimated time and disk space; writes nothing")
    p.add_argument("--final-fit", action="store_true",
                   help="after the out-of-fold choice, train the chosen trained variants again on every labelled "
                        "family (train and val) and submit their test scores (the choice itself is unchanged)")
    p.add_argument("--regenerate", action="store_true", help="rebuild the synthetic dataset even if cached")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset (without --data-root)")
    p.add_argument("--clean-cache", action="store_true",
                   help="remove the feature, embedding and score caches under --runs and --ensemble-dir (checkpoints "
                        "stay; the next run rebuilds the caches from them), print the space freed, and exit")
    return p


def train_missing(settings: EnsembleSettings, args: argparse.Namespace, n_train: int = 0) -> None:
    """Train every unfinished run of the settings' experiments, an experiment at a time (`n_train`: the training
    set's size, for the throughput recorded)."""
    scoped = scoped_overrides(settings.experiments, settings.overrides)
    for exp in settings.experiments:
        cfg, runs = experiment_runs(exp, settings.data_root, args.runs, scoped[exp])
        todo = unfinished(runs)
        if not todo:
            continue
        with stage(f"train {Path(exp).stem}", f"{len(todo)} of {len(runs)} runs to train, "
                                               f"{plan_text([r for r, _ in todo], args.jobs)}"):
            t0 = time.perf_counter()
            failed = train_experiment(cfg, runs, jobs=args.jobs, quiet=args.quiet, verbose=args.verbose)
            if 2 in failed.values():
                raise KinretInputError(None, f"training the {exp} grid stopped on bad input; see the log above")
            if failed:
                raise RuntimeError(f"training the {exp} grid failed ({len(failed)} run(s)); see the log above")
            record_train_rate(args.runs, todo, n_train, time.perf_counter() - t0)
            record_size(args.runs, "train", len(todo), sum(tree_bytes(r.run_dir) for r, _ in todo))


@dataclass(frozen=True)
class Outcome:
    """What a run built: the data folder used, the ensemble's scores and choice, the submission, the report files."""

    root: Path
    result: EnsembleResult
    submission: SubmissionResult
    report: list[Path]


def prepare_outputs(args: argparse.Namespace, started: float) -> None:
    """Every folder the run writes, checked writable before any work; temporaries of a killed run removed."""
    folders = [args.out, args.out / "report", args.ensemble_dir, args.ensemble_dir / "scores", args.runs]
    if args.data_root is None:
        folders.append(DEFAULT_ROOT.parent)
    for folder in folders:
        check_writable(folder)
    remove_stale_temporaries([args.out, args.ensemble_dir, args.runs], before=started)


def frozen_images(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path) -> tuple[list, int]:
    """(source, image set) pairs whose frozen-backbone features a score matrix still needs, and their image count
    (the out-of-fold sets are rows of the training set: counted, and computed, once)."""
    frozen = [g for g in groups if isinstance(g.sources.get(None), BackboneSource)]  # untrained runs have no key
    todo = pending_embeddings(frozen, splits, scores_dir)
    sizes = {(id(s), (im.parent or im).label): len((im.parent or im).paths) for s, im in todo}
    return todo, sum(sizes.values())


def pending_work(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path, todo: list
                 ) -> tuple[dict[str, float], float]:
    """The units each stage still has to build (features: images, train: runs, score: matrices) and the bytes of
    those matrices kept (probes x gallery x 4 each); `todo` are the unfinished runs, whose variants are all to
    score."""
    untrained = {r.cfg.name for r, _ in todo}
    matrices, score_bytes, chooser = 0, 0.0, choice_splits(splits)
    for sd in splits.values():
        n = sum(len(g.variants) if g.name in untrained else len(missing_scores(g, sd, scores_dir)) for g in groups)
        matrices += n  # kept: every matrix of a split the choice is made on, elsewhere a blend's at most
        score_bytes += 4.0 * (n if sd.name in chooser else min(n, POOL)) * len(sd.split.probes) * len(sd.split.gallery)
    work = {"features": frozen_images(groups, splits, scores_dir)[1], "train": len(todo), "score": matrices}
    return work, score_bytes


def check_space(args: argparse.Namespace, work: dict[str, float], score_bytes: float = 0.0) -> list[str]:
    """The disk space the work needs against what is free, one line per disk; a warning when a disk is short."""
    need = disk_need(args.runs, work, score_bytes)
    data_dir = DEFAULT_ROOT.parent if args.data_root is None else args.runs
    folders = {"data": data_dir, "features": args.runs, "train": args.runs, "score": args.ensemble_dir}
    by_folder: dict[Path, float] = {}
    for name, nbytes in need.items():
        by_folder[folders[name]] = by_folder.get(folders[name], 0.0) + nbytes
    lines, short = space_lines(by_folder)
    if short:
        log.warning("%s", "; ".join(line for line in lines if "not enough" in line))
    return lines


def dry_run(args: argparse.Namespace, groups: list[Group], splits: dict[str, SplitData], runs: list[Run]) -> None:
    scores_dir = args.ensemble_dir / "scores"
    todo = unfinished(runs)
    print("\n".join(plan(groups, splits, scores_dir, todo)))
    work, score_bytes = pending_work(groups, splits, scores_dir, todo)
    timed = [*feature_work(frozen_images(groups, splits, scores_dir)[0]), *train_work(todo, training_images(splits)),
             Work("score", work["score"])]
    print("\n".join(estimate_lines(args.runs, timed) + check_space(args, work, score_bytes)))


def warn_strays(layout: DataLayout) -> None:
    """One warning for the image files of the data folder that the run does not read, with an example."""
    strays = layout.stray_images()
    if strays:
        path, why = strays[0]
        log.warning("%d image file(s) under %s are not read, e.g. %s (%s); python -m kinret.data check %s lists "
                    "them all", len(strays), layout.root, path, why, layout.root)


def get_data(args: argparse.Namespace) -> Path | None:
    """The data folder: --data-root, or the synthetic default (generated on first use); on a dry run nothing is
    generated: None when it would have to be (after printing the estimate)."""
    if args.data_root is not None:
        print(f"data: {args.data_root}")
        return args.data_root
    root, config = DEFAULT_ROOT, SynthConfig(seed=args.data_seed)
    fresh = args.regenerate or not made_from(root, config)
    work = {"data": expected_images(config)} if fresh else {}
    if args.dry_run:
        if not fresh:
            print(f"data: synthetic families in {root} (seed {args.data_seed}), cached")
            return root
        print(f"data   generate the synthetic dataset in {root} (seed {args.data_seed})\n(then train, score, "
              "select and submit)")
        print("\n".join(estimate_lines(args.runs, work) + check_space(args, work)))
        return None
    with stage("data", f"synthetic families in {root} (seed {args.data_seed})"
               + (", generating" if fresh else ", cached") + "; pass --data-root for real FIW data"):
        t0 = time.perf_counter()
        if fresh:
            check_space(args, work)
        root = ensure_default(args.data_seed, args.regenerate)
        if fresh:
            record_rate(args.runs, "data", work["data"], time.perf_counter() - t0)
            record_size(args.runs, "data", work["data"], tree_bytes(root))
    return root


def compute_features(groups: list[Group], splits: dict[str, SplitData], args: argparse.Namespace) -> None:
    """The frozen backbones' features every missing score matrix needs, as a stage of its own."""
    todo, n_images = frozen_images(groups, splits, args.ensemble_dir / "scores")
    if not todo:
        return
    with stage("features", f"{n_images:,} images through {len({id(s) for s, _ in todo})} frozen backbone(s)"):
        before, seconds = tree_bytes(args.runs / "_cache"), {}
        for source, images in todo:
            t0 = time.perf_counter()
            source.embeddings(images)
            seconds[id(source)] = seconds.get(id(source), 0.0) + time.perf_counter() - t0
        for i, (source, units) in feature_units(todo).items():
            key = network_key(source.cfg, source.features.backbone)
            record_rate(args.runs, f"features:{key}", units, seconds[i])
        record_size(args.runs, "features", n_images, tree_bytes(args.runs / "_cache") - before)


def run(args: argparse.Namespace) -> Outcome | None:
    """The stages, each announced with its size and timed; None after a dry run, which writes nothing (not even
    the bytecode of an experiment file). Bad input raises."""
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = dont_write or args.dry_run
    try:
        return _run(args)
    finally:
        sys.dont_write_bytecode = dont_write


def _run(args: argparse.Namespace) -> Outcome | None:
    t0 = time.perf_counter()
    stage_times(reset=True)
    if not args.dry_run:
        prepare_outputs(args, time.time())
    root = get_data(args)
    if root is None:
        return None
    settings = settings_from_args(args, root, None if args.data_root is not None else args.data_seed)
    layout = DataLayout.of(root)
    runs, splits, groups = prepare(settings, layout, args.runs, args.ensemble_dir)
    for sd in splits.values():
        print(sd.split.describe() + ("" if sd.labels is not None else " (unlabelled)"), flush=True)
    warn_strays(layout)
    if args.dry_run:
        dry_run(args, groups, splits, runs)
        return None
    scores_dir = args.ensemble_dir / "scores"
    check_space(args, *pending_work(groups, splits, scores_dir, unfinished(runs)))
    compute_features(groups, splits, args)
    train_missing(settings, args, training_images(splits))
    n_matrices = sum(len(missing_scores(g, sd, scores_dir)) for g in groups for sd in splits.values())
    with stage("score and choose", f"{sum(len(g.variants) for g in groups)} variants x {len(splits)} splits, "
                                   f"{n_matrices} score matrices to build"):
        t1 = time.perf_counter()
        result = run_ensemble(groups, splits, settings, scores_dir, args.ensemble_dir)
        record_rate(args.runs, "score", n_matrices, time.perf_counter() - t1)
    if args.final_fit:
        result = final_fit(result, groups, runs, args)
    with stage("submission and report"):
        sub, report = write_outputs(args, result, splits)
    seconds = time.perf_counter() - t0
    print_closing(args, root, result, sub, report, splits, seconds)
    data = {"root": str(root), "seed": None if args.data_root is not None else args.data_seed}
    sizes = {n: (len(sd.split.probes), len(sd.split.gallery)) for n, sd in splits.items()}
    write_run_record(args.out, run_record(getattr(args, "argv", []), data, sizes, result.selection.name,
                                          sub.zip_path, seconds, stage_times()))
    return Outcome(root, result, sub, report)


def write_outputs(args: argparse.Namespace, result: EnsembleResult, splits: dict[str, SplitData]
                  ) -> tuple[SubmissionResult, list[Path]]:
    sel, test = result.selection, splits["test"]
    sub = submit(result.chosen["test"], test.split, args.out, test.labels, args.zip_name or f"{sel.name}.zip")
    moved = set_aside_old_zips(args.out, sub.zip_path)
    if moved:
        print(f"moved the earlier zip(s) {', '.join(p.name for p in moved)} to {moved[0].parent}/: "
              f"{sub.zip_path.name} is the one to upload")
    write_text_atomic(args.out / "variants.md", result.table_md)
    write_text_atomic(args.out / "selection.json", sel.to_json(result.settings.to_dict()))
    return sub, write_report(result, args.out / "report")


def print_closing(args: argparse.Namespace, root: Path, result: EnsembleResult, sub: SubmissionResult,
                  report: list[Path], splits: dict[str, SplitData], seconds: float) -> None:
    """What a competitor reads at the end: the choice at a glance, the files, the local score, disk, timings."""
    print()
    print(glance(result, table_path=args.out / "variants.md"))
    refit = result.selection.final_fit.get("refit", {})
    if refit:
        print(f"final fit: the test scores of {', '.join(refit)} come from models trained on every labelled family "
              f"(train and val): {', '.join(sorted(set(refit.values())))}")
    print(f"\nwrote {sub.csv_path} and {sub.zip_path} ({result.selection.name}); report: "
          f"{', '.join(str(p) for p in report)}")
    test = splits["test"]
    if sub.scores:
        for ap, scores in sub.scores.items():
            print(f"\nlocal test score, {ap} AP:\n{scores.table()}")
        chance = chance_level(test.labels.probe_fids, test.labels.gallery_fids)
        print(f"(a random ranking expects standard mAP {chance['mAP']:.4f}, Rank@5 {chance['rank@5']:.4f}, "
              f"Average {chance['average']:.4f})")
    else:
        print(f"no test labels in {root / 'test_truth'}: local test score skipped")
    print(disk_line(args.runs, args.ensemble_dir))
    times = ", ".join(f"{name} {minutes(s)}" for name, s in stage_times())
    print(f"\ndone in {minutes(seconds)}" + (f" ({times})" if times else ""))


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in run.json
    return args


def make(argv: Sequence[str] | None = None) -> Outcome | None:
    """`make_submission.py` as a function, for notebooks: the same options, stages and printout; returns what was
    built (None after --dry-run); bad input raises instead of exiting."""
    args = parse(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)

    def body() -> int:
        if args.clean_cache:
            before = disk_line(args.runs, args.ensemble_dir)
            print(f"freed {human_bytes(clean_cache(args.runs, args.ensemble_dir))} ({before})")
            return 0
        run(args)
        return 0

    return run_command(body, args)
