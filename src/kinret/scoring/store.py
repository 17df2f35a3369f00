"""The score store: a (P, N) `.npy` per variant and split, its probe and gallery ids (and the cache key it was
computed under) in `X.ids.npz` beside it, checked on load; each probe's results on a labelled split (AP both ways,
the first relative's rank) in `X.results.npz` under the same key; and the file names variants get.

Layout: ``{scores_dir}/{safe_name(variant)}/{split}.npy`` + ``{split}.ids.npz`` + ``{split}.results.npz``. A matrix
is kept only where something reads it back (see `kinret.scoring.variants`); the per-probe results of every variant
are kept, a few bytes a probe. A matrix read back for its ranking alone is stored as float16 when that ranks every
row exactly as float32 does (`kinret.scoring.ranking.float16_ranks_alike`), else as float32; `load_scores` gives
float32 either way. External score matrices follow the same contract (see ensemble/README.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kinret.errors import KinretInputError
from kinret.io import atomic_path
from kinret.readback import DamagedFile, read_npy, read_npz, rebuilt

log = logging.getLogger(__name__)
RESULT_COLUMNS = ("ap", "first", "ap_trapezoid")  # `kinret.metrics.per_probe_results`'s columns


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
                key: str = "", dtype: type = np.float32) -> Path:
    """Write `path` (.npy, as `dtype`: float32, or float16 where the caller checked that it ranks alike) and its ids
    file, each atomically (ids first: a matrix is never left without them)."""
    path = Path(path)
    scores = check_scores(scores, probe_ids, gallery_ids, path)
    with atomic_path(ids_path(path), suffix=".npz") as tmp:
        np.savez(tmp, probe_ids=np.asarray(probe_ids, dtype=str), gallery_ids=np.asarray(gallery_ids, dtype=str),
                 key=np.asarray(key))
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, scores.astype(dtype, copy=False))
    return path


def results_path(scores_path: str | Path) -> Path:
    """`X.npy` keeps its per-probe results in `X.results.npz`."""
    p = Path(scores_path)
    return p.with_name(p.name.removesuffix(".npy") + ".results.npz")


def save_results(scores_path: str | Path, results: pd.DataFrame, key: str) -> Path:
    """Write the per-probe results of the matrix at `scores_path` (computed under `key`) beside it, atomically."""
    path = results_path(scores_path)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, key=np.asarray(key), **{c: results[c].to_numpy(dtype=np.float64) for c in RESULT_COLUMNS
                                              if c in results})
    return path


_READ: dict[tuple, pd.DataFrame] = {}  # results read in this process, by file identity: a rerun asks many times


def load_results(scores_path: str | Path, key: str, n_probes: int, n_gallery: int) -> pd.DataFrame | None:
    """The per-probe results stored for the matrix at `scores_path` under `key`: None when absent or stored under
    another key (stale); a damaged file (unreadable, a column missing, of another length, an AP outside [0, 1], a
    first rank that is not a gallery place) is named in a warning and None is returned, so it is computed again.
    A file read before in this process, unchanged since (the same inode, size and modification time: files are
    replaced by renaming), is not read again."""
    path = results_path(scores_path)
    try:
        st = path.stat()
    except OSError:
        return None
    memo = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, key, n_probes, n_gallery)
    if memo not in _READ:
        found = _read_results(path, key, n_probes, n_gallery)
        if found is None:
            return None
        _READ[memo] = found
    return _READ[memo].copy()


def _read_results(path: Path, key: str, n_probes: int, n_gallery: int) -> pd.DataFrame | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            found = pd.DataFrame({c: data[c].astype(np.float64) for c in RESULT_COLUMNS})
    except (KeyError, ValueError, OSError, EOFError) as exc:
        log.warning("%s: unreadable per-probe results (%s); computing them again", path, exc)
        return None
    first = found["first"].to_numpy()
    ok = len(found) == n_probes and all(((found[c] >= 0) & (found[c] <= 1)).all() for c in ("ap", "ap_trapezoid"))
    ok = ok and bool(np.all(np.isnan(first) | ((first >= 0) & (first < n_gallery) & (first == np.round(first)))))
    if not ok:
        log.warning("%s: damaged per-probe results (%d rows for %d probes, or values out of range); computing them "
                    "again", path, len(found), n_probes)
        return None
    return found


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


def stored_dtype(path: str | Path) -> np.dtype | None:
    """The dtype a stored matrix was written in (read from its `.npy` header), or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            return np.dtype(header(f)[2])
    except (OSError, ValueError):
        return None


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


KEPT_FILE = "kept.json"


def write_kept(scores_dir: str | Path, choose_on: Sequence[str], variants: Sequence[str], ranks_only: Sequence[str],
               narrowed: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Record which matrices the store keeps: every variant's on the splits the choice is made on (`choose_on`),
    elsewhere those of `variants` (the chosen), `ranks_only` of them for their ranking alone; and `narrowed`, the
    splits where only some variants were scored (split -> those variants; elsewhere every variant)."""
    data = {"choose_on": list(choose_on), "variants": list(variants), "ranks_only": list(ranks_only),
            "narrowed": {k: list(v) for k, v in (narrowed or {}).items()}}
    path = Path(scores_dir) / KEPT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_kept(scores_dir: str | Path) -> dict | None:
    """What `write_kept` recorded, or None when nothing was (a first run) or the file is damaged (named in a
    warning: then every matrix counts as one to keep, which only overstates what a plan lists)."""
    path = Path(scores_dir) / KEPT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        found: dict = {k: [str(v) for v in data[k]] for k in ("choose_on", "variants", "ranks_only")}
        found["narrowed"] = {str(k): [str(v) for v in vs] for k, vs in dict(data.get("narrowed", {})).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); planning as if every matrix were kept", path, exc)
        return None
    return found
