"""Atomic file writes: every output goes to a temporary name beside its target, then `os.replace`.

A run killed half-way therefore leaves either the old file or the new one, never a truncated file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from kinret.errors import KinretInputError

log = logging.getLogger(__name__)
TEMP_NAME = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")  # what atomic_path / atomic_dir name their temporaries


def _umask() -> int:
    mask = os.umask(0)  # read once at import (single-threaded): os.umask can only be read by setting it
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only entries; the renamed outputs get the modes a plain open()/mkdir() would give
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` only if the block succeeds.

    `suffix` keeps an extension on the temporary name for writers that dispatch on it (``np.save`` adds
    ``.npy`` to a name without one).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; it replaces `target` as a whole only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_writable(folder: str | os.PathLike) -> Path:
    """Prove that `folder` can be written, or created, before a run starts its work, so it fails at its start and
    not after an hour: a probe file is created and removed in the folder, or, when it does not exist yet, a probe
    folder in its nearest existing parent (nothing is left behind). Permission bits alone do not tell: root ignores
    them, while an immutable folder or a read-only mount refuses root too. KinretInputError naming it otherwise."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file, not a folder")
        if existing == folder:
            fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-check.", suffix=".tmp", dir=existing))
    except OSError as exc:
        raise KinretInputError(folder, f"output folder cannot be written ({exc.strerror or exc})") from None
    return folder


def remove_stale_temporaries(folders: Iterable[str | os.PathLike], before: float) -> list[Path]:
    """Remove what killed atomic writes left under `folders`: hidden temporaries (`.NAME.xxxx.tmp[.ext]`, files or
    folders) last modified before `before` (a time.time() value: the start of this run, so a write in flight is
    never touched). Returns what was removed."""
    removed = []
    for top in folders:
        if not Path(top).is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*filenames, *dirnames]:
                path = Path(dirpath) / name
                if not TEMP_NAME.match(name) or path.lstat().st_mtime >= before:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    dirnames.remove(name)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run, e.g. %s", len(removed), removed[0])
    return removed
