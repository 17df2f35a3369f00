"""Similarities as pure functions of per-image embeddings: cosine and the trained FC pair head, fused over each
probe's images, and the FC re-rank of a cosine shortlist. Arrays in, (P, N) float32 scores out; no I/O.

For a probe with images e_1..e_m and a gallery face g, the fusions `FUSIONS` lists per similarity:
  cosine, "meanemb": cos(mean of the unit e_i, g) -- the same order as the mean of the cosines (the mean of unit
                     vectors dotted with g is that mean, and renormalising divides a whole row by one positive
                     number), at a fraction of the cost, so the mean of cosines is not offered;
          "max":     max_i cos(e_i, g)
  fc (the trained pair head h), "mean": mean_i h(e_i, g);  "max": max_i h(e_i, g);  "meanemb": h(mean embedding, g)
  rerank: the cosine (meanemb) top-N of each probe re-ordered by fc "mean", kept above the rest of the gallery (the
          FC head run on the shortlisted pairs only, `fc_rerank`).
Gallery-aware re-scorings of the cosine (meanemb) live in `kinret.scoring.transductive`.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.special import expit

from kinret.models.networks import PairFn

log = logging.getLogger(__name__)

EARLY_FUSION = "meanemb"  # a probe's mean unit embedding, scored once; every other fusion reduces per-image rows
# The fusions of a probe's photos each similarity offers, in the order its variants are listed.
FUSIONS: dict[str, tuple[str, ...]] = {"cosine": (EARLY_FUSION, "max"), "fc": ("mean", "max", EARLY_FUSION)}
LATE_FUSIONS = tuple(dict.fromkeys(f for offered in FUSIONS.values() for f in offered if f != EARLY_FUSION))
LATE_BLOCK = 1 << 25  # image x gallery scores a late fusion holds at once (128 MB of float32)


def check_fusion(similarity: str, how: str) -> str:
    """`how` when `similarity` ("cosine", "fc") offers that fusion, else a ValueError naming the ones it offers."""
    if how not in FUSIONS[similarity]:
        raise ValueError(f"unknown {similarity} fusion {how!r}; choose one of {', '.join(FUSIONS[similarity])}")
    return how


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
    if how not in LATE_FUSIONS:
        raise ValueError(f"unknown late fusion {how!r}; choose one of {', '.join(LATE_FUSIONS)}")
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


def cosine_variant(probe_emb: np.ndarray, owner: np.ndarray, n_probes: int, gallery_emb: np.ndarray,
                   how: str = EARLY_FUSION, block: int = LATE_BLOCK) -> np.ndarray:
    """(n_probes, N) cosine scores fused over each probe's images by `how` (see the module docstring). A late fusion
    over more than `block` image x gallery scores runs a block of probes at a time (max and mean are per probe; the
    matmul of a block may round differently in the last bit), never holding the (images, N) matrix: 1.6 GB at ten
    times the test split."""
    if check_fusion("cosine", how) == EARLY_FUSION:
        return cosine_scores(mean_embedding(probe_emb, owner, n_probes), gallery_emb)
    owner = np.asarray(owner)
    if len(owner) * len(gallery_emb) <= block:
        return aggregate(cosine_scores(probe_emb, gallery_emb), owner, n_probes, how)
    return _max_of_cosines(l2_normalize(probe_emb), _check_owner(owner, len(owner), n_probes), n_probes,
                           l2_normalize(gallery_emb), block)


def _max_of_cosines(q: np.ndarray, owner: np.ndarray, n_probes: int, g: np.ndarray, block: int) -> np.ndarray:
    """(n_probes, N) max over each probe's unit image rows `q` of their cosines with the unit gallery rows `g`, a
    block of probes at a time: probes sorted by their image count (most first), so that the probes with a k-th
    image are a prefix of the block; the block's cosines with every probe's first image are its running maximum,
    and those with each further image are folded in place (no (images, N) matrix, no regrouping copy)."""
    counts = np.bincount(owner, minlength=n_probes)
    by_probe = np.argsort(owner, kind="stable")  # each probe's images, in their order
    start = np.concatenate([[0], np.cumsum(counts)])
    probes = np.argsort(-counts, kind="stable")
    out = np.empty((n_probes, len(g)), dtype=np.float32)
    gt = g.T
    per = min(n_probes, max(1, block // max(len(g), 1)))
    best, more = np.empty((per, len(g)), dtype=np.float32), np.empty((per, len(g)), dtype=np.float32)  # reused
    for a in range(0, n_probes, per):
        chunk = probes[a:a + per]
        np.matmul(q[by_probe[start[chunk]]], gt, out=best[:len(chunk)])
        for k in range(1, int(counts[chunk[0]])):
            n = int(np.searchsorted(-counts[chunk], -k, side="left"))  # the probes with a k-th image: a prefix
            np.matmul(q[by_probe[start[chunk[:n]] + k]], gt, out=more[:n])
            np.maximum(best[:n], more[:n], out=best[:n])
        out[chunk] = best[:len(chunk)]
    return out


def fc_matrix(pair_fn: PairFn, rows: np.ndarray, gallery_emb: np.ndarray, max_pairs: int = 1 << 18) -> np.ndarray:
    """(R, N) pair-head logits of every row against every gallery face, `max_pairs` pairs per call so memory stays
    bounded (a call holds max_pairs x D floats per input) whatever R x N is."""
    n, dim = gallery_emb.shape
    out = np.empty((len(rows), n), dtype=np.float32)
    per = max(1, max_pairs // max(n, 1))  # rows per call
    for start in range(0, len(rows), per):
        block = rows[start:start + per]
        a = np.repeat(block, n, axis=0)
        b = np.tile(gallery_emb, (len(block), 1))
        out[start:start + len(block)] = np.asarray(pair_fn(a, b), dtype=np.float32).reshape(len(block), n)
    return out


def fc_variant(pair_fn: PairFn, probe_emb: np.ndarray, owner: np.ndarray, n_probes: int, gallery_emb: np.ndarray,
               how: str = "mean", max_pairs: int = 1 << 18) -> np.ndarray:
    """(n_probes, N) FC similarity fused over each probe's images by `how` (see the module docstring)."""
    if check_fusion("fc", how) == EARLY_FUSION:
        return fc_matrix(pair_fn, mean_embedding(probe_emb, owner, n_probes), gallery_emb, max_pairs)
    return aggregate(fc_matrix(pair_fn, probe_emb, gallery_emb, max_pairs), owner, n_probes, how)


def shortlist_columns(scores: np.ndarray, top_n: int) -> np.ndarray:
    """(P, min(top_n, N)) columns of each row's `top_n` highest scores (in no particular order)."""
    scores = np.asarray(scores, dtype=np.float32)
    k = min(top_n, scores.shape[1])
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def rerank(shortlist: np.ndarray, fine: np.ndarray, top_n: int) -> np.ndarray:
    """Each row's `top_n` highest `shortlist` scores re-ordered by `fine`, above every other face (which keep their
    `shortlist` order): shortlisted faces score max(row) + 1 + sigmoid(fine), the rest keep their shortlist score.

    Only the shortlist's finite range matters, so cosines (in [-1, 1]) or any other bounded score work."""
    top = shortlist_columns(shortlist, top_n)
    rows = np.arange(len(top))[:, None]
    return _lift(shortlist, top, np.asarray(fine, dtype=np.float64)[rows, top])


def _lift(shortlist: np.ndarray, top: np.ndarray, fine_top: np.ndarray) -> np.ndarray:
    shortlist = np.asarray(shortlist, dtype=np.float32)
    out = shortlist.copy()
    lift = shortlist.max(axis=1, keepdims=True) + 1.0
    np.put_along_axis(out, top, lift + expit(np.asarray(fine_top, dtype=np.float64)), axis=1)
    return out


def fc_rerank(pair_fn: PairFn, probe_emb: np.ndarray, owner: np.ndarray, n_probes: int, gallery_emb: np.ndarray,
              top_n: int, max_pairs: int = 1 << 18) -> np.ndarray:
    """`rerank(cosine meanemb, fc "mean", top_n)`, the FC head run only on the shortlisted pairs (each probe image x
    its probe's top_n faces: M x top_n pairs instead of M x N), `max_pairs` pairs per call."""
    shortlist = cosine_variant(probe_emb, owner, n_probes, gallery_emb, EARLY_FUSION)
    top = shortlist_columns(shortlist, top_n)
    owner = _check_owner(owner, len(probe_emb), n_probes)
    k = top.shape[1]
    logits = np.empty((len(probe_emb), k), dtype=np.float32)
    per = max(1, max_pairs // max(k, 1))  # probe images per call
    for start in range(0, len(probe_emb), per):
        stop = min(start + per, len(probe_emb))
        a = np.repeat(probe_emb[start:stop], k, axis=0)
        b = gallery_emb[top[owner[start:stop]].ravel()]
        logits[start:stop] = np.asarray(pair_fn(a, b), dtype=np.float32).reshape(stop - start, k)
    return _lift(shortlist, top, aggregate(logits, owner, n_probes, "mean"))


def probe_scores(probe_feats: np.ndarray, probe_ok: np.ndarray, owner: np.ndarray, n_probes: int,
                 gallery_feats: np.ndarray, gallery_ok: np.ndarray, how: str = EARLY_FUSION) -> np.ndarray:
    """`cosine_variant` of a split whose images may be unreadable: probe images with `probe_ok` False are left out
    (a probe left with none scores 0 everywhere, so its ranking is gallery order), and gallery faces with
    `gallery_ok` False score -inf and rank last."""
    check_fusion("cosine", how)
    keep = np.asarray(probe_ok, dtype=bool)
    owner = np.asarray(owner)
    has_image = np.bincount(owner[keep], minlength=n_probes) > 0
    scores = np.zeros((n_probes, len(gallery_feats)), dtype=np.float32)
    if has_image.any():
        remap = np.cumsum(has_image) - 1  # probes with images, renumbered 0..K-1
        scores[has_image] = cosine_variant(probe_feats[keep], remap[owner[keep]], int(has_image.sum()),
                                           gallery_feats, how)
    if not has_image.all():
        log.warning("%d probe(s) have no readable image and are ranked in gallery order: %s",
                    int((~has_image).sum()), np.flatnonzero(~has_image)[:10].tolist())
    scores[:, ~np.asarray(gallery_ok, dtype=bool)] = -np.inf
    return scores
