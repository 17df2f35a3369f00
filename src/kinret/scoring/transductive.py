"""Gallery-aware (transductive) re-scoring: pure numpy/scipy functions of unit probe vectors q_i (a probe's mean
embedding), unit gallery embeddings g_j, or a (P, N) score matrix S; arrays in, arrays out, no I/O.

- `knn`, `dba`: database-side augmentation, each gallery face replaced by the weighted mean of its k nearest faces;
- `query_expansion`: each probe's vector expanded by its top-k gallery faces;
- `relative_threshold`, `gallery_clusters`, `cluster_fused_scores`: gallery faces grouped into identities by average
  linkage, and scores mixed with the identity's mean embedding;
- `diverse_head`: the first K places of a ranking go to the best face of K distinct identities;
- `dual_softmax`, `sinkhorn`: scores normalised over probes (each gallery face is a relative of exactly one probe).

Score-matrix functions need finite scores (every variant's matrix is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import squareform
from scipy.special import logsumexp

from kinret.scoring.similarity import l2_normalize

RESCORE_CODE_VERSION = 1  # bump when a re-scoring's formula changes: it is part of every transductive variant's key
_BLOCK_ENTRIES = 1 << 24  # entries of one (rows x N) similarity block: bounds memory at any gallery size


def _finite(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (P, N) matrix, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite for transductive re-scoring")
    return scores


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) indices and cosine similarities of each row's k nearest rows of `x` by cosine, the row itself first,
    the others by similarity descending (ties: lower index first); k is capped at N. Computed in row blocks of
    2^24 similarities, so memory stays bounded whatever N is."""
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
        top = _top_k(s, k)
        idx[a:a + step] = top
        sim[a:a + step] = np.take_along_axis(s, top, axis=1)
        sim[a:a + step, 0] = own
    return idx, sim


def dba(gallery: np.ndarray, k: int = 10, alpha: float = 1.0) -> np.ndarray:
    """Database-side augmentation: g'_j = normalize(sum_{l in N_k(j)} w_jl g_l), N_k(j) the k nearest gallery faces of
    j by cosine (j itself included, weight 1), w_jl = max(cos(g_j, g_l), 0)^alpha (alpha 1: similarity-weighted;
    alpha 0: the plain mean; larger alpha: alpha-QE weighting). (N, D) float32."""
    g = l2_normalize(gallery)
    n = len(g)
    if n == 0 or k <= 1:
        return g
    idx, sim = knn(g, k)
    w = np.maximum(sim, 0.0) ** np.float32(alpha)
    weights = sparse.csr_matrix((w.ravel(), idx.ravel(), np.arange(0, idx.size + 1, idx.shape[1])), shape=(n, n))
    return l2_normalize(np.asarray(weights @ g))


def query_expansion(probes: np.ndarray, gallery: np.ndarray, k: int = 5, alpha: float = 1.0) -> np.ndarray:
    """Query expansion: q'_i = normalize(q_i + sum_{l in T_k(i)} max(cos(q_i, g_l), 0)^alpha g_l), T_k(i) the k gallery
    faces most similar to q_i (ties: lower index). (P, D) float32; score with `cosine_scores(q', gallery)`."""
    q, g = l2_normalize(probes), l2_normalize(gallery)
    k = min(k, len(g))
    if k == 0:
        return q
    s = q @ g.T
    top = _top_k(s, k)
    w = np.maximum(np.take_along_axis(s, top, axis=1), 0.0) ** np.float32(alpha)
    return l2_normalize(q + np.einsum("pk,pkd->pd", w, g[top]))


def _top_k(s: np.ndarray, k: int) -> np.ndarray:
    """(P, k) columns of each row's k highest scores, highest first, ties to the lower index (exact at the k-th
    place: rows with a tie across it are sorted in full)."""
    top = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]  # the k highest, unordered
    vals = np.take_along_axis(s, top, axis=1)
    top = np.take_along_axis(top, np.lexsort((top, -vals), axis=1), axis=1)
    kth = np.take_along_axis(s, top[:, -1:], axis=1)
    tied = np.flatnonzero((s >= kth).sum(axis=1) > k)
    if tied.size:
        top[tied] = np.argsort(-s[tied], axis=1, kind="stable")[:, :k]
    return top


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


def _average_linkage(g: np.ndarray, threshold: float) -> np.ndarray:
    """Exact average linkage (cosine distance) of unit rows, cut where the merge distance exceeds `threshold`."""
    if len(g) < 2:
        return np.zeros(len(g), dtype=np.int64)
    full = g @ g.T  # BLAS, several times faster than pdist's cosine; a zero row is at distance 1 from every face
    np.subtract(1.0, full, out=full)
    np.clip(full, 0.0, 2.0, out=full)  # rounding
    np.fill_diagonal(full, 0.0)
    d = squareform(full, checks=False)
    del full
    return fcluster(linkage(d, "average"), t=threshold, criterion="distance") - 1


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
                     max_block: int = 2000) -> np.ndarray:
    """(N,) identity labels 0..C-1 (numbered by first face): average linkage on cosine distance, merges up to
    `threshold` (scipy.cluster.hierarchy).

    Up to `exact_max` faces the linkage is exact over all pairs (an N x N float32 matrix, then N^2/2 distances).
    Above, it runs per block: an average-linkage cluster cut at t lies inside one connected component of the graph
    of pairs at distance <= t (an average <= t needs one pair <= t), so linkage per component is exact; the graph is
    built from each face's `k` nearest neighbours, and components are joined shortest edge first up to `max_block`
    faces (`_capped_blocks`). Both are approximations only where a cluster spans more than k neighbours or a
    block.
    """
    g = l2_normalize(gallery)
    n = len(g)
    if n <= exact_max:
        return canonical_labels(_average_linkage(g, threshold))
    idx, sim = knn(g, k)
    src = np.repeat(np.arange(n), idx.shape[1])
    dst, dist = idx.ravel(), 1.0 - sim.ravel()
    edge = (src != dst) & (dist <= threshold)
    comp = _capped_blocks(src[edge], dst[edge], dist[edge], n, max_block)
    labels = comp.astype(np.int64) * n  # a cluster of a component: comp * n + its label within the component
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for members in np.split(order, bounds):
        if len(members) > 2:  # a pair joined by an edge is one cluster already
            labels[members] += _average_linkage(g[members], threshold)
    return canonical_labels(labels)


def cluster_fused_scores(probes: np.ndarray, gallery: np.ndarray, labels: np.ndarray, mix: float = 0.5) -> np.ndarray:
    """s_ij = (1 - mix) cos(q_i, g_j) + mix cos(q_i, c_L(j)), c_L = normalize(sum of the unit g in cluster L) (the
    direction of the cluster's mean). (P, N) float32."""
    q, g = l2_normalize(probes), l2_normalize(gallery)
    labels = np.asarray(labels)
    n = len(g)
    onehot = sparse.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(labels.max() + 1, n))
    centres = l2_normalize(np.asarray(onehot @ g))
    return ((1 - mix) * (q @ g.T) + mix * (q @ centres.T)[:, labels]).astype(np.float32)


def diverse_head(scores: np.ndarray, labels: np.ndarray, k: int = 5, chunk_rows: int = 256) -> np.ndarray:
    """Per row, the first min(k, C) places go to the best face of that many distinct clusters: each cluster's best
    face (highest score, ties to the lower index) stands for it, and the k best representatives (same order rule)
    take the head in their score order; every other face keeps its score and order below them.

    Encoded in the scores so that `rank_gallery` gives exactly this order: with m the row's maximum and
    delta = max(|m|, 1) / 256, the head's r-th face (r = 0..k'-1) scores m + (k' - r) delta, every other face keeps
    its score (<= m). (P, N) float32."""
    scores = _finite(scores)
    labels = np.asarray(labels)
    if labels.shape != (scores.shape[1],):
        raise ValueError(f"labels have shape {labels.shape}, expected ({scores.shape[1]},)")
    out = scores.copy()
    if k <= 0 or scores.size == 0:
        return out
    order = np.argsort(labels, kind="stable")  # faces grouped by cluster, by index within one
    starts = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0])
    segment = np.cumsum(np.r_[False, np.diff(labels[order]) != 0])  # cluster slot of each sorted position
    kk = min(k, len(starts))
    position = np.arange(scores.shape[1])
    for a in range(0, len(scores), chunk_rows):
        s = scores[a:a + chunk_rows][:, order]
        best = np.maximum.reduceat(s, starts, axis=1)
        first = np.minimum.reduceat(np.where(s == best[:, segment], position, len(position)), starts, axis=1)
        rep = np.full(s.shape, -np.inf, dtype=np.float32)
        np.put_along_axis(rep, order[first], best, axis=1)
        head = _top_k(rep, kk)
        top = s.max(axis=1, keepdims=True).astype(np.float64)
        delta = np.maximum(np.abs(top), 1.0) / 256.0
        np.put_along_axis(out[a:a + chunk_rows], head, (top + np.arange(kk, 0, -1) * delta).astype(np.float32), axis=1)
    return out


def dual_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """log(softmax over the gallery) + log(softmax over the probes) of S / T:
    s'_ij = 2 s_ij / T - logsumexp_l(s_il / T) - logsumexp_m(s_mj / T). Within a probe's row the order is that of
    s_ij - (T/2) logsumexp_m(s_mj / T): a face claimed by other probes moves down. (P, N) float32."""
    z = _finite(scores) / np.float32(temperature)
    return (2 * z - logsumexp(z, axis=1, keepdims=True) - logsumexp(z, axis=0, keepdims=True)).astype(np.float32)


def sinkhorn(scores: np.ndarray, temperature: float, n_iter: int = 20) -> np.ndarray:
    """log of the matrix M = diag(u) exp(S / T) diag(v) whose rows sum to N / P (every probe an equal share) and
    columns to 1 (every gallery face a relative of exactly one probe), by `n_iter` Sinkhorn steps
    u = (N/P) / (K v), v = 1 / (K^T u) on K_ij = exp(s_ij / T - max_m s_mj / T) (the column shift is absorbed in v).
    s'_ij = s_ij / T - max_m s_mj / T + log u_i + log v_j; within a row the order is that of s_ij / T + log v_j.
    When exp underflows a whole row (a spread of scores over ~87 T), the same steps run on logs (logsumexp).
    (P, N) float32."""
    z = _finite(scores) / np.float32(temperature)
    p, n = z.shape
    z -= z.max(axis=0, keepdims=True)
    kern = np.exp(z)
    u, v = np.ones(p, dtype=np.float32), np.ones(n, dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for _ in range(n_iter):  # einsum, not BLAS: threaded mat-vecs between numpy ops stall on a busy machine
            u = np.float32(n / p) / np.einsum("ij,j->i", kern, v)
            v = np.float32(1.0) / np.einsum("ij,i->j", kern, u)
        log_u, log_v = np.log(u), np.log(v)
    del kern
    if not (np.isfinite(log_u).all() and np.isfinite(log_v).all()):
        log_u, log_v = _log_sinkhorn(z, n_iter)
    z += log_u[:, None]
    z += log_v[None, :]
    return z


def _log_sinkhorn(z: np.ndarray, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """The Sinkhorn steps of `sinkhorn` on logs: log u = log(N/P) - logsumexp_j(z_ij + log v_j), and so on."""
    p, n = z.shape
    log_u, log_v = np.zeros(p, dtype=np.float32), np.zeros(n, dtype=np.float32)
    for _ in range(n_iter):
        log_u = (np.log(n / p) - logsumexp(z + log_v[None, :], axis=1)).astype(np.float32)
        log_v = -logsumexp(z + log_u[:, None], axis=0).astype(np.float32)
    return log_u, log_v


@dataclass(frozen=True)
class Rescoring:
    """One fixed re-scoring recipe, applied in this order to unit probe vectors q (each probe's mean embedding) and
    gallery embeddings g: DBA of the gallery (`dba_k` > 0), query expansion (`qe_k` > 0), identity clusters of the
    (augmented) gallery at `relative_threshold(g, cluster_z)` with cluster-fused scores (`cluster_z` set), else the
    cosine; normalisation over probes (`column` dsm | sinkhorn, temperature `tau` x the scores' standard deviation,
    so it transfers across sources); last the identity-diverse head (`diverse_k` > 0, needs clusters), so that the
    returned scores rank in exactly its order."""

    dba_k: int = 0
    dba_alpha: float = 1.0
    qe_k: int = 0
    qe_alpha: float = 1.0
    cluster_z: float | None = None
    cluster_mix: float = 0.5
    diverse_k: int = 0
    column: str = ""
    tau: float = 0.3
    sinkhorn_iter: int = 20

    def __post_init__(self) -> None:
        if self.column not in ("", "dsm", "sinkhorn"):
            raise ValueError(f"unknown column normalisation {self.column!r}; choose dsm or sinkhorn")
        if self.diverse_k and self.cluster_z is None:
            raise ValueError("an identity-diverse head needs clusters: set cluster_z")


# The fixed set every embedding source's main cosine variant gets (parameters fixed here, never tuned on val/test).
RESCORINGS: dict[str, Rescoring] = {
    "dba10": Rescoring(dba_k=10),
    "qe5": Rescoring(qe_k=5),
    "clus-div5": Rescoring(cluster_z=2.5, diverse_k=5),
    "dba10-clus-div5": Rescoring(dba_k=10, cluster_z=2.5, diverse_k=5),
    "dsm": Rescoring(column="dsm", tau=0.3),
    "sink": Rescoring(column="sinkhorn", tau=0.5),
}
# listed by default; the others are scored when named. On real families query expansion raised mAP but cut Rank@5,
# and Sinkhorn duplicates the dual softmax's idea at more cost: fewer variants, fewer comparisons to pay for.
DEFAULT_RESCORINGS = ("dba10", "clus-div5", "dba10-clus-div5", "dsm")


def rescore(probes: np.ndarray, gallery: np.ndarray, how: Rescoring) -> np.ndarray:
    """(P, N) float32 scores of probe vectors (P, D) against gallery embeddings (N, D) under the recipe `how`; with
    the empty recipe, the cosine."""
    q, g = l2_normalize(probes), l2_normalize(gallery)
    if how.dba_k:
        g = dba(g, how.dba_k, how.dba_alpha)
    if how.qe_k:
        q = query_expansion(q, g, how.qe_k, how.qe_alpha)
    labels = None
    if how.cluster_z is not None:
        labels = gallery_clusters(g, relative_threshold(g, how.cluster_z))
        scores = cluster_fused_scores(q, g, labels, how.cluster_mix)
    else:
        scores = q @ g.T
    if how.column:
        temperature = how.tau * float(scores.std()) or how.tau  # a constant matrix has no spread to scale by
        scores = (dual_softmax(scores, temperature) if how.column == "dsm"
                  else sinkhorn(scores, temperature, how.sinkhorn_iter))
    if how.diverse_k:
        scores = diverse_head(scores, labels, how.diverse_k)
    return scores.astype(np.float32, copy=False)
