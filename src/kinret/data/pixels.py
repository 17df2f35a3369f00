"""Pixels of many images: the image table over families, every image decoded once per input size into one cached
uint8 array, rows gathered from it (memory-mapped), and the conversion to a network's normalised float input."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kinret.data.fiw import Family
from kinret.data.images import load_images
from kinret.io import atomic_path
from kinret.log import progress
from kinret.readback import DamagedFile, read_npy, rebuilt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageTable:
    """Every image of some families: `family[i]` indexes `fids`, `member[i]` is a table-wide member number."""

    paths: tuple[Path, ...]
    family: np.ndarray
    member: np.ndarray
    fids: tuple[str, ...]

    @classmethod
    def from_families(cls, families: Sequence[Family]) -> ImageTable:
        paths, fam, mem = [], [], []
        m = 0
        for f, family in enumerate(families):
            for member in family.members:
                paths += member.images
                fam += [f] * len(member.images)
                mem += [m] * len(member.images)
                m += 1
        return cls(tuple(paths), np.array(fam, dtype=np.int64), np.array(mem, dtype=np.int64),
                   tuple(f.fid for f in families))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, fids: set[str]) -> np.ndarray:
        """Row indices of the images of these families."""
        keep = np.array([self.fids[f] in fids for f in range(len(self.fids))], dtype=bool)
        return np.flatnonzero(keep[self.family]) if len(self.family) else np.zeros(0, dtype=np.int64)


RACY_NS = 2_000_000_000  # a file changed this close to its hashing may change again within one timestamp tick
_HASHES: dict[str, tuple[tuple[int, ...], int, str]] = {}  # path -> (stat signature, hashed at, sha1), this process


def _hash_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha1(fh.read(), usedforsecurity=False).hexdigest()


def content_hashes(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The SHA-1 of every file's bytes (about 60 µs a small JPEG here). A hash taken earlier in this process is
    reused only while the file's size, mtime, ctime, inode and device are unchanged and the file had last changed
    well before it was hashed: writing a file or restoring its mtime (`os.utime`) sets its ctime to now."""
    out = []
    for p in paths:
        st = os.stat(p)
        sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        known = _HASHES.get(os.fspath(p))
        if known is not None and known[0] == sig and max(st.st_mtime_ns, st.st_ctime_ns) < known[1] - RACY_NS:
            out.append(known[2])
            continue
        hashed_at = time.time_ns()
        digest = _hash_file(p)
        if os.stat(p).st_ctime_ns == st.st_ctime_ns:  # not changed while it was read
            _HASHES[os.fspath(p)] = (sig, hashed_at, digest)
        out.append(digest)
    return out


def file_list_digest(paths: Sequence[Path], extra: str = "") -> str:
    """Names a list of files by path and content: a changed or replaced image changes the key, whatever its size
    and modification time say."""
    h = hashlib.sha256(extra.encode())
    for p, digest in zip(paths, content_hashes(paths), strict=True):
        h.update(f"{p}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def decode_pixels(paths: Sequence[Path], size: int, cache_dir: Path | None) -> np.ndarray:
    """All images as one uint8 (N, size, size, 3) array; cached as .npy keyed by the files and the size."""
    if cache_dir is not None:
        cache = Path(cache_dir) / f"pixels_{size}px_{file_list_digest(paths, str(size))}.npy"
        if cache.is_file():
            try:
                return read_npy(cache, (len(paths), size, size, 3), np.uint8, mmap=True)
            except DamagedFile as exc:
                rebuilt(exc, "decoded again")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    chunk = 256
    for start in progress(range(0, len(paths), chunk), desc=f"decode {size}px", total=math.ceil(len(paths) / chunk)):
        arrays, _ = load_images(paths[start:start + chunk], size=size)
        out[start:start + len(arrays)] = np.stack(arrays)
    if cache_dir is not None:
        with atomic_path(cache, suffix=".npy") as tmp:
            np.save(tmp, out)
        log.info("cached %d decoded images in %s", len(paths), cache)
    return out


def gather(pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """pixels[rows], reading a memory-mapped array in ascending row order (duplicates allowed)."""
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + pixels.shape[1:], dtype=pixels.dtype)
    out[order] = pixels[rows[order]]
    return out


def to_float(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] on `device`."""
    x = torch.from_numpy(np.array(pixels, copy=True)) if isinstance(pixels, np.ndarray) else pixels  # may be a mmap
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
