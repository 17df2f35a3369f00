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
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kinret.cli import parser, run_command
from kinret.data.synth import SynthConfig, generate
from kinret.ensemble.cli import add_ensemble_args, prepare, settings, summary
from kinret.ensemble.discovery import experiment_jobs
from kinret.ensemble.run import EnsembleResult, plan, run_ensemble
from kinret.errors import KinretInputError
from kinret.io import check_writable, remove_stale_temporaries, write_text_atomic
from kinret.log import setup_logging
from kinret.metrics import chance_level
from kinret.submission.predictions import SubmissionResult, submit
from kinret.submission.report import write_report
from kinret.train.grid import main as grid_main
from kinret.train.runs import run_status

log = logging.getLogger("kinret.submission")
DEFAULT_SYNTH_ROOT = Path("data") / "synthetic"


def build_parser() -> argparse.ArgumentParser:
    p = parser("make_submission.py", __doc__)
    p.add_argument("--data-root", type=Path, default=None,
                   help="real data folder laid out as above; default: the synthetic dataset in "
                        f"{DEFAULT_SYNTH_ROOT} (generated on first use, reused afterwards)")
    p.add_argument("--out", type=Path, default=Path("submissions"),
                   help="where predictions.csv, the zip and the variant table go")
    p.add_argument("--zip-name", default=None, help="name of the zip in --out (default: named after the choice)")
    add_ensemble_args(p)
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="parallel training processes for grids")
    p.add_argument("--dry-run", action="store_true", help="list the stages that would run, build nothing")
    p.add_argument("--regenerate", action="store_true", help="rebuild the synthetic dataset even if cached")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset (without --data-root)")
    return p


def train_missing(args: argparse.Namespace, root: Path) -> None:
    """Run the grid of every experiment with a run not finished (the grid skips the finished ones)."""
    for exp in args.experiments:
        fingerprints: dict = {}  # the data is read once for every run of the sweep
        if any(run_status(c, f, fingerprints)[0] != "finished" for c, f, _ in experiment_jobs(exp, root, args.runs)):
            code = grid_main(["-C", exp, "--set", f"data_root={root}", "--set", f"out_root={args.runs}", "--jobs",
                              str(args.jobs)] + (["--quiet"] if args.quiet else []))
            if code == 2:
                raise KinretInputError(None, f"training the {exp} grid stopped on bad input; see the log above")
            if code != 0:
                raise RuntimeError(f"training the {exp} grid failed (exit code {code}); see the log above")


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
        folders.append(DEFAULT_SYNTH_ROOT.parent)
    for folder in folders:
        check_writable(folder)
    remove_stale_temporaries([args.out, args.ensemble_dir, args.runs], before=started)


def run(args: argparse.Namespace) -> Outcome | None:
    """The stages, printing as they go; None after a dry run. Bad input raises."""
    t0 = time.perf_counter()
    if not args.dry_run:
        prepare_outputs(args, time.time())
    root = args.data_root
    if root is None:
        root = DEFAULT_SYNTH_ROOT
        if not args.dry_run or (root / "test").is_dir():
            root = generate(DEFAULT_SYNTH_ROOT, SynthConfig(seed=args.data_seed), force=args.regenerate)
        print(f"data: synthetic families in {root} (seed {args.data_seed}); pass --data-root for real FIW data")
    else:
        print(f"data: {root}")
    if args.dry_run and not (root / "test").is_dir():
        print(f"data   generate the synthetic dataset in {root}\n(then train, score, select and submit)")
        return None
    jobs, splits, groups = prepare(args, root)
    for sd in splits.values():
        print(sd.split.describe() + ("" if sd.labels is not None else " (unlabelled)"))
    if args.dry_run:
        print("\n".join(plan(groups, splits, args.ensemble_dir / "scores", jobs)))
        return None
    train_missing(args, root)
    result = run_ensemble(groups, splits, args.ensemble_dir / "scores", args.ensemble_dir, args.choose,
                          args.normalise, args.max_steps, run_settings(args, root))
    sel = result.selection
    test = splits["test"]
    sub = submit(result.chosen["test"], test.split, args.out, test.labels, args.zip_name or f"{sel.name}.zip")
    write_text_atomic(args.out / "variants.md", result.table_md)
    write_text_atomic(args.out / "selection.json", sel.to_json(result.settings))
    report = write_report(result, args.out / "report")
    print(f"\n{result.table_md}")
    print(summary(result))
    if len(sel.weights) > 1:
        single = result.table.set_index("variant").loc[sel.best_single]
        print(f"best single variant {sel.best_single}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in single.items() if k.endswith("_average") and v == v))
    print(f"wrote {sub.csv_path} and {sub.zip_path} ({sel.name}); table in {args.out / 'variants.md'}")
    print(f"report: {', '.join(str(p) for p in report)}")
    if sub.scores:
        for ap, scores in sub.scores.items():
            print(f"\nlocal test score, {ap} AP:\n{scores.table()}")
        chance = chance_level(test.labels.probe_fids, test.labels.gallery_fids)
        print(f"(a random ranking expects standard mAP {chance['mAP']:.4f}, Rank@5 {chance['rank@5']:.4f}, "
              f"Average {chance['average']:.4f})")
    else:
        print(f"no test labels in {root / 'test_truth'}: local test score skipped")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return Outcome(root, result, sub, report)


def run_settings(args: argparse.Namespace, root: Path) -> dict[str, object]:
    """The ensemble's settings plus the data they ran on, saved in selection.json."""
    data = {"data_root": str(args.data_root)} if args.data_root else {"synthetic_data_seed": args.data_seed,
                                                                        "data_root": str(root)}
    return {**data, **settings(args)}


def make(argv: Sequence[str] | None = None) -> Outcome | None:
    """`make_submission.py` as a function, for notebooks: the same options, stages and printout; returns what was
    built (None after --dry-run); bad input raises instead of exiting."""
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        run(args)
        return 0

    return run_command(body, args)
