"""Gallery-aware (transductive) re-scoring: pure numpy/scipy functions of unit probe vectors q_i (a probe's mean
embedding), unit gallery embeddings g_j, or a (P, N) score matrix S; arrays in, arrays out, no I/O.

- `dba`: database-side augmentation, each gallery face replaced by the weighted mean of its k nearest faces
  (`kinret.scoring.neighbours`);
- `query_expansion`: each probe's vector expanded by its top-k gallery faces;
- `cluster_fused_scores`: scores mixed with the mean embedding of the face's identity, the gallery faces grouped into
  identities by average linkage (`kinret.scoring.clusters`);
- `diverse_head`: the first K places of a ranking go to the best face of K distinct identities;
- `dual_softmax`, `sinkhorn`: scores normalised over probes (each gallery face is a relative of exactly one probe).

Score-matrix functions need finite scores (every variant's matrix is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import logsumexp

from kinret.scoring.clusters import gallery_clusters, relative_threshold
from kinret.scoring.neighbours import Neighbours, top_k
from kinret.scoring.similarity import l2_normalize

BLOCK = 1 << 24  # scores a re-scoring works on at once past this size (rows or columns of the (P, N) matrix)


def _finite(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (P, N) matrix, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite for transductive re-scoring")
    return scores


def dba(gallery: np.ndarray, k: int = 10, alpha: float = 1.0, neighbours: Neighbours | None = None) -> np.ndarray:
    """Database-side augmentation: g'_j = normalize(sum_{l in N_k(j)} w_jl g_l), N_k(j) the k nearest gallery faces of
    j by cosine (j itself included, weight 1), w_jl = max(cos(g_j, g_l), 0)^alpha (alpha 1: similarity-weighted;
    alpha 0: the plain mean; larger alpha: alpha-QE weighting); `neighbours`, the gallery's shared neighbour lists.
    (N, D) float32."""
    g = l2_normalize(gallery)
    n = len(g)
    if n == 0 or k <= 1:
        return g
    idx, sim = (neighbours or Neighbours(g, k))(k)
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
    top = top_k(s, k)
    w = np.maximum(np.take_along_axis(s, top, axis=1), 0.0) ** np.float32(alpha)
    return l2_normalize(q + np.einsum("pk,pkd->pd", w, g[top]))


def cluster_fused_scores(probes: np.ndarray, gallery: np.ndarray, labels: np.ndarray, mix: float = 0.5,
                         block: int = BLOCK) -> np.ndarray:
    """s_ij = (1 - mix) cos(q_i, g_j) + mix cos(q_i, c_L(j)), c_L = normalize(sum of the unit g in cluster L) (the
    direction of the cluster's mean). (P, N) float32; past `block` scores a block of probes at a time (the matmul
    of a block may round differently in the last bit)."""
    q, g = l2_normalize(probes), l2_normalize(gallery)
    labels = np.asarray(labels)
    n = len(g)
    onehot = sparse.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(labels.max() + 1, n))
    centres = l2_normalize(np.asarray(onehot @ g))
    out = np.empty((len(q), n), dtype=np.float32)
    for a in range(0, len(q), max(1, block // max(n, 1))):
        part = out[a:a + max(1, block // max(n, 1))]
        np.matmul(q[a:a + len(part)], g.T, out=part)
        part *= np.float32(1 - mix)
        near = (q[a:a + len(part)] @ centres.T)[:, labels]
        near *= np.float32(mix)
        part += near
    return out


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
        head = top_k(rep, kk)
        top = s.max(axis=1, keepdims=True).astype(np.float64)
        delta = np.maximum(np.abs(top), 1.0) / 256.0
        np.put_along_axis(out[a:a + chunk_rows], head, (top + np.arange(kk, 0, -1) * delta).astype(np.float32), axis=1)
    return out


def dual_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """log(softmax over the gallery) + log(softmax over the probes) of S / T:
    s'_ij = 2 s_ij / T - logsumexp_l(s_il / T) - logsumexp_m(s_mj / T). Within a probe's row the order is that of
    s_ij - (T/2) logsumexp_m(s_mj / T): a face claimed by other probes moves down. (P, N) float32."""
    z = _finite(scores) / np.float32(temperature)
    over_gallery, over_probes = _logsumexp(z, 1), _logsumexp(z, 0)
    z *= 2
    z -= over_gallery
    z -= over_probes
    return z


def _logsumexp(z: np.ndarray, axis: int, block: int = BLOCK) -> np.ndarray:
    """scipy's `logsumexp(z, axis, keepdims=True)`; past `block` scores, on blocks of about that many (rows for axis
    1, columns for axis 0), so that scipy's (P, N) work arrays are a block's. Row blocks give the same numbers;
    column blocks the same up to float rounding (numpy sums a block's columns in another order). The kit's default
    and the real size's galleries stay under `block`."""
    if z.size <= block:
        return logsumexp(z, axis=axis, keepdims=True)
    step = max(1, block // max(z.shape[1 - axis], 1))
    parts = [logsumexp(z[a:a + step] if axis == 1 else z[:, a:a + step], axis=axis, keepdims=True)
             for a in range(0, z.shape[1 - axis], step)]
    return np.concatenate(parts, axis=1 - axis)


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


def rescore(probes: np.ndarray, gallery: np.ndarray, how: Rescoring, shared: dict | None = None) -> np.ndarray:
    """(P, N) float32 scores of probe vectors (P, D) against gallery embeddings (N, D) under the recipe `how`; with
    the empty recipe, the cosine. `shared`, one dict for the recipes run on the same vectors, keeps what they have in
    common (the gallery's neighbour lists, its DBA, its clusters), so each is computed once."""
    shared = {} if shared is None else shared

    def once(key: tuple, compute):
        if key not in shared:
            shared[key] = compute()
        return shared[key]

    q, g = l2_normalize(probes), l2_normalize(gallery)
    stage: tuple = ("gallery",)  # what g is now: the gallery, or its DBA
    # on the vectors dba and gallery_clusters normalise g to, so that the lists are theirs to the last bit
    near = once(("neighbours", *stage), lambda: Neighbours(l2_normalize(g)))
    if how.dba_k:
        g = once(("dba", how.dba_k, how.dba_alpha), lambda: dba(g, how.dba_k, how.dba_alpha, near))
        stage = ("dba", how.dba_k, how.dba_alpha)
        near = once(("neighbours", *stage), lambda: Neighbours(l2_normalize(g)))
    if how.qe_k:
        q = query_expansion(q, g, how.qe_k, how.qe_alpha)
    labels = None
    if how.cluster_z is not None:
        labels = once(("clusters", how.cluster_z, *stage),
                      lambda: gallery_clusters(g, relative_threshold(g, how.cluster_z), neighbours=near))
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
