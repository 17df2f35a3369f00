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

import pandas as pd
import torch

from kinret.cli import parser, run_command
from kinret.data import DEFAULT_ROOT
from kinret.data.layout import DataLayout
from kinret.dist import env_rank_world, process_group
from kinret.ensemble.bootstrap import N_BOOT
from kinret.ensemble.run import REFERENCES, EnsembleResult, embed_missing, prepare, run_ensemble
from kinret.ensemble.selection import POOL
from kinret.ensemble.settings import DEFAULT_EXPERIMENTS, EnsembleSettings
from kinret.ensemble.tables import GROUPS, interval_text
from kinret.errors import KinretInputError
from kinret.io import check_writable, remove_stale_temporaries
from kinret.scoring.protocols import split_group
from kinret.train.runs import unfinished


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_ensemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS), metavar="EXP",
                   help="experiments (names in src/kinret/train/experiments/ or .py files) whose grids are trained and "
                        "scored; give none for training-free variants only")
    p.add_argument("--set", action="append", default=[], metavar="[EXPERIMENT:]KEY=VALUE", dest="overrides",
                   help="a config override of every experiment, or of the one named before the colon (e.g. "
                        "--set arcface_onnx_heads:weights=w600k_r50.onnx); saved in selection.json")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders and caches")
    p.add_argument("--ensemble-dir", type=Path, default=Path("ensemble"),
                   help="score matrices (scores/), external variants (external/NAME/), the variant table "
                        "(variants.md, variants.csv), per-probe results (per_probe.csv.gz) and selection.json")
    p.add_argument("--variants", nargs="*", default=None, metavar="NAME",
                   help="only these variants (or groups of variants); default: all")
    p.add_argument("--no-raw-pixels", action="store_true", help="leave out the raw-pixel baseline variants")
    p.add_argument("--choose", choices=("auto", "best", "blend"), default="auto",
                   help="auto: blend only if the 95%% bootstrap interval of its cross-fitted out-of-fold gain over the "
                        "best single variant lies above 0")
    p.add_argument("--normalise", choices=("z", "rank"), default="z", help="per-probe score normalisation for blends")
    p.add_argument("--max-steps", type=int, default=10, help="greedy blend steps (the start of the weight search)")
    p.add_argument("--blend-pool", type=_positive, default=POOL,
                   help="a blend's weights are searched over this many best variants (bounds the search's time)")
    p.add_argument("--bootstrap", type=_positive, default=N_BOOT,
                   help="paired bootstrap resamples of the probes behind every 95%% interval (seeded)")
    p.add_argument("--reference", default=None, metavar="NAME",
                   help="the variant every interval is taken against; default: zero-shot SFace "
                        f"({REFERENCES[0]}) when present, else raw pixels ({REFERENCES[1]})")
    p.add_argument("--top-n", type=int, default=100, help="cosine shortlist re-ranked by the FC head")
    p.add_argument("--fc-all", action="store_true",
                   help="also score every pair head's FC similarity over every probe-photo x gallery pair (slow, and "
                        "it never beat the cosine out of fold; without it these variants are scored only when named "
                        "in --variants)")
    p.add_argument("--protocol-seed", type=int, default=0,
                   help="seed of the probe/gallery protocols drawn from labelled folders (out-of-fold, val)")


def _scores_text(row: pd.Series, groups: Sequence[str]) -> str:
    return ", ".join(f"{g} {row[f'{g}_average']:.3f}" for g in groups
                     if f"{g}_average" in row and pd.notna(row[f"{g}_average"]))


def _chance_text(chance: pd.DataFrame) -> str:
    found = {}
    for group in GROUPS:
        rows = chance[chance["split"] == group]
        if rows.empty:
            rows = chance[chance["split"].map(split_group) == group]
        if len(rows) == 1:
            found[group] = float(rows["average"].iloc[0])
    return ", ".join(f"{g} {v:.3f}" for g, v in found.items())


def _variant_lines(result: EnsembleResult, top: int, groups: Sequence[str]) -> list[str]:
    """The `top` best variants: Average on the choosing group with its interval, then the other groups."""
    sel, key = result.selection, result.key
    variants = result.scores.get("test", {})
    rows = result.table[result.table["variant"].isin(variants)].head(top)
    if not len(rows) or key not in groups:
        return []
    width = max(len(v) for v in rows["variant"])
    against = f" (95% interval against {sel.reference})" if sel.reference else ""
    lines = [f"best {len(rows)} of {len(variants)} variants by {key} Average{against}:"]
    for _, row in rows.iterrows():
        iv = ""
        if row["variant"] == sel.reference:
            iv = "  reference"
        elif f"{key}_delta" in row and pd.notna(row[f"{key}_delta"]):
            iv = " " + interval_text(row[f"{key}_delta"], row[f"{key}_delta_lo"], row[f"{key}_delta_hi"])
        rest = _scores_text(row, [g for g in groups if g != key])
        lines.append(f"  {row['variant']:<{width}}  {row[f'{key}_average']:.3f}{iv}" + (f";  {rest}" if rest else ""))
    return lines


def glance(result: EnsembleResult, top: int = 5, table_path: str | Path | None = None) -> str:
    """A terminal summary of a run in <= ~15 lines: what is submitted and its Averages, why (the blend decision in
    plain words), the `top` best variants (Average on the choosing split group with its 95% interval against the
    reference, val and test when known), the chance level per split group, and where the full table is."""
    sel, table = result.selection, result.table
    groups = [g for g in GROUPS if f"{g}_average" in table and table[f"{g}_average"].notna().any()]
    chosen = table[table["variant"] == f"chosen: {sel.name}"]
    scores = _scores_text(chosen.iloc[0], groups) if len(chosen) else ""
    lines = [f"submitted: {sel.name}" + (f" (Average {scores})" if scores else "")]
    if len(sel.weights) > 1:
        lines.append("  weights: " + ", ".join(f"{w:.2f} {v}" for v, w in sorted(sel.weights.items(),
                                                                                 key=lambda x: -x[1])))
    lines.append(f"why: {sel.reason}")
    lines += _variant_lines(result, top, groups)
    if len(result.chance):
        lines.append(f"chance (random ranking) Average: {_chance_text(result.chance)}; splits differ in gallery "
                     "size, so compare within a split only")
    if table_path is not None:
        lines.append(f"full table: {table_path}")
    return "\n".join(lines)


def settings_from_args(args: argparse.Namespace, data_root: Path, data_seed: int | None = None) -> EnsembleSettings:
    """The settings the ensemble options (`add_ensemble_args`) ask for, on this data folder."""
    return EnsembleSettings(
        experiments=tuple(args.experiments), overrides=tuple(args.overrides),
        variants=None if args.variants is None else tuple(args.variants),
        raw_pixels=not args.no_raw_pixels, choose=args.choose, normalise=args.normalise, max_steps=args.max_steps,
        blend_pool=args.blend_pool, bootstrap=args.bootstrap, reference=args.reference, top_n=args.top_n,
        fc_all=args.fc_all, protocol_seed=args.protocol_seed, data_root=str(data_root), data_seed=data_seed)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    settings = settings_from_args(args, args.data_root)
    with process_group(torch.cuda.is_available()) as (rank, world):
        if rank == 0:
            for folder in (args.ensemble_dir, args.ensemble_dir / "scores", args.runs):
                check_writable(folder)
            remove_stale_temporaries([args.ensemble_dir, args.runs], before=started)
        runs, splits, groups = prepare(settings, DataLayout.of(args.data_root), args.runs, args.ensemble_dir)
        todo = unfinished(runs)
        if todo:
            raise KinretInputError(todo[0][0].run_dir, f"not trained ({len(todo)} run(s) are not): run "
                                                       "make_submission.py (or python -m kinret.grid) first")
        if world > 1:  # the processes share the embedding; rank 0 alone scores and chooses
            embed_missing(groups, splits, args.ensemble_dir / "scores")
            if rank > 0:
                return 0
        result = run_ensemble(groups, splits, settings, args.ensemble_dir / "scores", args.ensemble_dir)
    print(glance(result, table_path=f"{args.ensemble_dir / 'variants.md'} (also variants.csv, per_probe.csv.gz)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("python -m kinret.ensemble", __doc__)
    p.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="the data folder")
    add_ensemble_args(p)
    args = p.parse_args(argv)
    if env_rank_world()[0] > 0:
        args.quiet = True
    return run_command(lambda: run(args), args)
