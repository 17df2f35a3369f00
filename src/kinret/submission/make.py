"""`make_submission.py`: from a data folder (or the embedded synthetic default) to a validated Codalab zip, building
only what is missing: train -> embed -> score -> select/blend -> submission.

Data folder layout (`--data-root DIR`):
    DIR/train/F0001/MID1/*.jpg        labelled FIW folders (optional F0001/mid.csv): training and out-of-fold scores
    DIR/test/probes/probe_subjects/s{i}/*.jpg, DIR/test/gallery/gallery_faces/face{j}.jpg,
    DIR/test/probe.txt, DIR/test/gallery.txt       the Codalab test layout and its index lists
    DIR/val/                          optional: labelled FIW folders, with or without probe_list.csv/gallery_list.csv
    DIR/test_truth/probe_list.csv, gallery_list.csv   optional test labels: if present, the run prints local scores

Stages: every run of the experiments' grids not yet trained is trained (`runs/{data set}/{experiment}/{variant}/
fold{k}/`); every variant (raw pixels, each pooling of a frozen backbone, each trained model's cosine, FC and re-ranked
FC similarities, external variants in ensemble/{data set}/external/) is scored on the out-of-fold protocols, val and
test, from cached embeddings; the best variant or a blend is chosen out of fold; the submission is named after the
choice. Each data folder has its own folders under runs/, ensemble/ and submissions/ ({data set}: `synthetic` for the
default, else the folder's name and a hash of its path), so another data folder in the same place overwrites nothing;
--runs, --ensemble-dir and --out name folders to use as they are. A rerun with everything cached takes seconds;
`--dry-run` lists what would be built, with the time and disk space each stage should take.
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
from kinret.data.synth import ensure_default, made_from
from kinret.data.workspace import ENSEMBLE, RUNS
from kinret.ensemble.cli import add_ensemble_args, glance, networks_of
from kinret.ensemble.run import EnsembleResult, prepare, run_ensemble
from kinret.errors import KinretInputError
from kinret.io import check_writable, human_bytes, remove_stale_temporaries, write_text_atomic
from kinret.log import minutes, setup_logging, stage, stage_times
from kinret.metrics import chance_level
from kinret.scoring.protocols import SplitData
from kinret.scoring.variants import missing_scores
from kinret.submission.disk import clean_cache, disk_line, tree_bytes
from kinret.submission.estimate import record
from kinret.submission.final_fit import final_fit
from kinret.submission.options import Options, options_from_args
from kinret.submission.planning import (
    dry_run,
    frozen_images,
    record_features,
    record_training,
    warn_short,
    work_of,
)
from kinret.submission.predictions import SubmissionResult, submit
from kinret.submission.record import run_record, set_aside_old_zips, write_run_record
from kinret.submission.report import write_report
from kinret.submission.workload import embedding_units
from kinret.train.experiments import experiment_runs, scoped_overrides
from kinret.train.grid import plan_text, train_experiment
from kinret.train.runs import run_states, stale_note

log = logging.getLogger("kinret.submission")
SYNTHETIC_NOTE = ("this submission is for the kit's synthetic data (a try-out, not one to upload): pass --data-root "
                  "with your FIW folders and the Codalab test split for a real one")


def build_parser() -> argparse.ArgumentParser:
    p = parser("make_submission.py", __doc__)
    p.add_argument("--data-root", type=Path, default=None,
                   help="real data folder laid out as above; default: the synthetic dataset in "
                        f"{DEFAULT_ROOT} (generated on first use, reused afterwards)")
    p.add_argument("--out", type=Path, default=None,
                   help="where predictions.csv, the zip, the report and the variant table go (default: "
                        "submissions/{data set}/; a folder given here is used as it is)")
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
                   help="remove the feature, embedding and score caches of the data set (--data-root; without it and "
                        "without --runs/--ensemble-dir, of every data set under runs/ and ensemble/), print the space "
                        "freed, and exit; checkpoints stay: the next run rebuilds the caches from them")
    return p


def train_missing(opts: Options, n_train: int) -> None:
    """Train every unfinished run of the experiments, an experiment at a time, and record what each one took
    (`n_train`: the training set's size)."""
    settings = opts.settings
    scoped = scoped_overrides(settings.experiments, settings.overrides)
    for exp in settings.experiments:
        cfg, runs = experiment_runs(exp, opts.root, opts.dirs.runs, scoped[exp])
        todo = [r for r, (state, _) in zip(runs, run_states(runs), strict=True) if state != "finished"]
        if not todo:
            continue
        with stage(f"train {Path(exp).stem}", f"{len(todo)} of {len(runs)} runs to train, "
                                               f"{plan_text(todo, opts.jobs)}"):
            t0 = time.perf_counter()
            failed = train_experiment(cfg, runs, jobs=opts.jobs, quiet=opts.quiet, verbose=opts.verbose,
                                      announce_stale=False)
            if 2 in failed.values():
                raise KinretInputError(None, f"training the {exp} grid stopped on bad input; see the log above")
            if failed:
                raise RuntimeError(f"training the {exp} grid failed ({len(failed)} run(s)); see the log above")
            record_training(opts.dirs.record, todo, n_train, time.perf_counter() - t0)


@dataclass(frozen=True)
class Outcome:
    """What a run built: the data folder used, the ensemble's scores and choice, the submission, the report files."""

    root: Path
    result: EnsembleResult
    submission: SubmissionResult
    report: list[Path]


def prepare_outputs(opts: Options, started: float) -> None:
    """Every folder the run writes, checked writable before any work; temporaries of a killed run removed."""
    dirs = opts.dirs
    folders = [dirs.out, dirs.out / "report", dirs.ensemble, dirs.ensemble / "scores", dirs.runs]
    if opts.synthetic:
        folders.append(DEFAULT_ROOT.parent)
    for folder in folders:
        check_writable(folder)
    remove_stale_temporaries([dirs.out, dirs.ensemble, dirs.runs], before=started)


def warn_strays(layout: DataLayout) -> None:
    """One warning for the image files of the data folder that the run does not read, with an example."""
    strays = layout.stray_images()
    if strays:
        path, why = strays[0]
        log.warning("%d image file(s) under %s are not read, e.g. %s (%s); python -m kinret.data check %s lists "
                    "them all", len(strays), layout.root, path, why, layout.root)


def get_data(opts: Options) -> Path | None:
    """The data folder: --data-root, or the synthetic default (generated on first use); on a dry run nothing is
    generated: None when it would have to be (the estimate covers the whole run from its expected size)."""
    if not opts.synthetic:
        print(f"data: {opts.data_root}")
        return opts.data_root
    seed, synth = opts.synth.seed, opts.synth
    fresh = opts.regenerate or not made_from(DEFAULT_ROOT, synth)
    if opts.dry_run:
        if not fresh:
            print(f"data: synthetic families in {DEFAULT_ROOT} (seed {seed}), cached")
            return DEFAULT_ROOT
        print(f"data   generate the synthetic dataset in {DEFAULT_ROOT} (seed {seed})\n(then train, score, select "
              "and submit: estimated from its expected size)")
        return None
    with stage("data", f"synthetic families in {DEFAULT_ROOT} (seed {seed})"
               + (", generating" if fresh else ", cached") + "; pass --data-root for real FIW data"):
        t0 = time.perf_counter()
        if fresh:
            warn_short(opts, work_of(opts))
        root = ensure_default(seed, opts.regenerate)
        if fresh:
            images = sum(1 for p in root.rglob("*.jpg"))
            record(opts.dirs.record, "data", images, time.perf_counter() - t0, tree_bytes(root))
    return root


def compute_features(opts: Options, groups: list, splits: dict[str, SplitData]) -> None:
    """The frozen backbones' features every missing score matrix needs, as a stage of its own."""
    todo, n_images = frozen_images(groups, splits, opts.dirs.ensemble / "scores")
    if not todo:
        return
    with stage("features", f"{n_images:,} images through {len({id(s) for s, _ in todo})} frozen backbone(s)"):
        before, seconds = tree_bytes(opts.dirs.runs / "_cache"), {}
        for source, images in todo:
            t0 = time.perf_counter()
            source.embeddings(images)
            seconds[id(source)] = seconds.get(id(source), 0.0) + time.perf_counter() - t0
        record_features(opts.dirs.record, todo, seconds, tree_bytes(opts.dirs.runs / "_cache") - before)


def run(opts: Options) -> Outcome | None:
    """The stages, each announced with its size and timed; None after a dry run, which writes nothing (not even
    the bytecode of an experiment file). Bad input raises."""
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = dont_write or opts.dry_run
    try:
        return _run(opts)
    finally:
        sys.dont_write_bytecode = dont_write


def _run(opts: Options) -> Outcome | None:
    t0 = time.perf_counter()
    stage_times(reset=True)
    if not opts.dry_run:
        prepare_outputs(opts, time.time())
    root = get_data(opts)
    if root is None:
        dry_run(opts)
        return None
    layout = DataLayout.of(root)
    runs, splits, groups = prepare(opts.settings, layout, opts.dirs.runs, opts.dirs.ensemble)
    for sd in splits.values():
        print(sd.split.describe() + ("" if sd.labels is not None else " (unlabelled)"), flush=True)
    warn_strays(layout)
    found = run_states(runs)
    note = stale_note(runs, found, opts.dry_run)
    if note:
        log.warning("%s", note)  # once for the whole run, whatever the experiments and folds
    if opts.dry_run:
        dry_run(opts, groups, splits, runs, found)
        return None
    warn_short(opts, work_of(opts, groups, splits, runs, found))
    compute_features(opts, groups, splits)
    train_missing(opts, training_images(splits))
    result, scored = score_and_choose(opts, groups, splits)
    if opts.final_fit:
        result = final_fit(result, groups, runs, opts)
    with stage("submission and report"):
        t1, before = time.perf_counter(), tree_bytes(opts.dirs.out)
        sub, report = write_outputs(opts, result, splits)
        test = splits["test"].split
        if scored:  # a new choice, written where a rerun only rewrites the same files
            record(opts.dirs.record, "submit", len(test.probes) * len(test.gallery), time.perf_counter() - t1,
                   tree_bytes(opts.dirs.out) - before)
    seconds = time.perf_counter() - t0
    print_closing(opts, root, result, sub, report, splits, seconds, networks_of(runs))
    data = {"root": str(root), "seed": None if not opts.synthetic else opts.synth.seed}
    sizes = {n: (len(sd.split.probes), len(sd.split.gallery)) for n, sd in splits.items()}
    write_run_record(opts.dirs.out, run_record(opts.argv, data, sizes, result.selection.name, sub.zip_path, seconds,
                                               stage_times()))
    return Outcome(root, result, sub, report)


def training_images(splits: dict[str, SplitData]) -> int:
    """The training set's size: the parent image set of the out-of-fold protocols (0 without one)."""
    return next((len(sd.images.parent.paths) for sd in splits.values() if sd.images.parent is not None), 0)


def score_and_choose(opts: Options, groups: list, splits: dict[str, SplitData]) -> tuple[EnsembleResult, bool]:
    """Score every variant's missing matrices, choose, and record what the stage did (the embeddings computed, the
    cells built, their time and bytes); returns the result and whether any matrix was built."""
    scores_dir, dirs = opts.dirs.ensemble / "scores", opts.dirs
    missing = [(len(missing_scores(g, sd, scores_dir)), sd) for g in groups for sd in splits.values()]
    cells = sum(n * len(sd.split.probes) * len(sd.split.gallery) for n, sd in missing)
    embedded = embedding_units(groups, splits, scores_dir)
    with stage("score and choose", f"{sum(len(g.variants) for g in groups)} variants x {len(splits)} splits, "
                                   f"{sum(n for n, _ in missing)} score matrices to build"):
        t1, before = time.perf_counter(), [tree_bytes(scores_dir), tree_bytes(dirs.runs) + tree_bytes(dirs.ensemble)]
        result = run_ensemble(groups, splits, opts.settings, scores_dir, dirs.ensemble)
        matrices = tree_bytes(scores_dir) - before[0]
        record(dirs.record, "embed", embedded, time.perf_counter() - t1,
               tree_bytes(dirs.runs) + tree_bytes(dirs.ensemble) - before[1] - matrices)
        record(dirs.record, "score", cells, 0.0, matrices, timed=False)
    return result, cells > 0


def write_outputs(opts: Options, result: EnsembleResult, splits: dict[str, SplitData]
                  ) -> tuple[SubmissionResult, list[Path]]:
    sel, test, out = result.selection, splits["test"], opts.dirs.out
    sub = submit(result.chosen["test"], test.split, out, test.labels, opts.zip_name or f"{sel.name}.zip")
    moved = set_aside_old_zips(out, sub.zip_path)
    if moved:
        print(f"moved the earlier zip(s) {', '.join(p.name for p in moved)} to {moved[0].parent}/: "
              f"{sub.zip_path.name} is the one to upload")
    write_text_atomic(out / "variants.md", result.table_md)
    write_text_atomic(out / "selection.json", sel.to_json(result.settings.to_dict()))
    return sub, write_report(result, out / "report")


def print_closing(opts: Options, root: Path, result: EnsembleResult, sub: SubmissionResult, report: list[Path],
                  splits: dict[str, SplitData], seconds: float, networks: dict) -> None:
    """What a competitor reads at the end: the choice at a glance, the files, the local score, disk, timings."""
    print()
    print(glance(result, table_path=opts.dirs.out / "variants.md", networks=networks))
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
    print(disk_line(opts.dirs.runs, opts.dirs.ensemble))
    times = ", ".join(f"{name} {minutes(s)}" for name, s in stage_times())
    print(f"\ndone in {minutes(seconds)}" + (f" ({times})" if times else ""))
    if opts.synthetic or (root / "synth_config.json").is_file():
        print(SYNTHETIC_NOTE)


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Options]:
    args = build_parser().parse_args(argv)
    return args, options_from_args(args, list(sys.argv[1:] if argv is None else argv))  # argv recorded in run.json


def make(argv: Sequence[str] | None = None) -> Outcome | None:
    """`make_submission.py` as a function, for notebooks: the same options, stages and printout; returns what was
    built (None after --dry-run); bad input raises instead of exiting."""
    _, opts = parse(argv)
    setup_logging(verbose=opts.verbose, quiet=opts.quiet)
    return run(opts)


def clean(args: argparse.Namespace, opts: Options) -> int:
    """--clean-cache: the caches of the data set named (or the folders given), else of every data set."""
    every = args.data_root is None and args.runs is None and args.ensemble_dir is None
    runs, ensemble = (RUNS, ENSEMBLE) if every else (opts.dirs.runs, opts.dirs.ensemble)
    before = disk_line(runs, ensemble)
    print(f"freed {human_bytes(clean_cache(runs, ensemble))} ({before})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, opts = parse(argv)

    def body() -> int:
        if args.clean_cache:
            return clean(args, opts)
        run(opts)
        return 0

    return run_command(body, args)
