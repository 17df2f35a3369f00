"""The choice: per-probe results of score matrices on labelled splits (`Scorer`), pooled over splits, and the pick
of the best single variant or a blend by their out-of-fold Average (`select`), with the reason recorded.

Blending: each variant's scores are normalised per probe (z-score or rank) and summed with non-negative weights
that sum to 1. The weights are searched on the out-of-fold Average (`search_weights`): greedy forward selection
with replacement (Caruana et al. 2004) and equal weights are the two starts, the better one is refined by coordinate
ascent (mass moved to or from one variant at a time, in steps of 40% down to 5%), over the `pool` best variants only
so that the search stays bounded with 30-60 variants. So that the reported gain is not the search's own optimism,
the search is cross-fitted: for each fold k the weights (and, for comparison, the best single variant) are chosen
on the other folds and scored on fold k. `auto` submits the blend only when the paired-bootstrap 95% interval of
that cross-fitted gain lies above zero (see `kinret.ensemble.bootstrap`); the submitted weights are then searched
on every fold.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from kinret.ensemble.blend import NORMALISATIONS, blend, normalise
from kinret.ensemble.bootstrap import LEVEL, N_BOOT, describe, excludes_zero, interval_of
from kinret.log import progress
from kinret.metrics import per_probe_results, relevance, summarise
from kinret.scoring.ranking import rank_gallery, relative_ranks
from kinret.scoring.store import safe_name

log = logging.getLogger(__name__)
STEPS = (0.4, 0.2, 0.1, 0.05)  # coordinate-ascent step sizes: the share of weight moved to or from one variant
POOL = 8  # variants a blend is searched over: the best by out-of-fold Average
T = TypeVar("T")


class Scorer:
    """Per-probe results of score matrices on one labelled split (relevance computed once). Each probe's results
    depend on its own row only, so they are computed on blocks of about `block` scores: the same numbers as on the
    whole matrix, with the (P, N) ranking and float64 work arrays never held at once."""

    def __init__(self, probe_fids: Sequence, gallery_fids: Sequence, block: int = 1 << 22):
        self.rel = relevance(probe_fids, gallery_fids)
        self.rows = max(1, block // max(self.rel.shape[1], 1))
        self.rel_rows, self.rel_cols = np.nonzero(self.rel)  # row by row: what `relative_ranks` takes
        self.n_rel = self.rel.sum(axis=1)
        self.rel_start = np.concatenate([[0], np.cumsum(self.n_rel)])

    def per_probe(self, scores: np.ndarray, trapezoid: bool = True) -> pd.DataFrame:
        """`kinret.metrics.per_probe_results` of the scores' ranking, the same numbers to the last bit, from the
        places of each probe's relatives alone (`relative_ranks`)."""
        parts = in_threads(lambda a: self._results(scores[a:a + self.rows], a, trapezoid),
                           range(0, len(self.rel), self.rows))
        columns = ("ap", "first", "ap_trapezoid") if trapezoid else ("ap", "first")
        return pd.DataFrame({c: np.concatenate([p[i] for p in parts]) for i, c in enumerate(columns)})

    def terms(self, scores: np.ndarray) -> np.ndarray:
        """Per-probe u = (standard AP + [a relative in the top 5]) / 2, whose mean is the Average: the search's
        objective without the trapezoid AP or the per-probe table."""
        parts = in_threads(lambda a: self._results(scores[a:a + self.rows], a, False),
                           range(0, len(self.rel), self.rows))
        ap, first = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return (ap + (first < 5)) / 2.0

    def _results(self, s: np.ndarray, a: int, trapezoid: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(standard AP, first relative's rank or NaN, trapezoid AP or None) of rows a.. of the matrix, `s`. The APs
        are summed over the same (rows, N) arrays `kinret.metrics.average_precision` sums (the precision terms at
        each hit, zero elsewhere), so they are its numbers to the last bit; rows where a relative ties another face
        are ranked in full (the gallery index decides their order)."""
        m, n = s.shape
        lo = self.rel_start[a]
        rows = self.rel_rows[lo:self.rel_start[a + m]] - a
        places, tied = relative_ranks(s, rows, self.rel_cols[lo:self.rel_start[a + m]])
        start = self.rel_start[a:a + m] - lo  # each row's first relative in `places`
        c, r = (np.arange(len(places)) - start[rows] + 1).astype(np.float64), places.astype(np.float64)
        n_rel, has = self.n_rel[a:a + m], self.n_rel[a:a + m] > 0
        first = np.full(m, np.nan)
        first[has] = places[start[has]]
        terms = np.zeros((m, n), dtype=np.float64)
        terms[rows, places] = c / (r + 1.0)  # precision at the c-th hit
        found = [np.divide(terms.sum(axis=1), n_rel, out=np.zeros(m), where=has)]
        if trapezoid:  # the mean of the precision just before and at the hit; 1.0 before the first place
            terms[rows, places] = (np.divide(c - 1.0, r, out=np.ones_like(r), where=r > 0) + c / (r + 1.0)) / 2.0
            found.append(np.divide(terms.sum(axis=1), n_rel, out=np.zeros(m), where=has))
        if tied.any():
            idx = np.flatnonzero(tied)
            exact = per_probe_results(rank_gallery(s[idx]), self.rel[a + idx], trapezoid)
            first[idx] = exact["first"]
            for values, column in zip(found, ("ap", "ap_trapezoid"), strict=False):
                values[idx] = exact[column]
        return found[0], first, found[1] if trapezoid else None


def pooled(parts: Sequence[pd.DataFrame]) -> dict[str, float]:
    """Metrics over the probes of several splits taken together (each probe counts once)."""
    return summarise(pd.concat(parts, ignore_index=True))


def objective(matrices: dict[str, np.ndarray], scorers: dict[str, Scorer]) -> float:
    """The pooled Average of score matrices on their splits: the mean of every probe's `Scorer.terms`."""
    return float(np.concatenate([scorers[k].terms(m) for k, m in matrices.items()]).mean())


def in_threads(fn: Callable[[Any], T], items: Sequence) -> list[T]:
    """`fn` of every item, in order, on the machine's cores: threads, as the sorts and sums of the per-probe results
    and the blend release the GIL (the values are the same as one by one; on 2 cores the weight search takes about
    0.45x the time)."""
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(c) for c in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def greedy_weights(norm: dict[str, dict[str, np.ndarray]], scorers: dict[str, Scorer], folds: Sequence[str],
                   max_steps: int = 10) -> dict[str, float]:
    """Forward selection with replacement: start empty, add the variant (again, possibly) that raises the pooled
    Average over `folds` the most; stop when nothing raises it or after `max_steps`. Weights = counts / total.
    `norm` (variant -> split -> normalised matrix) is ordered best single first, which breaks ties."""
    counts: Counter[str] = Counter()
    current = {k: np.zeros_like(next(iter(norm.values()))[k]) for k in folds}
    best_obj = -np.inf
    for _ in range(max_steps):
        found = in_threads(lambda v, base=current: objective({k: base[k] + norm[v][k] for k in folds}, scorers),
                             list(norm))
        step = max(((f, -i, v) for i, (v, f) in enumerate(zip(norm, found, strict=True))), default=None)
        if step is None or step[0] <= best_obj + 1e-12:
            break
        best_obj, v = step[0], step[2]
        counts[v] += 1
        current = {k: current[k] + norm[v][k] for k in folds}
    total = sum(counts.values())
    return {v: c / total for v, c in counts.items()}


def moves(w: np.ndarray, i: int, steps: Sequence[float] = STEPS) -> list[np.ndarray]:
    """Points of the simplex next to `w` along variant i: w' = (1 - t) w + t e_i (mass t moved to i from the others
    in proportion) and w' = (w - d e_i) / (1 - d), d = min(t, w_i) (mass moved from i), for t in `steps`; removing
    i altogether (d = w_i) is always among them. Moves that change nothing or empty the simplex are left out."""
    out: list[np.ndarray] = []
    e = np.zeros_like(w)
    e[i] = 1.0
    if w[i] < 1.0:
        out += [(1.0 - t) * w + t * e for t in steps]
    if 0.0 < w[i] < 1.0:
        for d in sorted({min(t, w[i]) for t in steps} | {w[i]}):
            out.append(np.clip(w - d * e, 0.0, None) / (1.0 - d))
    return out


def coordinate_ascent(norm: dict[str, dict[str, np.ndarray]], scorers: dict[str, Scorer], folds: Sequence[str],
                      start: dict[str, float], max_rounds: int = 3, max_evals: int = 300
                      ) -> tuple[dict[str, float], float]:
    """Maximise the pooled Average over `folds` of the blend sum_v w_v norm[v] over the simplex (w >= 0, sum 1),
    from `start`: each round visits every variant and takes the best of its `moves` if it raises the Average; stops
    after a round without a gain, `max_rounds` rounds or `max_evals` evaluations. Returns (weights, Average)."""
    names = list(norm)

    def f(w: np.ndarray) -> float:
        return objective({k: blend([norm[v][k] for v in names], w) for k in folds}, scorers)

    w = np.array([start.get(v, 0.0) for v in names], dtype=np.float64)
    w /= w.sum()
    best, evals = f(w), 1
    for _ in range(max_rounds):
        improved = False
        for i in range(len(names)):
            cands = moves(w, i)[: max(0, max_evals - evals)]
            evals += len(cands)
            scored = in_threads(f, cands)
            j = int(np.argmax(scored)) if scored else -1  # the first of equal bests
            if j >= 0 and scored[j] > best + 1e-12:
                best, w, improved = scored[j], cands[j], True
        if not improved or evals >= max_evals:
            break
    return {v: float(x) for v, x in zip(names, w, strict=True) if x > 0}, best  # in `norm` order: the same sum


def search_weights(norm: dict[str, dict[str, np.ndarray]], scorers: dict[str, Scorer], folds: Sequence[str],
                   max_steps: int = 10) -> dict[str, float]:
    """Blend weights over the variants of `norm` (ordered best first) maximising the pooled Average over `folds`:
    the better start of greedy forward selection and equal weights (greedy on a tie), refined by
    `coordinate_ascent`. Never below the equal-weight blend's Average on `folds`."""
    greedy = greedy_weights(norm, scorers, folds, max_steps)
    equal = {v: 1.0 / len(norm) for v in norm}
    scores = in_threads(lambda w: objective({k: blend([norm[v][k] for v in w], list(w.values())) for k in folds},
                                              scorers), [greedy, equal])
    start = greedy if scores[0] >= scores[1] else equal
    return coordinate_ascent(norm, scorers, folds, start)[0]


@dataclass(frozen=True)
class Selection:
    """What was chosen and why: the weights (one variant at weight 1 for a single pick), the cross-fitted
    comparison, the paired-bootstrap interval of the blend's cross-fitted gain (`gain`: delta, lo, hi), the name the
    submission files carry; and every variant's out-of-fold interval against `reference` (`with_reference`)."""

    name: str
    weights: dict[str, float]
    normalisation: str
    best_single: str
    crossfit: dict[str, dict[str, float]] = field(default_factory=dict)  # "blend" / "best single" -> metrics
    reason: str = ""
    gain: dict[str, float] = field(default_factory=dict)  # the blend's cross-fitted gain: delta, lo, hi
    search: str = ""  # how the blend weights were found
    reference: str = ""
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> delta, lo, hi vs reference
    final_fit: dict[str, object] = field(default_factory=dict)  # which refit models the submitted test scores use

    def with_reference(self, reference: str, intervals: dict[str, dict[str, float]]) -> Selection:
        """This choice with every variant's interval against `reference` on the split group it was made on."""
        return replace(self, reference=reference, intervals=intervals)

    def to_json(self, settings: dict[str, object] | None = None) -> str:
        """The choice as JSON; `settings`, the options it was made with, are saved beside it."""
        return json.dumps({"name": self.name, "weights": self.weights, "normalisation": self.normalisation,
                           "best_single": self.best_single, "crossfit": self.crossfit, "reason": self.reason,
                           "crossfit_gain": self.gain, "search": self.search, "reference": self.reference,
                           "intervals_vs_reference": self.intervals, "final_fit": self.final_fit,
                           "settings": settings or {}},
                          indent=2, default=str) + "\n"


def _crossfit(per_probe: dict[str, dict[str, pd.DataFrame]], scorers: dict[str, Scorer], norm: Callable,
              ranked: list[str], pool: int, max_steps: int
              ) -> tuple[dict[str, pd.DataFrame], np.ndarray, dict[str, float]]:
    """Per fold k: the blend searched on the other folds and the best single variant picked there, both scored on
    fold k; then the blend searched on every fold (the weights a blend would be submitted with). Returns the
    per-probe results of each (folds in order), the fold of each probe row, and the weights searched on every
    fold."""
    folds = sorted(scorers)
    parts: dict[str, list[pd.DataFrame]] = {"blend": [], "best single": []}
    weights: dict[str, float] = {}
    for k in progress([*folds, None], desc="blend weight search (each fold left out, then none)", unit="search"):
        if k is None:
            weights = search_weights({v: norm(v) for v in ranked[:pool]}, scorers, folds, max_steps)
            continue
        rest = [f for f in folds if f != k]
        on_rest = {v: pooled([per_probe[v][f] for f in rest])["average"] for v in ranked}
        order = sorted(ranked, key=lambda v: -on_rest[v])
        w = search_weights({v: norm(v) for v in order[:pool]}, scorers, rest, max_steps)
        parts["blend"].append(scorers[k].per_probe(blend([norm(v)[k] for v in w], list(w.values()))))
        parts["best single"].append(per_probe[order[0]][k])
    strata = np.concatenate([[k] * len(p) for k, p in zip(folds, parts["blend"], strict=True)])
    return {n: pd.concat(p, ignore_index=True) for n, p in parts.items()}, strata, weights


def decide(how: str, n_weights: int, gain: dict[str, float]) -> bool:
    """Whether to submit the blend: when asked for ("blend"), or under "auto" when it holds two or more variants
    and the lower end of the interval of its cross-fitted gain over the best single variant lies above 0."""
    return how == "blend" or (how == "auto" and n_weights > 1 and excludes_zero(gain))


def _reason(how: str, weights: dict[str, float], gain: dict[str, float], blended: bool) -> str:
    """The decision in plain words, e.g. "the blend gained +0.012 out of fold (cross-fitted), but its 95% interval
    [-0.010, +0.034] includes 0: submitted the best single variant"."""
    d = gain["delta"]
    moved = ("did as well as the best single variant (a difference under 0.0005)" if round(d, 3) == 0
             else f"gained {d:+.3f} against the best single variant" if d > 0
             else f"lost {-d:.3f} against the best single variant")
    iv = f"its {LEVEL:.0%} interval [{gain['lo']:+.3f}, {gain['hi']:+.3f}]"
    said = f"the blend {moved} out of fold (cross-fitted)"
    if how == "blend":
        return f"blend (asked for): {said}, {iv}"
    if blended:
        return f"{said}, and {iv} lies above 0: submitted the blend"
    if len(weights) < 2:
        return f"the weight search kept only one variant: submitted the best single variant ({said})"
    where = "lies below 0" if gain["hi"] < 0 else "includes 0"
    return f"{said}, {'but' if round(d, 3) > 0 else 'and'} {iv} {where}: submitted the best single variant"


def select(oof: dict[str, dict[str, np.ndarray]], scorers: dict[str, Scorer], how: str = "auto",
           normalisation: str = "z", max_steps: int = 10, pool: int = POOL, n_boot: int = N_BOOT, seed: int = 0,
           per_probe: dict[str, dict[str, pd.DataFrame]] | None = None) -> Selection:
    """Choose from `oof` (variant -> oof split -> scores): how = "best" (the best single variant by pooled
    out-of-fold Average), "blend", or "auto" (the blend only when the paired-bootstrap interval, `n_boot` resamples
    within folds seeded by `seed`, of its cross-fitted gain over the cross-fitted best single variant lies above 0).
    `per_probe` (variant -> split -> results), when given, saves scoring each variant again."""
    if not oof:
        raise ValueError("no variants to choose from")
    if how not in ("auto", "best", "blend"):
        raise ValueError(f"unknown choice {how!r}; choose auto, best or blend")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; choose one of {NORMALISATIONS}")
    if pool < 1:
        raise ValueError(f"the blend pool must hold at least one variant, got {pool}")
    folds = sorted(scorers)
    per_probe = per_probe or {v: {k: scorers[k].per_probe(m[k]) for k in folds} for v, m in oof.items()}
    single = {v: pooled([per_probe[v][k] for k in folds])["average"] for v in oof}
    ranked = sorted(oof, key=lambda v: -single[v])
    best = ranked[0]
    picked = Selection(f"best_{safe_name(best)}", {best: 1.0}, normalisation, best)
    if how == "best" or len(oof) == 1 or len(folds) < 2:
        return replace(picked, reason="best single variant by out-of-fold Average" + (
            " (asked for)" if how == "best" else " (a blend needs two variants and two folds)"))
    cache: dict[str, dict[str, np.ndarray]] = {}

    def norm(v: str) -> dict[str, np.ndarray]:
        if v not in cache:
            cache[v] = {k: normalise(oof[v][k], normalisation) for k in folds}
        return cache[v]

    parts, strata, weights = _crossfit(per_probe, scorers, norm, ranked, pool, max_steps)
    gain = interval_of(parts["blend"], parts["best single"], strata, n_boot, seed)
    blended = decide(how, len(weights), gain)
    reason = _reason(how, weights, gain, blended)
    log.debug("blend gain %s: %s", describe(gain), reason)  # the commands print the reason once, in their summary
    return replace(picked, **({"name": f"blend_{normalisation}_{len(weights)}v", "weights": weights} if blended
                              else {}),
                   crossfit={name: summarise(p) for name, p in parts.items()}, reason=reason, gain=gain,
                   search=f"greedy forward selection ({max_steps} steps) or equal weights, then coordinate ascent, "
                          f"over the {min(pool, len(ranked))} best variants; interval: {n_boot} paired resamples "
                          "within folds")


def combine(matrices: Mapping[str, np.ndarray], sel: Selection) -> np.ndarray:
    """The chosen scores on one split: the single variant's matrix as is, or the normalised weighted blend (`blend`'s
    sum, one variant's matrix read from `matrices` and normalised at a time)."""
    if len(sel.weights) == 1:
        return matrices[next(iter(sel.weights))]
    out = None
    for v, w in sel.weights.items():
        part = normalise(matrices[v], sel.normalisation)
        out = np.zeros_like(part, dtype=np.float32) if out is None else out
        if w:
            out += np.float32(w) * part
        del part
    return out
