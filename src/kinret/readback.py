"""Files the kit wrote, read back checked: one home for "is this still what the kit wrote?".

A run reads back what an earlier run wrote (caches, score matrices, checkpoints, run records), and such a file can
be damaged after it was written: a disk error, an interrupted copy, a sync tool, a hand edit. Each reader here checks
the file as a whole as it reads it (it parses to the end, has the type, keys, columns, shape and ids asked for) and
raises one exception, `DamagedFile`, naming the file and what is wrong with it: truncated, garbled, or of the right
format holding the wrong thing.

The caller decides what a damaged file means. A file the kit can rebuild (a cache, a score matrix, a record derived
from a checkpoint) is rebuilt after `rebuilt` logs one warning naming it. A record the kit cannot rebuild without
losing the user's work stops the run: `DamagedFile` is a `KinretInputError`, so, uncaught, it is one line naming the
file and exit code 2, and `advise` says what to do. A missing file is not damage: `FileNotFoundError` passes through,
as does `PermissionError` (each caller knows what an absent file means).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kinret.errors import KinretInputError

log = logging.getLogger(__name__)
DELETE_IT = "delete it and run the same command again"
PASS_THROUGH = (FileNotFoundError, PermissionError)  # not damage: the caller knows what an absent file means
ZIP, NPY = b"PK\x03\x04", b"\x93NUMPY"  # how an .npz archive (and torch.save's file) and an .npy array begin
_VERIFIED: set[tuple[str, int, int]] = set()  # the archives whose checksums held: path, size, mtime
_WARNED: set[tuple[str, int, int]] = set()  # the damaged files warned about: path, size, mtime


class DamagedFile(KinretInputError):
    """`path` is no longer what the kit wrote there (`reason` says how); `todo` is what the user can do about it."""

    def __init__(self, path: str | os.PathLike, reason: str, todo: str = DELETE_IT):
        self.reason, self.todo = reason, todo
        super().__init__(path, f"damaged ({reason}): {todo}")

    def advise(self, todo: str) -> DamagedFile:
        """The same damage with what to do about it, for a caller that stops the run."""
        return DamagedFile(self.path, self.reason, todo)


def rebuilt(exc: DamagedFile, how: str) -> None:
    """Log the one warning for a damaged file the kit rebuilds: its path, what is wrong and `how` it is rebuilt
    (once per file, however many readers of this process meet it before it is rewritten)."""
    try:
        st = os.stat(exc.path)
        seen = (exc.path, st.st_size, st.st_mtime_ns)
    except OSError:
        seen = (exc.path, -1, -1)
    if seen in _WARNED:
        return
    _WARNED.add(seen)
    log.warning("%s: damaged (%s): %s", exc.path, exc.reason, how)


def _why(exc: BaseException) -> str:
    """The first sentence of a reader's exception, shortened: what the damage looked like to it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(". ")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _starts_as(path: Path, magic: bytes, what: str) -> None:
    """`DamagedFile` unless `path` begins with `magic`, as every `what` does (a file garbled from its start)."""
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        raise DamagedFile(path, f"not {what}: it does not begin as one" if head else "empty")


def read_json(path: str | os.PathLike, kind: type = dict, keys: Sequence[str] = ()) -> Any:
    """The JSON value in `path`, which must be UTF-8 JSON of type `kind` (an object holding `keys`)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise DamagedFile(path, f"not JSON: {_why(exc)}") from None
    return _holding(path, data, kind, keys, f"holds a JSON {type(data).__name__}, a {kind.__name__} was written there")


def read_npz(path: str | os.PathLike, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Every array of the `.npz` archive `path`, read whole (so the archive's checksums are checked), holding at
    least `keys`; no pickled objects."""
    path = Path(path)
    _starts_as(path, ZIP, "an .npz archive")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a bare array, not an .npz archive")
        with data:
            out = {k: data[k] for k in data.files}
    except PASS_THROUGH:
        raise
    except Exception as exc:  # zipfile, zlib, numpy and pickle each raise their own types for bytes they cannot read
        raise DamagedFile(path, f"unreadable .npz: {_why(exc)}") from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise DamagedFile(path, f"has no array {missing[0]!r} (it holds {sorted(out)})")
    return out


def read_npy(path: str | os.PathLike, shape: Sequence[int | None] | None = None, dtype: Any = None,
             mmap: bool = False) -> np.ndarray:
    """The `.npy` array in `path` (memory-mapped with `mmap`): its shape must be `shape` (None: any length on that
    axis) and its dtype `dtype`, where given; no pickled objects."""
    path = Path(path)
    _starts_as(path, NPY, "an .npy array")
    try:
        found = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except PASS_THROUGH:
        raise
    except Exception as exc:  # a short file, a garbled header, bytes that are no .npy at all
        raise DamagedFile(path, f"unreadable .npy: {_why(exc)}") from None
    if not isinstance(found, np.ndarray):
        found.close()
        raise DamagedFile(path, "an .npz archive, not an .npy array")
    if dtype is not None and found.dtype != np.dtype(dtype):
        raise DamagedFile(path, f"holds {found.dtype} values, {np.dtype(dtype)} expected")
    if shape is not None and (found.ndim != len(shape) or any(w is not None and w != s
                                                              for w, s in zip(shape, found.shape, strict=True))):
        want = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
        raise DamagedFile(path, f"holds an array of shape {found.shape}, {want} expected")
    return found


def _verify_zip(path: Path) -> None:
    """`DamagedFile` unless every record of the zip archive `path` matches its CRC-32 (torch.load checks none): a
    block garbled inside a tensor is found. Read once per file and process while its size and mtime stay."""
    st = path.stat()
    seen = (str(path), st.st_size, st.st_mtime_ns)
    if seen in _VERIFIED:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # zipfile raises BadZipFile, EOFError, zlib.error, ... for an archive it cannot read
        raise DamagedFile(path, f"unreadable zip archive: {_why(exc)}") from None
    if bad is not None:
        raise DamagedFile(path, f"its record {bad.rsplit('/', 1)[-1]} fails its CRC-32 check")
    _VERIFIED.add(seen)


def read_torch(path: str | os.PathLike, keys: Sequence[str] = (), mmap: bool = False,
               map_location: Any = "cpu", verify: bool = False) -> dict:
    """The dict `torch.save` wrote to `path` (a checkpoint: plain Python metadata beside the tensors), holding
    `keys`. With `mmap` the tensors are mapped, not read: the archive's directory and the metadata are checked; with
    `verify` every record's CRC-32 too (the whole file read, once per process)."""
    import torch

    path = Path(path)
    _starts_as(path, ZIP, "a checkpoint (the zip archive torch.save writes)")
    if verify:
        _verify_zip(path)
    try:
        found = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except PASS_THROUGH:
        raise
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a file it cannot read
        raise DamagedFile(path, f"unreadable by torch.load: {_why(exc)}") from None
    return _holding(path, found, dict, keys, f"holds a {type(found).__name__}, not the dict of a checkpoint")


def _holding(path: Path, found: Any, kind: type, keys: Sequence[str], wrong_type: str) -> Any:
    """`found`, read from `path`, when it is a `kind` holding `keys`; else `DamagedFile` saying what is wrong."""
    if not isinstance(found, kind):
        raise DamagedFile(path, wrong_type)
    missing = [k for k in keys if k not in found]
    if missing:
        raise DamagedFile(path, f"has no {missing[0]!r}")
    return found


def read_table(path: str | os.PathLike, columns: Sequence[str], numeric: bool = False):
    """The CSV table `path` as a pandas DataFrame, as the kit writes one: UTF-8, a header of exactly `columns`, every
    line complete (as many fields as columns, the last line ended); with `numeric`, every value a number or nan."""
    import pandas as pd

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text") from None
    if not text.endswith("\n"):
        raise DamagedFile(path, "cut short: its last line has no end")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != list(columns):
        raise DamagedFile(path, f"its header is not {','.join(columns)}")
    short = next((i for i, row in enumerate(rows) if len(row) != len(columns)), None)
    if short is not None:
        raise DamagedFile(path, f"line {short + 1} has {len(rows[short])} fields, not {len(columns)}")
    frame = pd.read_csv(io.StringIO(text))
    if numeric:
        try:
            frame = frame.astype(float)
        except ValueError as exc:
            raise DamagedFile(path, f"a value is not a number ({_why(exc)})") from None
    return frame


def check_ids(path: str | os.PathLike, stored: np.ndarray, want: Sequence[str] | np.ndarray,
              what: str = "image") -> None:
    """Raise `DamagedFile` for `path` unless the ids it `stored` are `want`, row for row."""
    stored, want = np.asarray(stored).astype(str), np.asarray(want).astype(str)
    if stored.shape != want.shape:
        raise DamagedFile(path, f"holds {stored.size} {what} ids, {want.size} expected")
    differ = stored != want
    if differ.any():
        i = int(np.argmax(differ))
        raise DamagedFile(path, f"{what} id at row {i} is {str(stored[i])!r}, {str(want[i])!r} expected")


def read_record(path: str | os.PathLike, how: str) -> dict:
    """The JSON object in `path`, a record the kit can do without (measured rates, the last run's record): {} when
    there is none or it cannot be opened; a damaged one is removed after one warning (`how`: what takes its place)
    and is {} too."""
    try:
        return read_json(path, dict)
    except DamagedFile as exc:
        rebuilt(exc, f"removed; {how}")
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)
    except OSError:
        pass
    return {}
