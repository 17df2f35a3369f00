"""The ensemble run: score every variant on every split (cached matrices reused), evaluate them, choose the best
variant or a blend out of fold, and write the variant table; plus the dry-run plan of what is still to build."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kinret.data.split import write_labelled
from kinret.ensemble.selection import Scorer, Selection, combine, pooled, select
from kinret.ensemble.tables import summary_columns, to_csv, to_markdown, variant_table
from kinret.errors import KinretInputError
from kinret.io import write_text_atomic
from kinret.models.config import TrainConfig
from kinret.scoring.splits import SplitData
from kinret.scoring.store import safe_name
from kinret.scoring.variants import Group, group_scores, missing_scores
from kinret.train.runs import run_status

log = logging.getLogger("kinret.ensemble")


@dataclass
class EnsembleResult:
    splits: dict[str, SplitData]
    scores: dict[str, dict[str, np.ndarray]]  # split -> variant -> (P, N)
    selection: Selection
    table: pd.DataFrame  # one row per variant (and the chosen and cross-fitted lines), metrics per split group
    chosen: dict[str, np.ndarray]  # split -> the chosen (P, N) scores
    settings: dict[str, object] = field(default_factory=dict)  # the options the choice was made with

    @property
    def table_md(self) -> str:
        return to_markdown(self.table, summary_columns(self.table))


def score_everything(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path
                     ) -> dict[str, dict[str, np.ndarray]]:
    if not groups:
        raise KinretInputError(None, "no variants to score: give experiments, keep raw_pixels or add external variants")
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
                 how: str = "auto", normalisation: str = "z", max_steps: int = 10,
                 settings: dict[str, object] | None = None) -> EnsembleResult:
    """Score every variant on every split, evaluate, choose; then (all inputs checked) write the table and
    selection.json (the choice, and the `settings` it was made with)."""
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
    table = variant_table(results)
    result = EnsembleResult(splits, scores, sel, table, chosen, dict(settings or {}))
    if out_dir is not None:
        for name, sd in splits.items():  # the ids external score matrices must carry, per split
            if sd.split.labelled:
                write_labelled(sd.split, Path(out_dir) / "protocols" / name)
        write_text_atomic(Path(out_dir) / "variants.csv", to_csv(table))
        write_text_atomic(Path(out_dir) / "variants.md", result.table_md)
        write_text_atomic(Path(out_dir) / "selection.json", sel.to_json(result.settings))
    return result


def plan(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path,
         jobs: Sequence[tuple[TrainConfig, int, list[str]]]) -> list[str]:
    """The stages a run would build, one line each (what `--dry-run` prints)."""
    lines = []
    fingerprints: dict = {}  # the data is read once for every run of the sweep
    todo = [(c, f, state) for c, f, _ in jobs if (state := run_status(c, f, fingerprints)[0]) != "finished"]
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
