"""From per-image features or scores to one ranking of the whole gallery per probe: pure numpy, no I/O.

Stages: `l2_normalize` -> `cosine_scores` (per probe image) -> `aggregate` over a probe's images ->
`rank_gallery`. For cosine with mean aggregation, `mean_embedding` gives the same order as the mean of the
per-image cosines (the mean of unit vectors dotted with a gallery vector is that mean of cosines, and
renormalising divides a whole row by one positive number), at a fraction of the cost, so only it is computed.
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("mean", "max")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def cosine_scores(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, N) float32 cosine similarity between every query row and every gallery row."""
    return l2_normalize(queries) @ l2_normalize(gallery).T


def _check_owner(owner: np.ndarray, n_rows: int, n_probes: int) -> np.ndarray:
    owner = np.asarray(owner)
    if owner.shape != (n_rows,):
        raise ValueError(f"owner has shape {owner.shape}, expected ({n_rows},)")
    if n_rows and (owner.min() < 0 or owner.max() >= n_probes):
        raise ValueError(f"owner indices must lie in 0..{n_probes - 1}")
    if np.any(np.bincount(owner, minlength=n_probes) == 0):
        raise ValueError(f"probe {int(np.argmin(np.bincount(owner, minlength=n_probes)))} has no image")
    return owner


def mean_embedding(features: np.ndarray, owner: np.ndarray, n_probes: int) -> np.ndarray:
    """Early fusion: per probe, the mean of its L2-normalised image features, normalised again. (n_probes, D)."""
    feats = l2_normalize(features)
    owner = _check_owner(owner, len(feats), n_probes)
    sums = np.zeros((n_probes, feats.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, feats)
    return l2_normalize(sums.astype(np.float32))


def aggregate(image_scores: np.ndarray, owner: np.ndarray, n_probes: int, how: str = "mean") -> np.ndarray:
    """Late fusion: combine per-image score rows (M, N) into per-probe rows (n_probes, N) by `how` (mean, max).

    `owner[m]` is the probe that image row m belongs to; rows need not be grouped. -inf scores (an unreadable
    gallery face) stay -inf under both.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    scores = np.asarray(image_scores, dtype=np.float32)
    owner = _check_owner(owner, scores.shape[0], n_probes)
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=n_probes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    grouped = scores[order]
    if how == "max":
        return np.maximum.reduceat(grouped, starts, axis=0)
    with np.errstate(invalid="ignore"):
        return (np.add.reduceat(grouped, starts, axis=0) / counts[:, None]).astype(np.float32)


def rank_gallery(scores: np.ndarray) -> np.ndarray:
    """(P, N) scores -> (P, N) int64 ranking, highest score first; ties go to the lower gallery index.

    NaN is refused (its place in an order is undefined); -inf ranks last.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (P, N) matrix, got shape {scores.shape}")
    if np.isnan(scores).any():
        row = int(np.argwhere(np.isnan(scores))[0, 0])
        raise ValueError(f"score matrix holds NaN (first in probe row {row})")
    # a stable sort of the negated scores keeps equal scores in index order
    return np.argsort(-scores, axis=1, kind="stable")


def first_non_permutation(ranking: np.ndarray) -> int | None:
    """Index of the first row that is not a permutation of 0..N-1, or None when every row is one."""
    ranking = np.asarray(ranking)
    if ranking.ndim != 2:
        raise ValueError(f"ranking must be a (P, N) matrix, got shape {ranking.shape}")
    p, n = ranking.shape
    in_range = ((ranking >= 0) & (ranking < n)).all(axis=1)
    seen = np.zeros((p, n), dtype=bool)
    rows = np.broadcast_to(np.arange(p)[:, None], ranking.shape)
    seen[rows[in_range], ranking[in_range]] = True  # N in-range values fill N slots only without a repeat
    bad = np.flatnonzero(~(in_range & seen.all(axis=1)))
    return int(bad[0]) if bad.size else None
