"""The score store: a float32 (P, N) `.npy` per variant and split, its probe and gallery ids (and the cache key it
was computed under) in `X.ids.npz` beside it, checked on load; and the file names variants get.

Layout: ``{scores_dir}/{safe_name(variant)}/{split}.npy`` + ``{split}.ids.npz``. External score matrices follow
the same contract (see ensemble/README.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kinret.errors import KinretInputError
from kinret.io import atomic_path
from kinret.readback import DamagedFile, read_npy, read_npz, rebuilt


def safe_name(variant: str) -> str:
    """A variant name as a file name: `sface_heads/bce-comb1:fc-mean` -> `sface_heads_bce-comb1_fc-mean`."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", variant)


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
    """The cache key a score matrix was saved with, or None when it (or its ids file) is missing, or its ids file
    damaged (one warning)."""
    path = Path(path)
    if not path.is_file() or not ids_path(path).is_file():
        return None
    try:
        data = read_npz(ids_path(path), ("probe_ids", "gallery_ids"))
    except DamagedFile as exc:
        rebuilt(exc, f"{path.name} is computed again")
        return None
    return str(data["key"]) if "key" in data else ""


def load_scores(path: str | Path, probe_ids: Sequence[str], gallery_ids: Sequence[str]) -> np.ndarray:
    """A stored score matrix, checked against the ids it must be for: the stored ids in the same order (a matrix
    saved for a reordered or other list is refused), its shape, and finite values."""
    path = Path(path)
    if not path.is_file():
        raise KinretInputError(path, "score matrix not found")
    if not ids_path(path).is_file():
        raise KinretInputError(ids_path(path), f"missing: {path.name} needs its probe_ids and gallery_ids beside it")
    try:
        data = read_npz(ids_path(path), ("probe_ids", "gallery_ids"))
        stored = {k: data[k].astype(str) for k in ("probe_ids", "gallery_ids")}
        scores = read_npy(path)
    except DamagedFile as exc:
        raise KinretInputError(exc.path, f"unreadable score matrix or ids file ({exc.reason})") from None
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


def cached_scores(path: str | Path, probe_ids: Sequence[str], gallery_ids: Sequence[str]) -> np.ndarray | None:
    """A matrix the kit stored (`load_scores`), or None after one warning when it or its ids file is damaged (cut
    short, garbled, of another shape or for other ids): the caller computes it again."""
    try:
        return load_scores(path, probe_ids, gallery_ids)
    except KinretInputError as exc:
        rebuilt(DamagedFile(exc.path or path, exc.message), "the score matrix is computed again")
        return None
