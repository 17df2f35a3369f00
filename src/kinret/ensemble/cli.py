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
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from kinret.cli import parser, run_command
from kinret.data import DEFAULT_ROOT
from kinret.data.layout import DataLayout
from kinret.data.workspace import work_dirs
from kinret.dist import env_rank_world, process_group
from kinret.ensemble.bootstrap import N_BOOT
from kinret.ensemble.run import REFERENCES, EnsembleResult, embed_missing, prepare, run_ensemble
from kinret.ensemble.selection import POOL
from kinret.ensemble.settings import DEFAULT_EXPERIMENTS, EVERY_VARIANT_PAIRS, SCORE_OTHERS, EnsembleSettings
from kinret.ensemble.tables import GROUPS, interval_text
from kinret.errors import KinretInputError
from kinret.features.sources import BackboneSource
from kinret.io import check_writable, remove_stale_temporaries
from kinret.scoring.protocols import split_group
from kinret.train.experiments import Run
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
    p.add_argument("--runs", type=Path, default=None,
                   help="run folders and caches (default: runs/{data set}/, named after the data folder; a folder "
                        "given here is used as it is)")
    p.add_argument("--ensemble-dir", type=Path, default=None,
                   help="score matrices (scores/), external variants (external/NAME/), the variant table "
                        "(variants.md, variants.csv), per-probe results (per_probe.csv.gz) and selection.json "
                        "(default: ensemble/{data set}/; a folder given here is used as it is)")
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
    p.add_argument("--score-others", choices=SCORE_OTHERS, default="auto",
                   help="the variants scored on a labelled split the choice is not made on (val, test; for the "
                        "table's columns, the submission needs only the chosen): every variant, the chosen ones and "
                        f"the reference, or auto: every variant on a split of at most {EVERY_VARIANT_PAIRS / 1e6:.0f} "
                        "million probe x gallery pairs, the chosen ones and the reference on a larger one")


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


def network_name(cfg) -> str:
    """The name a config's network goes by everywhere: the prefix of its zero-shot variants (``sface``,
    ``onnx-w600k_r50``), the glance's lines, the dry run's estimates and the throughput record."""
    return BackboneSource(cfg, Path()).name


def networks_of(runs: Sequence[Run]) -> dict[str, tuple[str, str]]:
    """Trained group (a run's config name) -> (its network, its experiment), for the glance's lines by network."""
    return {r.cfg.name: (network_name(r.cfg), r.cfg.name.split("/")[0]) for r in runs}


def _best_by_source(result: EnsembleResult, networks: Mapping[str, tuple[str, str]]) -> list[str]:
    """The best variant of each network (its zero-shot variants) and of each experiment trained on it, on the
    choosing split group: every network and experiment of the run is named, not only those in the best few."""
    key, table = result.key, result.table
    rows = table[table["variant"].isin(result.scores.get("test", {}))]
    if f"{key}_average" not in rows or not len(rows):
        return []
    best: dict[str, dict[str, tuple[str, float]]] = {}
    for variant, score in zip(rows["variant"], rows[f"{key}_average"], strict=True):
        group = variant.rpartition(":")[0] or variant
        network, experiment = networks.get(group, (group, ""))
        slot = best.setdefault(network, {}).get(experiment)
        if pd.notna(score) and (slot is None or score > slot[1]):
            best[network][experiment] = (variant, float(score))
    order = sorted(best, key=lambda n: -max(v for _, v in best[n].values()))
    lines = [f"best of each network and experiment by {key} Average:"]
    for network in order:
        trained = len(best[network]) > 1 or "" not in best[network]  # its own variants beside trained ones: zero-shot
        parts = [f"{exp or ('zero-shot ' if trained else '')}{' ' if exp else ''}{v} {score:.3f}"
                 for exp, (v, score) in sorted(best[network].items(), key=lambda x: -x[1][1])]
        lines.append(f"  {network}: " + "; ".join(parts))
    return lines


def _submitted_line(result: EnsembleResult, groups: Sequence[str]) -> str:
    """What was submitted and its Averages; a blend's out-of-fold one in-sample (its weights were searched on those
    probes) beside the cross-fitted one (searched on the other folds: what to expect of it)."""
    sel, table = result.selection, result.table
    chosen = table[table["variant"] == f"chosen: {sel.name}"]
    scores = _scores_text(chosen.iloc[0], groups) if len(chosen) else ""
    blend = sel.crossfit.get("blend", {}).get("average")
    if len(sel.weights) > 1 and blend is not None and scores.startswith(f"{result.key} "):
        head, _, rest = scores.partition(",")
        scores = f"{head} in-sample, {blend:.3f} cross-fitted" + (f",{rest}" if rest else "")
    return f"submitted: {sel.name}" + (f" (Average {scores})" if scores else "")


def _val_note(result: EnsembleResult) -> list[str]:
    """A word when a submitted blend scores below every one of its parts on val (never used to choose)."""
    sel, table = result.selection, result.table
    if len(sel.weights) < 2 or "val_average" not in table:
        return []
    val = dict(zip(table["variant"], table["val_average"], strict=True))
    blend, parts = val.get(f"chosen: {sel.name}"), [val.get(v) for v in sel.weights]
    if blend is None or pd.isna(blend) or any(p is None or pd.isna(p) for p in parts) or blend >= min(parts):
        return []
    probes = len(result.splits["val"].split.probes) if "val" in result.splits else 0
    return [f"  note: on val the blend's Average {blend:.3f} is below each of its parts' "
            f"({', '.join(f'{p:.3f}' for p in parts)}); val ({probes} probes) never took part in the choice, which "
            "rests on the out-of-fold figures: a blend that helps out of fold does not always carry over"]


def glance(result: EnsembleResult, top: int = 5, table_path: str | Path | None = None,
           networks: Mapping[str, tuple[str, str]] | None = None) -> str:
    """A terminal summary of a run in about 20 lines: what is submitted and its Averages (a blend's cross-fitted one
    beside its in-sample one, and a word when it falls below its parts on val), why (the blend decision in plain
    words), the `top` best variants (Average on the choosing split group with its 95% interval against the reference,
    val and test when known), the best of every network and experiment (`networks`: `networks_of` the runs), the
    chance level per split group, and where the full table is."""
    sel, table = result.selection, result.table
    groups = [g for g in GROUPS if f"{g}_average" in table and table[f"{g}_average"].notna().any()]
    lines = [_submitted_line(result, groups)]
    if len(sel.weights) > 1:
        lines.append("  weights: " + ", ".join(f"{w:.2f} {v}" for v, w in sorted(sel.weights.items(),
                                                                                 key=lambda x: -x[1])))
    lines += _val_note(result)
    lines.append(f"why: {sel.reason}")
    lines += _variant_lines(result, top, groups)
    lines += _best_by_source(result, networks or {})
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
        fc_all=args.fc_all, protocol_seed=args.protocol_seed, score_others=args.score_others,
        data_root=str(data_root), data_seed=data_seed)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    settings = settings_from_args(args, args.data_root)
    dirs = work_dirs(args.data_root, runs=args.runs, ensemble=args.ensemble_dir)
    with process_group(torch.cuda.is_available()) as (rank, world):
        if rank == 0:
            for folder in (dirs.ensemble, dirs.ensemble / "scores", dirs.runs):
                check_writable(folder)
            remove_stale_temporaries([dirs.ensemble, dirs.runs], before=started)
        runs, splits, groups = prepare(settings, DataLayout.of(args.data_root), dirs.runs, dirs.ensemble)
        todo = unfinished(runs)
        if todo:
            raise KinretInputError(todo[0][0].run_dir, f"not trained ({len(todo)} run(s) are not): run "
                                                       "make_submission.py (or python -m kinret.grid) first")
        if world > 1:  # the processes share the embedding; rank 0 alone scores and chooses
            embed_missing(groups, splits, dirs.ensemble / "scores")
            if rank > 0:
                return 0
        result = run_ensemble(groups, splits, settings, dirs.ensemble / "scores", dirs.ensemble)
    print(glance(result, table_path=f"{dirs.ensemble / 'variants.md'} (also variants.csv, per_probe.csv.gz)",
                 networks=networks_of(runs)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("python -m kinret.ensemble", __doc__)
    p.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="the data folder")
    add_ensemble_args(p)
    args = p.parse_args(argv)
    if env_rank_world()[0] > 0:
        args.quiet = True
    return run_command(lambda: run(args), args)
