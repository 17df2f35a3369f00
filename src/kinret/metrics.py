"""Track-3 retrieval metrics as pure numpy functions.

Conventions shared by every function here:
- a *ranking* is a (P, N) integer array; row i lists all N gallery indices for probe i, best first;
- *relevant* means same family id as the probe;
- ties in scores are broken by lower gallery index first (see `kinret.scoring.ranking.rank_gallery`);
- a probe with no relative in the gallery has AP 0 and never a Rank@K hit, but still counts in every mean.

>>> hits = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=bool)
>>> average_precision(hits).round(4).tolist()
[0.7222, 0.25]
>>> average_precision(hits, "trapezoid").round(4).tolist()
[0.6778, 0.125]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

RANK_KS = (1, 5, 10, 20, 50)
AP_VARIANTS = ("standard", "trapezoid")


def family_codes(probe_fids: Sequence, gallery_fids: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the family ids, shared by probes and gallery: equal codes mean the same family."""
    _, codes = np.unique(np.concatenate([np.asarray(probe_fids, dtype=object), np.asarray(gallery_fids, dtype=object)])
                         .astype(str), return_inverse=True)
    return codes[: len(probe_fids)], codes[len(probe_fids):]


def relevance(probe_fids: Sequence, gallery_fids: Sequence) -> np.ndarray:
    """(P, N) boolean matrix: `rel[i, j]` is True when gallery face j has probe i's family id."""
    p, g = family_codes(probe_fids, gallery_fids)
    return p[:, None] == g[None, :]


def hits_in_rank_order(ranking: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(P, N) boolean: `hits[i, r]` is True when the gallery face ranked r-th (0-based) for probe i is relevant."""
    return np.take_along_axis(relevant, ranking, axis=1)


def _standard_ap(hits: np.ndarray) -> np.ndarray:
    """AP = (1/R) * sum over relatives of precision at the relative's rank; R = number of relatives."""
    n_rel = hits.sum(axis=1)
    cum = np.cumsum(hits, axis=1, dtype=np.float64)
    ranks = np.arange(1, hits.shape[1] + 1, dtype=np.float64)
    total = np.where(hits, cum / ranks, 0.0).sum(axis=1)
    return np.divide(total, n_rel, out=np.zeros_like(total), where=n_rel > 0)


def _trapezoid_ap(hits: np.ndarray) -> np.ndarray:
    """The organisers' AP: (1/R) * sum over relatives of (p_before + p_at) / 2, where for the c-th relative
    (1-based) at 0-based rank r, p_at = c / (r + 1) and p_before = (c - 1) / r, or 1.0 when r = 0."""
    n_rel = hits.sum(axis=1)
    cum = np.cumsum(hits, axis=1, dtype=np.float64)
    r = np.arange(hits.shape[1], dtype=np.float64)
    p_at = cum / (r + 1.0)
    p_before = np.divide(cum - 1.0, r, out=np.ones_like(cum), where=r > 0)
    total = np.where(hits, (p_before + p_at) / 2.0, 0.0).sum(axis=1)
    return np.divide(total, n_rel, out=np.zeros_like(total), where=n_rel > 0)


_AP = {"standard": _standard_ap, "trapezoid": _trapezoid_ap}


def average_precision(hits: np.ndarray, variant: str = "standard") -> np.ndarray:
    """Per-probe AP over the full ranked gallery, `variant` "standard" or "trapezoid" (see the module docstring
    and the two private functions for the formulas). A probe with no relative gets 0."""
    if variant not in _AP:
        raise ValueError(f"unknown AP variant {variant!r}; choose one of {AP_VARIANTS}")
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2:
        raise ValueError(f"hits must be a (P, N) matrix, got shape {hits.shape}")
    return _AP[variant](hits)


def first_hit_rank(hits: np.ndarray) -> np.ndarray:
    """0-based rank of each probe's first relative; N (one past the end) when it has none."""
    hits = np.asarray(hits, dtype=bool)
    return np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])


def cmc_curve(hits: np.ndarray) -> np.ndarray:
    """CMC: `cmc[k - 1]` = share of probes with at least one relative in the top k, for k = 1..N."""
    first = first_hit_rank(hits)
    n = hits.shape[1]
    counts = np.bincount(first, minlength=n + 1)[:n]
    return np.cumsum(counts) / hits.shape[0]


def _rank_from_first(first: np.ndarray, n_gallery: int, ks: Sequence[int]) -> dict[int, float]:
    first = np.where(first < n_gallery, first, np.iinfo(np.int64).max)  # no relative: never a hit
    return {int(k): float(np.mean(first < k)) for k in ks}


def rank_at_k(hits: np.ndarray, ks: Sequence[int] = RANK_KS) -> dict[int, float]:
    """Rank@K = share of probes with a relative in the top K; K beyond the gallery size means the whole gallery."""
    hits = np.asarray(hits, dtype=bool)
    return _rank_from_first(first_hit_rank(hits), hits.shape[1], ks)


def per_probe_results(ranking: np.ndarray, relevant: np.ndarray, trapezoid: bool = True) -> pd.DataFrame:
    """One row per probe of a ranking: `ap` (standard AP), `first` (0-based rank of its first relative, NaN when it
    has none) and, with `trapezoid`, `ap_trapezoid`. Tables of several splits concatenate into one pool."""
    hits = hits_in_rank_order(ranking, relevant)
    first = first_hit_rank(hits).astype(np.float64)
    first[~hits.any(axis=1)] = np.nan
    out = pd.DataFrame({"ap": average_precision(hits, "standard"), "first": first})
    if trapezoid:
        out["ap_trapezoid"] = average_precision(hits, "trapezoid")
    return out


def summarise(results: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Metrics of a pool of per-probe results (each probe counts once, whatever split it came from): mAP,
    rank{k} for each k, mAP_trapezoid when present, and Average = (mAP + Rank@5) / 2."""
    first = results["first"].to_numpy()
    out = {"mAP": float(results["ap"].to_numpy().mean())}
    with np.errstate(invalid="ignore"):  # NaN (no relative) is never a hit
        out.update({f"rank{k}": float(np.mean(first < k)) for k in sorted(set(ks) | {5})})
    if "ap_trapezoid" in results:
        out["mAP_trapezoid"] = float(results["ap_trapezoid"].to_numpy().mean())
    out["average"] = (out["mAP"] + out["rank5"]) / 2
    return out


@dataclass(frozen=True)
class Track3Scores:
    """Every number the organisers report, plus per-probe AP. `average` = (mAP + Rank@5) / 2."""

    ap_variant: str
    mAP: float
    rank: dict[int, float]
    n_probes: int
    n_gallery: int
    per_probe_ap: np.ndarray = field(repr=False, compare=False)

    @property
    def average(self) -> float:
        return (self.mAP + self.rank[5]) / 2.0

    def as_dict(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {"mAP": self.mAP}
        out.update({f"rank@{k}": v for k, v in self.rank.items()})
        out.update(average=self.average, ap=self.ap_variant, n_probes=self.n_probes, n_gallery=self.n_gallery)
        return out

    def table(self) -> str:
        rows = [(f"mAP ({self.ap_variant} AP)", self.mAP)]
        rows += [(f"Rank@{k}", v) for k, v in self.rank.items()]
        rows.append(("Average = (mAP + Rank@5) / 2", self.average))
        width = max(len(r[0]) for r in rows)
        lines = [f"Track 3: {self.n_probes} probes x {self.n_gallery} gallery faces"]
        lines += [f"  {name:<{width}}  {value:.4f}" for name, value in rows]
        return "\n".join(lines)


def evaluate_ranking(ranking: np.ndarray, probe_fids: Sequence, gallery_fids: Sequence, ap: str = "standard",
                     ks: Sequence[int] = RANK_KS) -> Track3Scores:
    """Score a (P, N) ranking against family ids; `ranking` must hold a permutation of 0..N-1 per row."""
    ranking = np.asarray(ranking)
    if ranking.shape != (len(probe_fids), len(gallery_fids)):
        raise ValueError(f"ranking shape {ranking.shape} != ({len(probe_fids)} probes, {len(gallery_fids)} gallery)")
    if 5 not in ks:
        ks = tuple(sorted(set(ks) | {5}))
    hits = hits_in_rank_order(ranking, relevance(probe_fids, gallery_fids))
    per_probe = average_precision(hits, ap)
    return Track3Scores(ap, float(per_probe.mean()), rank_at_k(hits, ks), ranking.shape[0], ranking.shape[1],
                        per_probe)


def chance_level(probe_fids: Sequence, gallery_fids: Sequence, ks: Sequence[int] = RANK_KS) -> dict[str, float]:
    """Expected standard mAP, Rank@K and Average of a uniformly random ranking, in closed form.

    For a probe with R relatives among N: E[AP] = (H_N + (R - 1) / (N - 1) * (N - H_N)) / N with H_N the N-th
    harmonic number (a relative at rank k has on average (k - 1)(R - 1)/(N - 1) relatives above it), and
    P(hit in top K) = 1 - C(N - R, K) / C(N, K). Probes with R = 0 contribute 0 to both.
    """
    rel = relevance(probe_fids, gallery_fids).sum(axis=1).astype(np.float64)
    n = len(gallery_fids)
    h_n = float(np.sum(1.0 / np.arange(1, n + 1)))
    ap = np.where(rel > 0, (h_n + (rel - 1) / max(n - 1, 1) * (n - h_n)) / n, 0.0)
    out = {"mAP": float(ap.mean())}
    for k in ks:
        k_eff = min(int(k), n)
        # C(N-R, K) / C(N, K) = prod_{i<K} (N - R - i) / (N - i), zero once N - R - i hits 0
        i = np.arange(k_eff, dtype=np.float64)
        miss = np.prod(np.clip((n - rel[:, None] - i) / (n - i), 0.0, None), axis=1)
        out[f"rank@{k}"] = float(np.mean(np.where(rel > 0, 1.0 - miss, 0.0)))
    out["average"] = (out["mAP"] + out["rank@5"]) / 2.0
    return out


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting 1/2
    (the Mann–Whitney U statistic from mid-ranks). NaN when either class is empty.

    >>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = mid_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranks(x: np.ndarray, ties: str = "average") -> np.ndarray:
    """1-based ranks of `x` along its last axis, ascending; tied values share their mean rank ("average") or their
    lowest ("min"), as scipy's `rankdata` gives them (whose import costs a training process over a second); a row
    holding a NaN is all NaN, as scipy propagates it. The kit's one rank implementation.

    >>> ranks(np.array([[3.0, 1.0, 3.0, 2.0]])).tolist(), ranks(np.array([3.0, 1.0, 3.0, 2.0]), "min").tolist()
    ([[3.5, 1.0, 3.5, 2.0]], [3.0, 1.0, 3.0, 2.0])
    """
    if ties not in ("average", "min"):
        raise ValueError(f"ties must be 'average' or 'min', not {ties!r}")
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    order = np.argsort(x, axis=-1, kind="mergesort")
    xs = np.take_along_axis(x, order, axis=-1)
    idx = np.broadcast_to(np.arange(n), xs.shape)
    first = np.ones(xs.shape, dtype=bool)
    first[..., 1:] = xs[..., 1:] != xs[..., :-1]  # where a group of equal values begins
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=-1)
    if ties == "min":
        sorted_ranks = start + 1.0
    else:
        last = np.ones(xs.shape, dtype=bool)
        last[..., :-1] = first[..., 1:]  # where a group ends
        end = np.flip(np.minimum.accumulate(np.flip(np.where(last, idx, n), -1), axis=-1), -1)
        sorted_ranks = (start + end) / 2.0 + 1.0
    out = np.empty(xs.shape)
    np.put_along_axis(out, order, sorted_ranks, axis=-1)
    out[np.isnan(x).any(axis=-1)] = np.nan
    return out


def mid_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` (flattened) where ties share their mean rank: `ranks` with ties "average"."""
    return ranks(np.asarray(x, dtype=np.float64).ravel())


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1); tied scores
    move both rates at once, so the trapezoid area under these points equals `roc_auc`.

    >>> fpr, tpr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC curve needs both classes; got {n_pos} positive and {n_neg} negative scores")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the end of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]
