"""Score matrices: every similarity variant as a pure function of per-image embeddings, per-probe normalisation,
and the on-disk contract (a float32 `.npy` with its probe and gallery ids beside it, checked on load).

Similarities, for a probe with images e_1..e_m and a gallery face g:
  cosine, "meanemb": cos(mean of the unit e_i, g) -- the same order as the mean of the cosines, so that is not
                     computed separately;          "max": max_i cos(e_i, g)
  fc (the trained pair head h), "mean": mean_i h(e_i, g);  "max": max_i h(e_i, g);  "meanemb": h(mean embedding, g)
  rerank: the cosine (meanemb) top-N of each probe re-ordered by fc "mean", kept above the rest of the gallery.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .errors import KinretInputError
from .io import atomic_path
from .ranking import aggregate, cosine_scores, mean_embedding

COSINE_AGGREGATIONS = ("meanemb", "max")
FC_AGGREGATIONS = ("mean", "max", "meanemb")
NORMALISATIONS = ("z", "rank")
PairFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (K, D), (K, D) -> (K,) pair logits


def cosine_variant(probe_emb: np.ndarray, owner: np.ndarray, n_probes: int, gallery_emb: np.ndarray,
                   how: str = "meanemb") -> np.ndarray:
    """(n_probes, N) cosine scores fused over each probe's images by `how` (see the module docstring)."""
    if how == "meanemb":
        return cosine_scores(mean_embedding(probe_emb, owner, n_probes), gallery_emb)
    if how == "max":
        return aggregate(cosine_scores(probe_emb, gallery_emb), owner, n_probes, "max")
    raise ValueError(f"unknown cosine aggregation {how!r}; choose one of {COSINE_AGGREGATIONS}")


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
    if how == "meanemb":
        return fc_matrix(pair_fn, mean_embedding(probe_emb, owner, n_probes), gallery_emb, max_pairs)
    if how in ("mean", "max"):
        return aggregate(fc_matrix(pair_fn, probe_emb, gallery_emb, max_pairs), owner, n_probes, how)
    raise ValueError(f"unknown FC aggregation {how!r}; choose one of {FC_AGGREGATIONS}")


def rerank(shortlist: np.ndarray, fine: np.ndarray, top_n: int) -> np.ndarray:
    """Each row's `top_n` highest `shortlist` scores re-ordered by `fine`, above every other face (which keep their
    `shortlist` order): shortlisted faces score max(row) + 1 + sigmoid(fine), the rest keep their shortlist score.

    Only the shortlist's finite range matters, so cosines (in [-1, 1]) or any other bounded score work."""
    shortlist = np.asarray(shortlist, dtype=np.float32)
    out = shortlist.copy()
    k = min(top_n, shortlist.shape[1])
    top = np.argpartition(-shortlist, k - 1, axis=1)[:, :k]
    rows = np.arange(len(shortlist))[:, None]
    lift = shortlist.max(axis=1, keepdims=True) + 1.0
    out[rows, top] = lift + 1.0 / (1.0 + np.exp(-np.asarray(fine, dtype=np.float64)[rows, top]))
    return out


def normalise(scores: np.ndarray, how: str) -> np.ndarray:
    """Per-probe (row) normalisation before blending: "z" = (s - row mean) / row std; "rank" = the face's place in
    the row's ascending order divided by N - 1 (ties share the lower place), so the best face gets 1."""
    s = np.asarray(scores, dtype=np.float64)
    if how == "z":
        std = s.std(axis=1, keepdims=True)
        return ((s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)).astype(np.float32)
    if how == "rank":
        srt = np.sort(s, axis=1)
        places = np.stack([np.searchsorted(srt[i], s[i], side="left") for i in range(len(s))])
        return (places / max(s.shape[1] - 1, 1)).astype(np.float32)
    raise ValueError(f"unknown normalisation {how!r}; choose one of {NORMALISATIONS}")


def blend(matrices: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of already-normalised score matrices."""
    out = np.zeros_like(matrices[0], dtype=np.float32)
    for m, w in zip(matrices, weights, strict=True):
        if w:
            out += np.float32(w) * m
    return out


# ---- the on-disk contract ------------------------------------------------------------------------------------------
def ids_digest(probe_ids: Sequence[str], gallery_ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (probe_ids, gallery_ids):
        h.update("\n".join(map(str, part)).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def ids_path(scores_path: str | Path) -> Path:
    """`X.npy` keeps its probe and gallery ids in `X.ids.npz`."""
    p = Path(scores_path)
    return p.with_name(p.name.removesuffix(".npy") + ".ids.npz")


def check_scores(scores: np.ndarray, probe_ids: Sequence[str], gallery_ids: Sequence[str], where: str | Path
                 ) -> np.ndarray:
    """A float32 (P, N) matrix of finite scores for these ids, or a KinretInputError naming `where`."""
    scores = np.asarray(scores)
    want = (len(probe_ids), len(gallery_ids))
    if scores.ndim != 2 or scores.shape != want:
        raise KinretInputError(where, f"score matrix has shape {scores.shape}, expected {want} "
                                      f"({want[0]} probes x {want[1]} gallery faces)")
    if not np.issubdtype(scores.dtype, np.floating):
        raise KinretInputError(where, f"score matrix has dtype {scores.dtype}, expected float")
    bad = ~np.isfinite(scores)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise KinretInputError(where, f"{int(bad.sum())} non-finite score(s), first {scores[i, j]} at probe row {i} "
                                      f"({probe_ids[i]}), gallery column {j} ({gallery_ids[j]})")
    return scores.astype(np.float32, copy=False)


def save_scores(path: str | Path, scores: np.ndarray, probe_ids: Sequence[str], gallery_ids: Sequence[str],
                key: str = "") -> Path:
    """Write `path` (.npy) and its ids file, each atomically (ids first: a matrix is never left without them)."""
    path = Path(path)
    scores = check_scores(scores, probe_ids, gallery_ids, path)
    with atomic_path(ids_path(path), suffix=".npz") as tmp:
        np.savez(tmp, probe_ids=np.asarray(probe_ids, dtype=str), gallery_ids=np.asarray(gallery_ids, dtype=str),
                 key=np.asarray(key))
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, scores)
    return path


def stored_key(path: str | Path) -> str | None:
    """The cache key a score matrix was saved with, or None when it (or its ids file) is missing."""
    path = Path(path)
    if not path.is_file() or not ids_path(path).is_file():
        return None
    with np.load(ids_path(path)) as data:
        return str(data["key"]) if "key" in data.files else ""


def load_scores(path: str | Path, probe_ids: Sequence[str], gallery_ids: Sequence[str]) -> np.ndarray:
    """A stored score matrix, checked against the ids it must be for: the stored ids in the same order (a matrix
    saved for a reordered or other list is refused), its shape, and finite values."""
    path = Path(path)
    if not path.is_file():
        raise KinretInputError(path, "score matrix not found")
    if not ids_path(path).is_file():
        raise KinretInputError(ids_path(path), f"missing: {path.name} needs its probe_ids and gallery_ids beside it")
    try:
        with np.load(ids_path(path)) as data:
            stored = {k: data[k].astype(str) for k in ("probe_ids", "gallery_ids")}
        scores = np.load(path, allow_pickle=False)
    except (KeyError, ValueError, OSError) as exc:
        raise KinretInputError(path, f"unreadable score matrix or ids file ({exc})") from None
    for kind, want in (("probe", probe_ids), ("gallery", gallery_ids)):
        got = stored[f"{kind}_ids"]
        want = np.asarray(want, dtype=str)
        if got.shape != want.shape:
            raise KinretInputError(ids_path(path), f"holds {len(got)} {kind} ids, the split has {len(want)}")
        if not (got == want).all():
            i = int(np.argmax(got != want))
            raise KinretInputError(ids_path(path), f"{kind} id at row {i} is {str(got[i])!r}, the split has "
                                                   f"{str(want[i])!r}")
    return check_scores(scores, probe_ids, gallery_ids, path)
