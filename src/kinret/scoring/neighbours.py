"""Nearest neighbours by cosine among the rows of one matrix, and the exact top k of each row of a score matrix: pure
numpy (torch's threaded top-k finds the candidates), arrays in, arrays out, computed in row blocks so that memory
stays bounded whatever the number of rows."""

from __future__ import annotations

import numpy as np
import torch

from kinret.scoring.similarity import l2_normalize

_BLOCK_ENTRIES = 1 << 24  # entries of one (rows x N) similarity block: bounds memory at any gallery size


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) indices and cosine similarities of each row's k nearest rows of `x` by cosine, the row itself first,
    the others by similarity descending (ties: lower index first); k is capped at N. Computed in row blocks of
    2^24 similarities, so memory stays bounded whatever N is. The first j < k columns are `knn(x, j)` exactly (the
    order is exact), which lets one neighbour list serve several k (`Neighbours`)."""
    x = l2_normalize(x)
    n = len(x)
    k = min(k, n)
    idx = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float32)
    step = max(1, _BLOCK_ENTRIES // max(n, 1))
    for a in range(0, n, step):
        s = x[a:a + step] @ x.T
        rows = np.arange(len(s))
        own = s[rows, a + rows].copy()
        s[rows, a + rows] = np.inf  # the row itself first, whatever duplicates it has
        top = top_k(s, k)
        idx[a:a + step] = top
        sim[a:a + step] = np.take_along_axis(s, top, axis=1)
        sim[a:a + step, 0] = own
    return idx, sim


class Neighbours:
    """Each row's nearest rows of one set of unit vectors, computed once at the largest k asked for so far and
    sliced for smaller ones (exact: see `knn`): DBA and the blocked clustering of one gallery share one pass."""

    def __init__(self, x: np.ndarray, k: int = 32):
        self.x, self.k, self._found = x, k, None

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._found is None or self._found[0].shape[1] < min(k, len(self.x)):
            self._found = knn(self.x, max(k, self.k))
        idx, sim = self._found
        return idx[:, :k], sim[:, :k]


def top_k(s: np.ndarray, k: int) -> np.ndarray:
    """(P, k) columns of each row's k highest scores, highest first, ties to the lower index (exact at the k-th
    place: rows with a tie across it are sorted in full). The k + 1 highest are found by torch's threaded top-k
    (4-5x numpy's argpartition on 2 cores at 40,000 columns) and ordered; the k-th and the (k+1)-th being equal is
    a tie across the k-th place (which of the tied scores top-k returned is then arbitrary), else the first k are
    exactly the k highest."""
    s = np.ascontiguousarray(s)
    m = min(k + 1, s.shape[1])
    found = torch.from_numpy(s).topk(m, dim=1, sorted=False)
    idx, vals = found.indices.numpy(), found.values.numpy()
    order = np.lexsort((idx, -vals), axis=1)
    idx, vals = np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
    top = np.ascontiguousarray(idx[:, :k])
    if m > k:
        tied = np.flatnonzero(vals[:, k - 1] == vals[:, k])
        if tied.size:
            top[tied] = np.argsort(-s[tied], axis=1, kind="stable")[:, :k]
    return top
