"""The chunked, resumable `.npz` cache (ids + arrays) of per-image arrays that are not a frozen pass: a trained
checkpoint's embeddings (`kinret.features.sources.CheckpointSource`, keyed by the checkpoint file's content) and the
raw-pixel baseline. An array is computed in chunks of images, each chunk saved as it finishes, so a run killed
half-way recomputes only the chunks it had not saved; under torchrun the processes split the chunks between them
(`build_in_chunks`). A frozen network's outputs have their own store (`kinret.features.frozen`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch.distributed as tdist

from kinret.dist import dist_rank_world
from kinret.io import atomic_path
from kinret.log import progress
from kinret.readback import DamagedFile, check_ids, read_npz, rebuilt

log = logging.getLogger(__name__)
CHUNK = int(os.environ.get("KINRET_EMBED_CHUNK", 1024))  # images per saved part of a cache being built


def file_digest(path: str | Path) -> str:
    """Content hash of a file (a checkpoint): a retrained or resumed checkpoint gets a new key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_cache(cache: Path, ids: np.ndarray, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` cache whose stored `ids` must equal `ids`, row for row, each (views, len(ids), ...),
    `keys` among them; `DamagedFile` otherwise."""
    data = read_npz(cache, ("ids", *keys))
    check_ids(cache, data.pop("ids"), ids)
    wrong = [k for k, v in data.items() if v.ndim < 2 or v.shape[1] != len(ids)]
    if wrong or not data:
        raise DamagedFile(cache, f"array {wrong[0]!r} has shape {data[wrong[0]].shape}, not (views, {len(ids)}, ...)"
                          if wrong else "holds no array beside its ids")
    return data


def cached_arrays(cache: Path) -> set[str] | None:
    """The names of the arrays an `.npz` cache holds beside its ids (listed, not read), or None when there is no
    cache or it cannot be listed (a damaged one, named when it is read)."""
    try:
        with zipfile.ZipFile(cache) as z:
            return {n.removesuffix(".npy") for n in z.namelist()} - {"ids"}
    except (OSError, zipfile.BadZipFile):
        return None


def chunk_bounds(n: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """The (start, stop) rows of each saved chunk of a cache of `n` rows."""
    return [(a, min(a + chunk, n)) for a in range(0, max(n, 1), chunk)]


def build_in_chunks(cache: Path, ids: np.ndarray, compute: Callable[[int, int], dict[str, np.ndarray]],
                    chunk: int = CHUNK, shard: bool = False, desc: str | None = None, keys: Sequence[str] = (),
                    replace: bool = False) -> dict[str, np.ndarray]:
    """`compute(start, stop)` -> arrays of shape (views, stop - start, ...) for every chunk of rows, each chunk saved
    under ``{cache}.parts/`` as soon as it is done; then the whole `.npz` (with `ids`) is written atomically and the
    parts removed. A chunk already saved by a killed run is read, not recomputed.

    With `shard`, under torchrun, every process must call this in the same order: process r computes chunks r,
    r + world, ...; after a barrier rank 0 joins the parts into the cache and the others read it after a second
    barrier. (The trainer instead lets rank 0 fill its caches alone, so it does not shard.) A damaged cache or
    chunk (`read_cache`: `keys` are the arrays it must hold) is computed again, with one warning, and replaced.
    With `replace`, a cache already there is computed again without being read (it holds fewer arrays than asked)."""
    if cache.is_file() and not replace:
        try:
            return read_cache(cache, ids, keys)
        except DamagedFile as exc:
            rebuilt(exc, "computed again")
    rank, world = dist_rank_world() if shard else (0, 1)
    parts_dir = cache.with_name(cache.name + ".parts")
    bounds = chunk_bounds(len(ids), chunk)
    pieces: dict[int, dict[str, np.ndarray]] = {}
    mine = [i for i in range(len(bounds)) if i % world == rank]
    for i in progress(mine, desc=f"{desc or cache.stem} ({len(ids):,} images)", unit="chunk"):
        start, stop = bounds[i]
        part = parts_dir / f"rows{start:09d}-{stop:09d}.npz"
        if part.is_file():
            continue
        pieces[i] = compute(start, stop)
        with atomic_path(part, suffix=".npz") as tmp:
            np.savez(tmp, ids=ids[start:stop], **pieces[i])
    if world > 1:
        tdist.barrier()
    if rank == 0:
        for i, (start, stop) in enumerate(bounds):
            if i not in pieces:
                try:
                    pieces[i] = read_cache(parts_dir / f"rows{start:09d}-{stop:09d}.npz", ids[start:stop], keys)
                except DamagedFile as exc:
                    rebuilt(exc, "computed again")
                    pieces[i] = compute(start, stop)
        whole = {k: np.concatenate([pieces[i][k] for i in range(len(bounds))], axis=1) for k in pieces[0]}
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, ids=ids, **whole)
        shutil.rmtree(parts_dir, ignore_errors=True)
    if world > 1:
        tdist.barrier()
    return whole if rank == 0 else read_cache(cache, ids, keys)
