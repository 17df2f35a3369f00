"""Atomic file writes: every output goes to a temporary name beside its target, then `os.replace`.

A run killed half-way therefore leaves either the old file or the new one, never a truncated file. A write that
fails because the disk is full raises `DiskFullError` naming the folder, what the write had put there and what is
free: an environment fault (exit code 3), not a bug of the kit and not bad input.
"""

from __future__ import annotations

import contextlib
import errno
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
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what torch.save's zip writer raises when a write comes up short, i.e. when the disk filled under it
SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def human_bytes(n: float) -> str:
    """123 B, 4.5 KB, 6.7 MB, 8.9 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent); None when it cannot be told."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk is full: ENOSPC or EDQUOT, or torch.save's short-write RuntimeError."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in SHORT_WRITE)


class DiskFullError(Exception):
    """The disk filled up while `name` was being written into `folder`: one line naming the folder, what the write
    needs (more than it had written when it failed) and what is free (told when shown, after the failed write's
    temporary is removed). `reported`: a worker process already showed the line; only the exit code is left."""

    def __init__(self, folder: str | os.PathLike, name: str = "", written: int = 0, reported: bool = False):
        super().__init__(str(folder), name, written)
        self.folder, self.name, self.written, self.reported = Path(folder), name, written, reported

    def __str__(self) -> str:
        free = free_bytes(self.folder)
        what = f"writing {self.name}" if self.name else "a write"
        needs = f"needs more than the {human_bytes(written)} it had written" if (written := self.written) else \
            "needs more"
        return (f"{self.folder}: the disk is full: {what} {needs}, and "
                f"{'an unknown amount' if free is None else human_bytes(free)} is free there; free some space "
                "(make_submission.py --clean-cache frees the caches) or write elsewhere (--runs, --ensemble-dir, "
                "--out), then run the same command again (make_submission.py goes on from what is done)")


def _size(path: Path) -> int:
    try:
        return sum(p.stat().st_size for p in [path, *path.rglob("*")] if p.is_file()) if path.exists() else 0
    except OSError:
        return 0


def _reraise_disk_full(exc: BaseException, target: Path, written: Path | None) -> None:
    """Raise `DiskFullError` for `target` when `exc` says the disk is full (with what `written` received)."""
    if is_disk_full(exc):
        raise DiskFullError(target.parent, target.name, _size(written) if written else 0) from exc


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` only if the block succeeds.

    `suffix` keeps an extension on the temporary name for writers that dispatch on it (``np.save`` adds
    ``.npy`` to a name without one). A full disk, in the block or here, raises `DiskFullError`.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as exc:
        _reraise_disk_full(exc, target, None)
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, target)
    except (OSError, RuntimeError) as exc:
        _reraise_disk_full(exc, target, tmp_path)
        raise
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
    """Yield a temporary folder beside `target`; it replaces `target` as a whole only if the block succeeds. A full
    disk raises `DiskFullError`."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        _reraise_disk_full(exc, target, None)
        raise
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as exc:
        _reraise_disk_full(exc, target, tmp)
        raise
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
