"""``python -m kinret.ensemble`` (or ``python ensemble/choose.py``): evaluate every variant out of fold, then pick
the best or blend, training nothing. ``make_submission.py`` trains what is missing first and writes the submission
after, with the same options.

Every variant is scored on the out-of-fold protocols (each fold's held-out families, scored by the model that did
not see them) and, when present, on the labelled val split (and the test split when its truth is known; never used
to choose). ``torchrun --nproc_per_node N -m kinret.ensemble`` shares the embedding of every missing cache between N
processes (one GPU each, or gloo on CPU); rank 0 then scores and chooses, and make_submission.py reuses the caches.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kinret.cli import parser, run_command
from kinret.dist import env_rank_world, process_group
from kinret.ensemble.discovery import DEFAULT_EXPERIMENTS, discover_groups, experiment_jobs, filter_groups, fold_plan
from kinret.ensemble.run import EnsembleResult, embed_missing, run_ensemble
from kinret.ensemble.tables import METRICS
from kinret.errors import KinretInputError
from kinret.io import check_writable, remove_stale_temporaries
from kinret.scoring.splits import SplitData, build_splits
from kinret.scoring.variants import Group
from kinret.train.runs import run_status


def add_ensemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS), metavar="EXP",
                   help="experiments (names in src/kinret/train/experiments/ or .py files) whose grids are trained and "
                        "scored; give none for training-free variants only")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders and caches")
    p.add_argument("--ensemble-dir", type=Path, default=Path("ensemble"),
                   help="score matrices (scores/), external variants (external/NAME/) and the variant table "
                        "")
    p.add_argument("--variants", nargs="*", default=None, metavar="NAME",
                   help="only these variants (or groups of variants); default: all")
    p.add_argument("--no-raw-pixels", action="store_true", help="leave out the raw-pixel baseline variants")
    p.add_argument("--choose", choices=("auto", "best", "blend"), default="auto",
                   help="auto: blend only if it beats the best single variant out of fold")
    p.add_argument("--normalise", choices=("z", "rank"), default="z", help="per-probe score normalisation for blends")
    p.add_argument("--max-steps", type=int, default=10, help="greedy blend steps")
    p.add_argument("--top-n", type=int, default=100, help="cosine shortlist re-ranked by the FC head")
    p.add_argument("--protocol-seed", type=int, default=0,
                   help="seed of the probe/gallery protocols drawn from labelled folders (out-of-fold, val)")


def prepare(args: argparse.Namespace, root: Path) -> tuple[list, dict[str, SplitData], list[Group]]:
    jobs = [j for exp in args.experiments for j in experiment_jobs(exp, root, args.runs)]
    n_folds, fold_seed = fold_plan(jobs)
    splits = build_splits(root, n_folds, fold_seed, args.protocol_seed)
    groups = discover_groups(jobs, args.runs / "_cache", args.ensemble_dir / "external", not args.no_raw_pixels,
                             args.top_n)
    return jobs, splits, filter_groups(groups, args.variants)


def summary(result: EnsembleResult) -> str:
    sel = result.selection
    lines = [f"chose {sel.name}: {sel.reason}"]
    if len(sel.weights) > 1:
        lines += [f"  {w:.3f}  {v}" for v, w in sorted(sel.weights.items(), key=lambda x: -x[1])]
    for label, m in sel.crossfit.items():
        lines.append(f"{label:>12}, cross-fitted out of fold: " + ", ".join(f"{k} {m[k]:.4f}" for k in METRICS
                                                                              if k in m))
    return "\n".join(lines)


def settings(args: argparse.Namespace) -> dict[str, object]:
    """The options a choice depends on, saved in selection.json beside the submission they produced."""
    keys = ("experiments", "variants", "no_raw_pixels", "choose", "normalise", "max_steps", "top_n", "protocol_seed")
    return {k: getattr(args, k) for k in keys}


def run(args: argparse.Namespace) -> int:
    started = time.time()
    with process_group(torch.cuda.is_available()) as (rank, world):
        if rank == 0:
            for folder in (args.ensemble_dir, args.ensemble_dir / "scores", args.runs):
                check_writable(folder)
            remove_stale_temporaries([args.ensemble_dir, args.runs], before=started)
        jobs, splits, groups = prepare(args, args.data_root)
        fingerprints: dict = {}  # the data is read once for every run of the sweep
        untrained = [c.run_dir(f) for c, f, _ in jobs if run_status(c, f, fingerprints)[0] != "finished"]
        if untrained:
            raise KinretInputError(untrained[0], f"not trained ({len(untrained)} run(s) are not): run "
                                                 "make_submission.py (or python -m kinret.grid) first")
        if world > 1:  # the processes share the embedding; rank 0 alone scores and chooses
            embed_missing(groups, splits, args.ensemble_dir / "scores")
            if rank > 0:
                return 0
        result = run_ensemble(groups, splits, args.ensemble_dir / "scores", args.ensemble_dir, args.choose,
                              args.normalise, args.max_steps, settings(args))
    print(result.table_md)
    print(summary(result))
    print(f"table: {args.ensemble_dir / 'variants.csv'}, {args.ensemble_dir / 'variants.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("python -m kinret.ensemble", __doc__)
    p.add_argument("--data-root", type=Path, default=Path("data") / "synthetic", help="the data folder")
    add_ensemble_args(p)
    args = p.parse_args(argv)
    if env_rank_world()[0] > 0:
        args.quiet = True
    return run_command(lambda: run(args), args)
