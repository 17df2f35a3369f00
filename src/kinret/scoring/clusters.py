"""Gallery faces grouped into identities: average linkage on cosine distance cut at a threshold relative to the
gallery's own spread of cosines, exact per connected component of the pairs within it (or, on large galleries, per
block of a nearest-neighbour graph). Pure numpy/scipy."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from scipy.spatial.distance import squareform

from kinret.scoring.neighbours import Neighbours
from kinret.scoring.similarity import l2_normalize


def relative_threshold(gallery: np.ndarray, z: float) -> float:
    """Cosine distance 1 - (mu + z sigma), mu and sigma the mean and standard deviation of the cosine similarity over
    all pairs of distinct gallery faces, in closed form (O(N D^2), no N x N matrix): with unit rows g_i,
    sum_{i != j} s_ij = |sum_i g_i|^2 - N and sum_{i != j} s_ij^2 = ||G^T G||_F^2 - N. A threshold z standard
    deviations above the typical pair transfers across embedding sources whose cosine scales differ."""
    g = l2_normalize(gallery).astype(np.float64)
    n = len(g)
    if n < 2:
        return 0.0
    norms = (g * g).sum(axis=1)
    pairs = n * (n - 1)
    mu = (np.square(g.sum(axis=0)).sum() - norms.sum()) / pairs
    second = (np.square(g.T @ g).sum() - np.square(norms).sum()) / pairs
    return float(1.0 - (mu + z * np.sqrt(max(second - mu * mu, 0.0))))


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Cluster labels renumbered 0..C-1 in the order of each cluster's first face."""
    _, first, inverse = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse.ravel()]


def _linkage_labels(d: np.ndarray, threshold: float) -> np.ndarray:
    """Flat clusters of average linkage on a square float32 distance matrix, cut where merges exceed `threshold`."""
    if len(d) < 2:
        return np.zeros(len(d), dtype=np.int64)
    return fcluster(linkage(squareform(d, checks=False), "average"), t=threshold, criterion="distance") - 1


def _distances(g: np.ndarray) -> np.ndarray:
    """Cosine distances of unit rows, (N, N) float32 (BLAS, several times faster than pdist's cosine; a zero row is
    at distance 1 from every face)."""
    full = g @ g.T
    np.subtract(1.0, full, out=full)
    np.clip(full, 0.0, 2.0, out=full)  # rounding
    np.fill_diagonal(full, 0.0)
    return full


def _average_linkage(g: np.ndarray, threshold: float) -> np.ndarray:
    """Exact average linkage (cosine distance) of unit rows, cut where the merge distance exceeds `threshold`: run
    per connected component of the pairs within `threshold` (a cluster cut there never spans two: its average
    distance would exceed it), on the same distances, so N^2/2 distances are never linked at once."""
    if len(g) < 3:
        return _linkage_labels(_distances(g), threshold)
    full = _distances(g)
    src, dst = np.nonzero(full <= threshold)  # both directions of each pair: the components are the same
    comp = _components(src, dst, len(g))
    labels = comp.astype(np.int64) * len(g)  # a cluster of a component: comp * N + its label within it
    for members in _groups(comp):
        if len(members) > 2:  # a pair joined by an edge is one cluster already
            labels[members] += _linkage_labels(full[np.ix_(members, members)], threshold)
    return labels


def _components(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    graph = sparse.coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _groups(labels: np.ndarray) -> list[np.ndarray]:
    """The indices of each label's members, ascending, labels in ascending order."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)


def _capped_blocks(src: np.ndarray, dst: np.ndarray, dist: np.ndarray, n: int, max_block: int) -> np.ndarray:
    """(n,) block of each node: the minimum spanning forest of the graph of edges (src, dst, dist), its edges joined
    shortest first (single linkage) unless the joined block would exceed `max_block` nodes. Without the cap the
    blocks are the graph's connected components; with it, the tightest groups stay whole. Union-find over the
    forest's <= n - 1 edges: the one Python loop, as Kruskal's joins are sequential."""
    weights = sparse.coo_matrix((dist.astype(np.float64) + 1.0, (src, dst)), shape=(n, n)).tocsr()  # +1: keep d = 0
    forest = minimum_spanning_tree(weights).tocoo()
    order = np.argsort(forest.data, kind="stable")
    parent, size = list(range(n)), [1] * n

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(forest.row[order].tolist(), forest.col[order].tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb and size[ra] + size[rb] <= max_block:
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
    roots = np.array(parent, dtype=np.int64)
    while not np.array_equal(roots[roots], roots):  # pointer jumping to each node's root
        roots = roots[roots]
    return roots


def gallery_clusters(gallery: np.ndarray, threshold: float, exact_max: int = 8000, k: int = 32,
                     max_block: int = 2000, neighbours: Neighbours | None = None) -> np.ndarray:
    """(N,) identity labels 0..C-1 (numbered by first face): average linkage on cosine distance, merges up to
    `threshold` (scipy.cluster.hierarchy).

    An average-linkage cluster cut at t lies inside one connected component of the graph of pairs at distance
    <= t (an average <= t needs one pair <= t), so linkage per component is exact. Up to `exact_max` faces the graph
    holds every pair (an N x N float32 matrix); above, it is built from each face's `k` nearest neighbours
    (`neighbours`, shared with DBA, when given), and components are joined shortest edge first up to `max_block`
    faces (`_capped_blocks`): an approximation only where a cluster spans more than k neighbours or a block.
    """
    g = l2_normalize(gallery)
    n = len(g)
    if n <= exact_max:
        return canonical_labels(_average_linkage(g, threshold))
    idx, sim = (neighbours or Neighbours(g, k))(k)
    src = np.repeat(np.arange(n), idx.shape[1])
    dst, dist = idx.ravel(), 1.0 - sim.ravel()
    edge = (src != dst) & (dist <= threshold)
    comp = _capped_blocks(src[edge], dst[edge], dist[edge], n, max_block)
    labels = comp.astype(np.int64) * n  # a cluster of a component: comp * n + its label within the component
    for members in _groups(comp):
        if len(members) > 2:  # a pair joined by an edge is one cluster already
            labels[members] += _average_linkage(g[members], threshold)
    return canonical_labels(labels)
