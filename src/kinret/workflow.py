"""From experiments to the chosen scores: the groups of variants a data folder and a list of experiments yield, the
stages still to build, and the ensemble run that scores everything, evaluates it and chooses.

The command-line entry of this stage is ``python -m kinret.ensemble`` (training nothing); ``make_submission.py``
trains what is missing first and writes the submission after. ``torchrun --nproc_per_node N -m kinret.ensemble``
shares the embedding of every missing cache between N processes (one GPU each, or gloo on CPU); rank 0 then scores
and chooses, and make_submission.py reuses the caches.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from .config import TrainConfig, apply_overrides, load_experiment
from .ensemble import (
    METRICS,
    Scorer,
    Selection,
    combine,
    pooled,
    safe_name,
    select,
    table_rows,
    to_csv,
    to_markdown,
)
from .errors import KinretInputError
from .grid import expand
from .io import write_text_atomic
from .log import setup_logging
from .losses import loss_kind
from .models import POOLS
from .runs import run_status
from .sources import BackboneSource, CheckpointSource, ExternalEmbeddings, RawPixelSource
from .split import write_labelled
from .variants import Group, SplitData, build_splits, group_scores, missing_scores, similarities

log = logging.getLogger("kinret.ensemble")
DEFAULT_EXPERIMENTS = ("sface_heads",)


def experiment_jobs(name: str, root: Path, runs: Path) -> list[tuple[TrainConfig, int, list[str]]]:
    """The (config, fold, overrides) runs of an experiment's grid, on this data folder and runs folder."""
    cfg, grid = load_experiment(name)
    return expand(apply_overrides(cfg, [f"data_root={root}", f"out_root={runs}"]), grid)


def fold_plan(jobs: Sequence[tuple[TrainConfig, int, list[str]]]) -> tuple[int, int]:
    """(n_folds, fold_seed) every experiment agrees on, so out-of-fold protocols are the same for all variants;
    n_folds 0 when there are no trained variants."""
    plans = {(c.n_folds, c.fold_seed) for c, _, _ in jobs}
    if len(plans) > 1:
        raise ValueError(f"the experiments use different folds {sorted(plans)} (n_folds, fold_seed): out-of-fold "
                         "scores are only comparable on one fold plan")
    return plans.pop() if plans else (0, TrainConfig.fold_seed)  # no fold models: build_splits picks the folds


def discover_groups(jobs: Sequence[tuple[TrainConfig, int, list[str]]], cache_dir: Path, external_dir: Path | None,
                    raw_pixels: bool = True, top_n: int = 100) -> list[Group]:
    """Every group of variants: raw pixels, each frozen backbone behind head-only runs, each trained variant (its
    fold models), and each folder of ``external_dir`` (``embeddings.npz``, or ``{split}.npy`` score matrices)."""
    backbones: dict = {}
    groups: list[Group] = []
    if raw_pixels:
        groups.append(Group("raw_pixels", similarities(["pixels"], False), {None: RawPixelSource(cache_dir)}))
    seen_backbones = set()
    by_variant: dict[str, Group] = {}
    for cfg, fold, _ in jobs:
        if cfg.mode == "head" and (cfg.backbone, cfg.weights) not in seen_backbones:
            seen_backbones.add((cfg.backbone, cfg.weights))
            src = BackboneSource(cfg, cache_dir, backbones)
            groups.append(Group(src.name, similarities(_pools(cfg), False), {None: src}))
        if cfg.name not in by_variant:
            embs = ["emb"]
            if cfg.mode == "e2e":  # every pooling of the fine-tuned backbone, but the one equal to the embedding
                embs += [p for p in _pools(cfg) if not (p == cfg.pool and cfg.neck == "none")]
            by_variant[cfg.name] = Group(cfg.name, similarities(embs, loss_kind(cfg.loss) == "pair", top_n))
            groups.append(by_variant[cfg.name])
        by_variant[cfg.name].sources[fold] = CheckpointSource(cfg.run_dir(fold), cache_dir, backbones)
    if external_dir is not None and Path(external_dir).is_dir():
        for folder in sorted(p for p in Path(external_dir).iterdir() if p.is_dir()):
            if (folder / "embeddings.npz").is_file():
                groups.append(Group(folder.name, similarities(["emb"], False),
                                    {None: ExternalEmbeddings(folder / "embeddings.npz", folder.name)}))
            elif any(folder.glob("*.npy")):
                groups.append(Group(folder.name, [], scores_dir=folder))
            else:
                log.warning("%s holds neither embeddings.npz nor {split}.npy score matrices: ignored", folder)
    seen: set[str] = set()
    for g in groups:  # a group's name and its variants' names are all taken
        for v in dict.fromkeys([g.name, *g.variants]):
            if v in seen:
                where = Path(external_dir) / g.name if external_dir and g.name in _external(external_dir) else None
                raise KinretInputError(where, f"variant {v!r} is named twice: rename one of them")
            seen.add(v)
    return groups


def _pools(cfg: TrainConfig) -> list[str]:
    """The poolings `kinret.embed.forward_pooled` gives for this backbone (SFace adds its own embedding layer)."""
    return list(POOLS) + (["native"] if cfg.backbone == "sface" else [])


def _external(external_dir: Path | None) -> set[str]:
    if external_dir is None or not Path(external_dir).is_dir():
        return set()
    return {p.name for p in Path(external_dir).iterdir() if p.is_dir()}


def filter_groups(groups: list[Group], keep: Sequence[str] | None) -> list[Group]:
    """Only the variants named in `keep` (exact names or a group name for all its variants); none named twice."""
    if not keep:
        return groups
    dup = sorted({k for k in keep if list(keep).count(k) > 1})
    if dup:
        raise ValueError(f"variant {dup[0]!r} is named twice in --variants")
    known = {v for g in groups for v in g.variants} | {g.name for g in groups}
    unknown = [k for k in keep if k not in known]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; the run has: {', '.join(sorted(known))}")
    out = []
    for g in groups:
        if g.name in keep:
            out.append(g)
            continue
        sims = [s for s in g.sims if g.variant(s) in keep]
        if sims:
            out.append(Group(g.name, sims, g.sources, g.scores_dir))
    return out


@dataclass
class EnsembleResult:
    splits: dict[str, SplitData]
    scores: dict[str, dict[str, np.ndarray]]  # split -> variant -> (P, N)
    selection: Selection
    rows: list[dict[str, object]]
    chosen: dict[str, np.ndarray]  # split -> the chosen (P, N) scores

    @property
    def table_md(self) -> str:
        labelled = [g for g in ("oof", "val", "test") if any(f"{g}_average" in r for r in self.rows)]
        cols = ["variant"] + [f"{g}_{m}" for g in labelled for m in ("average", "mAP", "rank5")]
        return to_markdown(self.rows, cols)


def score_everything(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path
                     ) -> dict[str, dict[str, np.ndarray]]:
    if not groups:
        raise ValueError("no variants to score: give experiments, keep raw_pixels or add external variants")
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in splits}
    for g in groups:
        for name, sd in splits.items():
            out[name].update(group_scores(g, sd, scores_dir))
    return out


def embed_missing(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path) -> None:
    """Compute the embeddings behind every missing score matrix, source by source in one fixed order: run by every
    process under torchrun, each computing its share of each cache's chunks."""
    for g in groups:
        for sd in splits.values():
            if missing_scores(g, sd, scores_dir):
                for source in g.sources_for(sd):
                    source.embeddings(sd.images)


def run_ensemble(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path, out_dir: Path | None,
                 how: str = "auto", normalisation: str = "z", max_steps: int = 10) -> EnsembleResult:
    """Score every variant on every split, evaluate, choose; then (all inputs checked) write the table."""
    scores = score_everything(groups, splits, scores_dir)
    variants = list(scores["test"])
    scorers = {n: Scorer(sd.labels.probe_fids, sd.labels.gallery_fids) for n, sd in splits.items()
               if sd.labels is not None}
    chooser = [n for n in splits if splits[n].fold is not None] or [n for n in ("val",) if n in scorers]
    if chooser:
        sel = select({v: {n: scores[n][v] for n in chooser} for v in variants}, {n: scorers[n] for n in chooser},
                     how, normalisation, max_steps)
    else:
        log.warning("nothing labelled to choose on (no DATA/train folds, no DATA/val): taking the first variant")
        sel = Selection(f"best_{safe_name(variants[0])}", {variants[0]: 1.0}, normalisation, variants[0],
                        reason="the first variant: nothing labelled to choose on")
    chosen = {n: combine(scores[n], sel) for n in splits}

    def metrics(get) -> dict[str, dict[str, float]]:
        res = {}
        for group in ("oof", "val", "test"):
            names = [n for n in scorers if (n.startswith("oof") if group == "oof" else n == group)]
            if names:
                res[group] = pooled([scorers[n].per_probe(get(n)) for n in names])
        return res

    results = {f"chosen: {sel.name}": metrics(lambda n: chosen[n])}
    for label, m in sel.crossfit.items():
        results[f"{label} (cross-fitted out-of-fold)"] = {"oof": m}
    per_variant = {v: metrics(lambda n, v=v: scores[n][v]) for v in variants}
    key = "oof" if chooser and chooser[0].startswith("oof") else "val"
    for v in sorted(variants, key=lambda v: -per_variant[v].get(key, {}).get("average", 0.0)):
        results[v] = per_variant[v]
    rows = table_rows(results)
    result = EnsembleResult(splits, scores, sel, rows, chosen)
    if out_dir is not None:
        for name, sd in splits.items():  # the ids external score matrices must carry, per split
            if sd.split.labelled:
                write_labelled(sd.split, Path(out_dir) / "protocols" / name)
        write_text_atomic(Path(out_dir) / "variants.csv", to_csv(rows))
        write_text_atomic(Path(out_dir) / "variants.md", result.table_md)
        write_text_atomic(Path(out_dir) / "selection.json", sel.to_json())
    return result


def plan(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path,
         jobs: Sequence[tuple[TrainConfig, int, list[str]]]) -> list[str]:
    """The stages a run would build, one line each (what `--dry-run` prints)."""
    lines = []
    todo = [(c, f, state) for c, f, _ in jobs if (state := run_status(c, f)[0]) != "finished"]
    for c, f, state in todo:
        lines.append(f"train  {c.run_dir(f)} ({state})")
    untrained = {c.name for c, _, _ in todo}
    for g in groups:
        if g.name in untrained:
            lines.append(f"score  {g.name}: {len(g.variants)} variant(s) x {len(splits)} split(s), after training")
            continue
        for name, sd in splits.items():
            miss = missing_scores(g, sd, scores_dir)
            if miss:
                lines.append(f"score  {g.name} on {name}: {len(miss)} of {len(g.variants)} matrices to build")
    lines.append("select choose the best variant or blend on the out-of-fold scores; write the table")
    lines.append("submit write predictions.csv and the zip named after the choice")
    return lines


def add_ensemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS), metavar="EXP",
                   help="experiments (names in src/kinret/experiments/ or .py files) whose grids are trained and "
                        f"scored (default: {' '.join(DEFAULT_EXPERIMENTS)}); give none for training-free variants only")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders and caches (default: runs/)")
    p.add_argument("--ensemble-dir", type=Path, default=Path("ensemble"),
                   help="score matrices (scores/), external variants (external/NAME/) and the variant table "
                        "(default: ensemble/)")
    p.add_argument("--variants", nargs="*", default=None, metavar="NAME",
                   help="only these variants (or groups of variants); default: all")
    p.add_argument("--no-raw-pixels", action="store_true", help="leave out the raw-pixel baseline variants")
    p.add_argument("--choose", choices=("auto", "best", "blend"), default="auto",
                   help="auto: blend only if it beats the best single variant out of fold (default)")
    p.add_argument("--normalise", choices=("z", "rank"), default="z", help="per-probe score normalisation for blends")
    p.add_argument("--max-steps", type=int, default=10, help="greedy blend steps (default 10)")
    p.add_argument("--top-n", type=int, default=100, help="cosine shortlist re-ranked by the FC head (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the protocols drawn from labelled folders")


def prepare(args: argparse.Namespace, root: Path) -> tuple[list, dict[str, SplitData], list[Group]]:
    jobs = [j for exp in args.experiments for j in experiment_jobs(exp, root, args.runs)]
    n_folds, fold_seed = fold_plan(jobs)
    splits = build_splits(root, n_folds, fold_seed, args.seed)
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kinret.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path("data") / "synthetic", help="default: data/synthetic")
    add_ensemble_args(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    setup_logging(quiet=args.quiet or rank > 0)
    if world > 1 and not tdist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        tdist.init_process_group("nccl" if cuda else "gloo")
    try:
        jobs, splits, groups = prepare(args, args.data_root)
        untrained = [c.run_dir(f) for c, f, _ in jobs if run_status(c, f)[0] != "finished"]
        if untrained:
            raise FileNotFoundError(f"{len(untrained)} run(s) are not trained, e.g. {untrained[0]}: run "
                                    "make_submission.py (or python -m kinret.grid) first")
        if world > 1:  # the processes share the embedding; rank 0 alone scores and chooses
            embed_missing(groups, splits, args.ensemble_dir / "scores")
            if rank > 0:
                return 0
        result = run_ensemble(groups, splits, args.ensemble_dir / "scores", args.ensemble_dir, args.choose,
                              args.normalise, args.max_steps)
    except (KinretInputError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        if world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()
    print(result.table_md)
    print(summary(result))
    print(f"table: {args.ensemble_dir / 'variants.csv'}, {args.ensemble_dir / 'variants.md'}")
    return 0
