"""The choice: per-probe results of score matrices on labelled splits (`Scorer`), pooled over splits, and the pick
of the best single variant or a blend by their out-of-fold Average (`select`), with the reason recorded.

Blending: each variant's scores are normalised per probe (z-score or rank) and summed with weights found by greedy
forward selection with replacement (Caruana et al. 2004) on the out-of-fold Average. So that the reported gain is
not the search's own optimism, the search is cross-fitted: for each fold k the weights (and, for comparison, the
best single variant) are chosen on the other folds and scored on fold k; the blend is chosen only if it beats the
best single variant there. The submitted weights are then searched on every fold.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kinret.ensemble.blend import NORMALISATIONS, blend, normalise
from kinret.metrics import per_probe_results, relevance, summarise
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.store import safe_name

log = logging.getLogger(__name__)
METRICS = ("average", "mAP", "mAP_trapezoid", "rank1", "rank5", "rank10")


class Scorer:
    """Per-probe results of score matrices on one labelled split (relevance computed once)."""

    def __init__(self, probe_fids: Sequence, gallery_fids: Sequence):
        self.rel = relevance(probe_fids, gallery_fids)

    def per_probe(self, scores: np.ndarray, trapezoid: bool = True) -> pd.DataFrame:
        return per_probe_results(rank_gallery(scores), self.rel, trapezoid)


def pooled(parts: Sequence[pd.DataFrame]) -> dict[str, float]:
    """Metrics over the probes of several splits taken together (each probe counts once)."""
    return summarise(pd.concat(parts, ignore_index=True))


def objective(matrices: dict[str, np.ndarray], scorers: dict[str, Scorer]) -> float:
    return pooled([scorers[k].per_probe(m, trapezoid=False) for k, m in matrices.items()])["average"]


def greedy_weights(norm: dict[str, dict[str, np.ndarray]], scorers: dict[str, Scorer], folds: Sequence[str],
                   max_steps: int = 10) -> dict[str, float]:
    """Forward selection with replacement: start empty, add the variant (again, possibly) that raises the pooled
    Average over `folds` the most; stop when nothing raises it or after `max_steps`. Weights = counts / total.
    `norm` (variant -> split -> normalised matrix) is ordered best single first, which breaks ties."""
    counts: Counter[str] = Counter()
    current = {k: np.zeros_like(next(iter(norm.values()))[k]) for k in folds}
    best_obj = -np.inf
    for _ in range(max_steps):
        step = max(((objective({k: current[k] + norm[v][k] for k in folds}, scorers), -i, v)
                    for i, v in enumerate(norm)), default=None)
        if step is None or step[0] <= best_obj + 1e-12:
            break
        best_obj, v = step[0], step[2]
        counts[v] += 1
        current = {k: current[k] + norm[v][k] for k in folds}
    total = sum(counts.values())
    return {v: c / total for v, c in counts.items()}


@dataclass
class Selection:
    """What was chosen and why: the weights (one variant at weight 1 for a single pick), the cross-fitted
    comparison, and the name the submission files carry."""

    name: str
    weights: dict[str, float]
    normalisation: str
    best_single: str
    crossfit: dict[str, dict[str, float]] = field(default_factory=dict)  # "blend" / "best single" -> metrics
    reason: str = ""

    def to_json(self, settings: dict[str, object] | None = None) -> str:
        """The choice as JSON; `settings`, the options it was made with, are saved beside it."""
        return json.dumps({"name": self.name, "weights": self.weights, "normalisation": self.normalisation,
                           "best_single": self.best_single, "crossfit": self.crossfit, "reason": self.reason,
                           "settings": settings or {}}, indent=2, default=str) + "\n"


def select(oof: dict[str, dict[str, np.ndarray]], scorers: dict[str, Scorer], how: str = "auto",
           normalisation: str = "z", max_steps: int = 10) -> Selection:
    """Choose from `oof` (variant -> oof split -> scores): how = "best" (the best single variant by pooled
    out-of-fold Average), "blend", or "auto" (the blend when its cross-fitted Average beats the cross-fitted best
    single variant's)."""
    if not oof:
        raise ValueError("no variants to choose from")
    if how not in ("auto", "best", "blend"):
        raise ValueError(f"unknown choice {how!r}; choose auto, best or blend")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; choose one of {NORMALISATIONS}")
    folds = sorted(scorers)
    single = {v: objective(m, scorers) for v, m in oof.items()}
    ranked = sorted(oof, key=lambda v: -single[v])
    best = ranked[0]
    sel = Selection(f"best_{safe_name(best)}", {best: 1.0}, normalisation, best)
    if how == "best" or len(oof) == 1 or len(folds) < 2:
        sel.reason = "best single variant by out-of-fold Average" + (
            "" if how == "best" else " (a blend needs two variants and two folds)")
        return sel
    norm = {v: {k: normalise(oof[v][k], normalisation) for k in folds} for v in ranked}
    parts: dict[str, list] = {"blend": [], "best single": []}
    for k in folds:
        rest = [f for f in folds if f != k]
        w = greedy_weights(norm, scorers, rest, max_steps)
        parts["blend"].append(scorers[k].per_probe(blend([norm[v][k] for v in w], list(w.values()))))
        pick = max(ranked, key=lambda v: objective({f: oof[v][f] for f in rest}, {f: scorers[f] for f in rest}))
        parts["best single"].append(scorers[k].per_probe(oof[pick][k]))
    sel.crossfit = {name: pooled(p) for name, p in parts.items()}
    gain = sel.crossfit["blend"]["average"] - sel.crossfit["best single"]["average"]
    weights = greedy_weights(norm, scorers, folds, max_steps)
    if how == "blend" or (how == "auto" and gain > 0 and len(weights) > 1):
        sel.name, sel.weights = f"blend_{normalisation}_{len(weights)}v", weights
        sel.reason = (f"blend{' (asked for)' if how == 'blend' else ''}: cross-fitted out-of-fold Average "
                      f"{gain:+.4f} against the best single variant")
    else:
        sel.reason = (f"best single variant: the blend's cross-fitted out-of-fold Average was {gain:+.4f} against "
                      "it" if len(weights) > 1 else "best single variant: the search kept only one variant")
    return sel


def combine(matrices: dict[str, np.ndarray], sel: Selection) -> np.ndarray:
    """The chosen scores on one split: the single variant's matrix as is, or the normalised weighted blend."""
    if len(sel.weights) == 1:
        return matrices[next(iter(sel.weights))]
    return blend([normalise(matrices[v], sel.normalisation) for v in sel.weights], list(sel.weights.values()))
