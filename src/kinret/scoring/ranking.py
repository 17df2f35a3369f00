"""From a (P, N) score matrix to one ranking of the whole gallery per probe (highest score first, ties to the lower
gallery index), and the check that a ranking holds a permutation per row: pure numpy, no I/O."""

from __future__ import annotations

import sys

import numpy as np
from numpy.typing import DTypeLike

_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)  # uint32 halves of a uint64


def _descending_keys(bits: np.ndarray) -> np.ndarray:
    """uint32 keys of float32 bit patterns whose ascending order is the floats' descending order (-inf last)."""
    key = bits >> 31
    key -= np.uint32(1)  # 0xFFFFFFFF for a positive float, 0 for a negative one
    key >>= 1
    key ^= bits  # positive: flip all but the sign bit; negative: the bits as they are
    return key


def _rank_float32(scores: np.ndarray, out: np.ndarray) -> None:
    """Stable descending rank of float32 rows into `out`: one sort of uint64 (key << 32 | column), whose keys are
    unique, so the vectorised (unstable) sort gives the stable order, ~10x faster than a stable argsort."""
    rows, n = scores.shape
    bits = (scores + np.float32(0.0)).view(np.uint32)  # -0.0 becomes 0.0, so the two tie as they compare equal
    packed = np.empty((rows, n), dtype=np.uint64)
    halves = packed.view(np.uint32).reshape(rows, n, 2)
    halves[..., _HIGH] = _descending_keys(bits)
    halves[..., _LOW] = np.arange(n, dtype=np.uint32)
    packed.sort(axis=1)
    out[...] = halves[..., _LOW]


def rank_gallery(scores: np.ndarray, dtype: DTypeLike = np.int64, chunk_rows: int = 256) -> np.ndarray:
    """(P, N) scores -> (P, N) ranking of integer `dtype` (int64 unless asked), highest score first; ties go to the
    lower gallery index.

    NaN is refused (its place in an order is undefined); -inf ranks last. float32 scores are ranked `chunk_rows`
    rows at a time through a key sort, other dtypes by a stable argsort; both give the same order.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (P, N) matrix, got shape {scores.shape}")
    if np.isnan(scores).any():
        row = int(np.argwhere(np.isnan(scores))[0, 0])
        raise ValueError(f"score matrix holds NaN (first in probe row {row})")
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or scores.shape[1] - 1 > np.iinfo(dtype).max:
        raise ValueError(f"dtype {dtype} cannot hold gallery indices up to {scores.shape[1] - 1}")
    if scores.dtype != np.float32 or scores.shape[1] >= 2**32:
        # a stable sort of the negated scores keeps equal scores in index order
        return np.argsort(-scores, axis=1, kind="stable").astype(dtype, copy=False)
    out = np.empty(scores.shape, dtype=dtype)
    for i in range(0, scores.shape[0], chunk_rows):
        _rank_float32(scores[i:i + chunk_rows], out[i:i + chunk_rows])
    return out


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


def float16_ranks_alike(scores: np.ndarray, chunk_rows: int = 256) -> bool:
    """Whether `scores` cast to float16 rank every row exactly as they do: the cast keeps the order of any two faces
    but may tie two that differ, and a new tie goes to the lower gallery index, which changes the ranking unless
    that face was ranked first anyway. So the ranking stays the same exactly when, walking each row in its ranking
    order, every pair of neighbours the cast ties keeps its gallery indices ascending (and no score overflows)."""
    scores = np.asarray(scores)
    for i in range(0, scores.shape[0], chunk_rows):
        block = scores[i:i + chunk_rows]
        order = rank_gallery(block)
        with np.errstate(over="ignore"):
            half = block.astype(np.float16)
        if not np.isfinite(half).all():
            return False
        walked = np.take_along_axis(half, order, axis=1)
        tied = walked[:, 1:] == walked[:, :-1]
        if (tied & (order[:, 1:] < order[:, :-1])).any():
            return False
    return True


def descending_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys of float32 scores whose ascending order is `rank_gallery`'s order of the scores (highest first;
    -0.0 equal to 0.0)."""
    return _descending_keys((np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.uint32))


def relative_ranks(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 0-based places `rank_gallery` gives the faces (rows[i], cols[i]) (each probe's relatives) in their rows:
    a face's place is the number of faces of its row that score higher. Returns (the places, each row's in
    ascending order, one flat array in row order; `tied`, the rows where a relative's score equals another face's,
    whose places need the gallery indices: rank those rows instead). `rows` must be sorted ascending.

    Each row's keys are sorted (without the gallery index `rank_gallery` packs beside them: ~3x faster) and each
    relative is looked up in them: no (P, N) ranking, no hit matrix."""
    n_rows = scores.shape[0]
    keys = np.sort(descending_keys(scores), axis=1)
    wanted = descending_keys(scores[rows, cols])
    start = np.searchsorted(rows, np.arange(n_rows + 1))
    places = np.empty(len(rows), dtype=np.int64)
    tied = np.zeros(n_rows, dtype=bool)
    for r in np.flatnonzero(np.diff(start)):
        a, b = start[r], start[r + 1]
        left = np.searchsorted(keys[r], wanted[a:b], "left")
        tied[r] = bool((np.searchsorted(keys[r], wanted[a:b], "right") - left > 1).any())
        places[a:b] = np.sort(left)
    return places, tied
