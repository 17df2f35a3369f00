"""The Codalab submission: `predictions.csv` (one row per probe in probe-index order, every gallery index best
first, integers, no header, no index column) zipped with the CSV at the root of the archive.

`submit` ranks a score matrix, writes and validates the CSV and its zip, and scores it when the labels are known;
`read_predictions` reads any submission back, naming the first bad row.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from kinret.data.track3 import Track3Split
from kinret.errors import KinretInputError
from kinret.io import atomic_path
from kinret.log import progress
from kinret.metrics import (
    RANK_KS,
    Track3Scores,
    average_precision,
    family_codes,
    first_hit_rank,
    hits_in_rank_order,
)
from kinret.scoring.ranking import first_non_permutation, rank_gallery

CSV_NAME = "predictions.csv"
_ROW_RE = re.compile(r"\d+(?:,\d+)*")
_LINE_END = re.compile(r"\r\n|\r|\n")
_TOKEN_LIMIT = 10**7  # "9999999," is the longest cell that fits the 8 bytes of one uint64 token
_CHUNK = 1 << 20  # bytes per read: what a file or zip member may cost in memory beyond the size limit
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}
# what zipfile and its decompressors raise on a damaged archive (struct.error and ValueError on garbled headers,
# EOFError on a cut stream, OSError on a seek past the end)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, struct.error, ValueError,
               NotImplementedError, RuntimeError)


@functools.lru_cache(maxsize=4)
def _tokens(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index i of 0..n-1 as the ASCII bytes "i," NUL-padded to one uint64, and the digit count of each i."""
    idx = np.arange(n, dtype=np.int64)
    digits = 1 + sum((idx >= 10**p).astype(np.int64) for p in range(1, 7))
    table = np.zeros((n, 8), dtype=np.uint8)
    for d in range(int(np.max(digits, initial=1))):
        has = digits > d
        table[has, digits[has] - 1 - d] = ord("0") + (idx[has] // 10**d) % 10
    table[idx, digits] = ord(",")
    tokens = table.view(np.uint64).ravel()
    tokens.flags.writeable = digits.flags.writeable = False  # shared by the cache
    return tokens, digits


def _encode_rows(ranking: np.ndarray) -> bytes:
    """ASCII CSV of rows that each hold indices 0..N-1: one uint64 token per cell, gathered, its last comma made a
    line end, the NUL padding deleted (~5x faster than building the digits in numpy)."""
    n = ranking.shape[1]
    if n > _TOKEN_LIMIT:
        return _encode_digits(ranking)
    tokens, digits = _tokens(n)
    cells = tokens[ranking]
    cells.view(np.uint8).reshape(*ranking.shape, 8)[np.arange(len(ranking)), -1, digits[ranking[:, -1]]] = ord("\n")
    return cells.tobytes().translate(None, b"\0")


def _encode_digits(ranking: np.ndarray) -> bytes:
    """ASCII CSV of non-negative integer rows, built digit by digit in numpy."""
    flat = ranking.ravel()
    n_digits = np.ones(flat.shape, dtype=np.int64)
    for power in range(1, 19):
        more = flat >= 10**power
        if not more.any():
            break
        n_digits += more
    ends = np.cumsum(n_digits + 1)  # each cell is its digits plus one separator
    buf = np.empty(int(ends[-1]) if flat.size else 0, dtype=np.uint8)
    buf[ends - 1] = ord(",")
    buf[ends.reshape(ranking.shape)[:, -1] - 1] = ord("\n")
    for d in range(int(n_digits.max(initial=1))):
        has = n_digits > d
        buf[ends[has] - 2 - d] = ord("0") + (flat[has] // 10**d) % 10
    return buf.tobytes()


def format_predictions(ranking: np.ndarray, chunk_rows: int = 256) -> bytes:
    """CSV bytes of a validated ranking: integers only (never floats such as 3.0e+00), one line per probe."""
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or not np.issubdtype(ranking.dtype, np.integer) or 0 in ranking.shape:
        raise ValueError(f"ranking must be a non-empty 2-D integer array, got {ranking.dtype} {ranking.shape}")
    bad = first_non_permutation(ranking)
    if bad is not None:
        raise ValueError(f"ranking row {bad} (probe s{bad}) is not a permutation of 0..{ranking.shape[1] - 1}")
    return b"".join(_encode_rows(ranking[i:i + chunk_rows]) for i in range(0, ranking.shape[0], chunk_rows))


def write_predictions(ranking: np.ndarray, csv_path: str | Path, zip_path: str | Path | None = None) -> Path:
    """Validate, then write `predictions.csv` (temp name, then rename; never appended) and optionally the zip."""
    data = format_predictions(ranking)
    csv_path = Path(csv_path)
    with atomic_path(csv_path) as tmp:
        tmp.write_bytes(data)
    if zip_path is not None:
        zip_predictions(csv_path, zip_path)
    return csv_path


def zip_predictions(csv_path: str | Path, zip_path: str | Path, chunk: int = 16 * _CHUNK) -> Path:
    """The zip of `csv_path` with `predictions.csv` at its root (deflate level 1), read and compressed `chunk` bytes
    at a time (memory stays bounded whatever the file's size), written atomically, a progress line at least once a
    minute."""
    csv_path = Path(csv_path)
    size = csv_path.stat().st_size
    with atomic_path(zip_path, suffix=".zip") as tmp:
        with (zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
              zf.open(CSV_NAME, "w", force_zip64=size * 1.05 > zipfile.ZIP64_LIMIT) as member,
              csv_path.open("rb") as src):
            for _ in progress(range(0, size, chunk), desc=f"zip {Path(zip_path).name}", unit="chunk"):
                member.write(src.read(chunk))
    return Path(zip_path)


def max_predictions_bytes(n_probes: int, n_gallery: int) -> int:
    """The most bytes a predictions file for `n_probes` x `n_gallery` may hold: every cell at the width of the largest
    index plus its separator, a CR per row for CRLF line ends, doubled, plus 1 MiB. A larger file (or a zip member
    that declares or inflates to more) cannot be a ranking, so it is refused before it is read into memory."""
    width = len(str(max(n_gallery - 1, 0)))
    return 2 * n_probes * (n_gallery * (width + 1) + 1) + (1 << 20)


def read_at_most(stream: BinaryIO, limit: int, chunk: int = _CHUNK) -> bytes | None:
    """Read `stream` to its end in chunks; None as soon as it holds more than `limit` bytes. Memory stays within
    limit + chunk whatever a header claimed the stream would hold."""
    buf = bytearray()
    while data := stream.read(chunk):
        buf += data
        if len(buf) > limit:
            return None
    return bytes(buf)


def _looks_like_zip(path: Path) -> bool:
    # a zip cut short loses its central directory, so is_zipfile says no; its first bytes still say it was a zip
    with path.open("rb") as f:
        head = f.read(4)
    return head in (b"PK\x03\x04", b"PK\x05\x06") or zipfile.is_zipfile(path)


def _read_member(path: Path, limit: int, what: str) -> bytes:
    """`predictions.csv` from the zip at `path`. Refused: a damaged archive, no member of that name at the root or
    several, an encrypted member, a compression other than deflate or stored (zipfile inflates bzip2 and lzma without
    an output bound, so a small member could fill memory), and a member that declares or inflates past `limit`."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if i.filename == CSV_NAME]
            if not infos:
                raise KinretInputError(path, f"zip has no {CSV_NAME} at its root (holds {zf.namelist()[:5]})")
            if len(infos) > 1:
                raise KinretInputError(path, f"zip holds {len(infos)} members named {CSV_NAME}; keep one")
            info = infos[0]
            if info.flag_bits & 0x1:
                raise KinretInputError(path, f"{CSV_NAME} in the zip is encrypted; zip it without a password")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                method = _ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
                raise KinretInputError(path, f"{CSV_NAME} in the zip is compressed with {method}; only deflate or "
                                             "stored (what `zip` and the kit write) can be read")
            if info.file_size > limit:
                raise KinretInputError(path, f"{CSV_NAME} in the zip declares {info.file_size:,} bytes, more than "
                                             f"{what} can take ({limit:,} bytes at most)")
            with zf.open(info) as member:
                raw = read_at_most(member, limit)
    except KinretInputError:
        raise
    except _ZIP_ERRORS as exc:
        detail = str(exc) or type(exc).__name__  # zipfile's EOFError carries no message
        raise KinretInputError(path, f"is a corrupt or truncated zip archive ({detail})") from exc
    if raw is None:  # only when the header understated the size: zipfile stops at the declared size today
        raise KinretInputError(path, f"{CSV_NAME} in the zip inflates past {limit:,} bytes, more than {what} can take")
    return raw


def _read_raw(path: Path, n_probes: int, n_gallery: int) -> bytes:
    """The bytes of a predictions file or of the `predictions.csv` in its zip, refusing anything larger than
    `max_predictions_bytes` before reading it whole."""
    if not path.is_file():
        raise KinretInputError(path, "predictions file is missing")
    limit = max_predictions_bytes(n_probes, n_gallery)
    what = f"a ranking of {n_probes} probes x {n_gallery} gallery faces"
    try:
        if _looks_like_zip(path):
            return _read_member(path, limit, what)
        with path.open("rb") as f:
            raw = read_at_most(f, limit)
    except OSError as exc:  # unreadable (permissions, I/O error): still the user's file, not a bug of the kit
        raise KinretInputError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if raw is None:
        raise KinretInputError(path, f"is {path.stat().st_size:,} bytes, more than {what} can take "
                                     f"({limit:,} bytes at most)")
    return raw


def _show(cell: str) -> str:
    # a cell of thousands of digits would swamp the one-line message (cells reaching here are digits only)
    return f"'{cell}'" if len(cell) <= 25 else f"'{cell[:25]}...' ({len(cell)} digits)"


def _parse_rows(path: Path, lines: list[str], n_gallery: int) -> np.ndarray:
    """The rows as integers, or KinretInputError at the first bad one: a header or non-integer cell, a cell that is
    not a gallery index (checked on the text, so 25 or 5000 digits never reach int64 or int()), or a row that is
    not a permutation of 0..N-1."""
    width = len(str(n_gallery - 1))
    rows = []
    for n, line in enumerate(lines, start=1):
        if not _ROW_RE.fullmatch(line):
            cell = next((c for c in line.split(",") if not c.strip().isdigit()), line[:40])
            what = "a header or text" if n == 1 and not line[:1].isdigit() else "a non-integer cell"
            raise KinretInputError(path, f"row {n} holds {what}: {cell!r}", line=n)
        cells = line.split(",")
        # leading zeros off first: int() refuses more than 4300 digits even when they spell 0
        digits = [c.lstrip("0") or "0" for c in cells]
        big = next((c for c, d in zip(cells, digits, strict=True) if len(d) > width or int(d) >= n_gallery), None)
        if big is not None:
            raise KinretInputError(path, f"row {n} holds {_show(big)}, which is not a gallery index "
                                         f"(0..{n_gallery - 1})", line=n)
        row = np.array([int(d) for d in digits], dtype=np.int64)
        if row.size != n_gallery or not np.array_equal(np.sort(row), np.arange(n_gallery)):
            raise KinretInputError(path, f"row {n} is not a permutation of 0..{n_gallery - 1} "
                                         f"({row.size} entries, {np.unique(row).size} distinct)", line=n)
        rows.append(row)
    return np.stack(rows)


def read_predictions(path: str | Path, n_probes: int, n_gallery: int) -> np.ndarray:
    """Read and validate a predictions file (plain CSV or a zip holding `predictions.csv` at its root).

    Any file is either a valid ranking or a KinretInputError naming it and, where there is one, the first bad row:
    a header, a non-integer or non-ASCII cell, a cell that is not a gallery index, a row that is not a permutation
    of 0..N-1, a row count other than `n_probes`, an empty file, a damaged, encrypted or bzip2/lzma zip, and a file
    or zip member larger than `max_predictions_bytes` (read in bounded chunks, so a zip bomb never fills memory).
    """
    path = Path(path)
    raw = _read_raw(path, n_probes, n_gallery)
    if not raw.strip():
        raise KinretInputError(path, f"is empty: expected one row per probe ({n_probes})")
    # fast path: numpy's C parser on a file of digits, commas and line ends only
    if not raw.translate(None, b"0123456789,\r\n"):
        try:
            ranking = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
        except (ValueError, OverflowError):  # ragged rows, or a cell past int64: the slow path names the row
            ranking = None
        if ranking is not None and ranking.shape == (n_probes, n_gallery) and first_non_permutation(ranking) is None:
            return ranking
    # slow path, to name the first bad row (or to read what loadtxt would not, e.g. CR-only line ends)
    try:
        # only CR, LF and CRLF end a row: str.splitlines would also split on form feeds and \x1c..\x1e
        lines = _LINE_END.split(raw.decode("ascii"))
    except UnicodeDecodeError as exc:
        row = len(_LINE_END.split(raw[:exc.start].decode("ascii")))  # rows end as below: CR, LF or CRLF
        raise KinretInputError(path, f"row {row} holds the non-ASCII byte 0x{raw[exc.start]:02x}: not a text file",
                               line=row) from exc
    while lines and not lines[-1].strip(" \t"):  # str.strip would also drop \x1c..\x1f, which are not blank
        lines.pop()
    if not lines:
        raise KinretInputError(path, f"is empty: expected one row per probe ({n_probes})")
    if len(lines) != n_probes and _ROW_RE.fullmatch(lines[0]):
        raise KinretInputError(path, f"has {len(lines)} rows, expected one per probe ({n_probes})")
    ranking = _parse_rows(path, lines, n_gallery)
    if len(ranking) != n_probes:  # every row is valid, so only their count can be wrong
        raise KinretInputError(path, f"has {len(lines)} rows, expected one per probe ({n_probes})")
    return ranking


def predictions_shape(path: str | Path) -> tuple[int, int] | None:
    """(rows, cells in the first row) of a predictions file or of the `predictions.csv` in its zip, read in bounded
    chunks (only newlines and the first row's commas are counted); None when it cannot be read as text rows. Tells a
    ranking made for another data set from a damaged one."""
    path = Path(path)
    rows, first, ended, last = 0, 0, False, b"\n"
    try:
        with contextlib.ExitStack() as stack:
            if _looks_like_zip(path):
                zf = stack.enter_context(zipfile.ZipFile(path))
                stream = stack.enter_context(zf.open(CSV_NAME))
            else:
                stream = stack.enter_context(path.open("rb"))
            while chunk := stream.read(_CHUNK):
                if not ended:
                    head = chunk.split(b"\n", 1)[0]
                    first += head.count(b",")
                    ended = len(head) < len(chunk)
                rows += chunk.count(b"\n")
                last = chunk[-1:]
    except (KeyError, *_ZIP_ERRORS):
        return None
    return rows + (last != b"\n"), first + 1


@dataclass(frozen=True)
class SubmissionResult:
    csv_path: Path
    zip_path: Path
    scores: dict[str, Track3Scores]  # by AP variant; empty when the split is unlabelled


def _scored(hits: list[np.ndarray], firsts: list[np.ndarray], n_gallery: int) -> dict[str, Track3Scores]:
    """Both APs' `Track3Scores` from each block's per-probe AP (standard, trapezoid) and first-relative ranks, the
    numbers `evaluate_ranking` gives on the whole ranking."""
    first = np.concatenate(firsts)
    first = np.where(first < n_gallery, first, np.iinfo(np.int64).max)  # no relative: never a hit
    ks = sorted(set(RANK_KS) | {5})
    out = {}
    for i, ap in enumerate(("standard", "trapezoid")):
        per_probe = np.concatenate([h[i] for h in hits])
        out[ap] = Track3Scores(ap, float(per_probe.mean()), {int(k): float(np.mean(first < k)) for k in ks},
                               len(first), n_gallery, per_probe)
    return out


def submit(scores: np.ndarray, split: Track3Split, out_dir: str | Path, truth: Track3Split | None = None,
           zip_name: str = "submission.zip", block: int = 1 << 22) -> SubmissionResult:
    """Rank, write and validate `predictions.csv` plus its zip, and score it when labels are known: in blocks of
    about `block` scores (the ranking of a block is formatted, checked, written and scored, then released), with a
    progress line at least once a minute."""
    if scores.shape != (len(split.probes), len(split.gallery)):
        raise ValueError(f"score matrix {scores.shape} does not match {split.describe()}")
    if 0 in scores.shape:
        raise ValueError(f"nothing to rank: a {scores.shape} score matrix")
    labels = truth if truth is not None else (split if split.labelled else None)
    if labels is not None and (len(labels.probes), len(labels.gallery)) != scores.shape:
        raise KinretInputError(None, f"truth lists ({labels.describe()}) do not match the split "
                                     f"({split.describe()})")
    codes = family_codes(labels.probe_fids, labels.gallery_fids) if labels is not None else None
    out_dir = Path(out_dir)
    csv_path = out_dir / CSV_NAME
    p, n = scores.shape
    rows = max(1, block // max(n, 1))
    aps: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
    with atomic_path(csv_path) as tmp, tmp.open("wb") as f:
        for a in progress(range(0, p, rows), desc=f"rank and write {CSV_NAME}", unit="block"):
            ranking = rank_gallery(scores[a:a + rows])
            f.write(format_predictions(ranking))
            if codes is not None:
                hits = hits_in_rank_order(ranking, codes[0][a:a + rows, None] == codes[1][None, :])
                aps.append((average_precision(hits, "standard"), average_precision(hits, "trapezoid")))
                firsts.append(first_hit_rank(hits))
    zip_predictions(csv_path, out_dir / zip_name)
    return SubmissionResult(csv_path, out_dir / zip_name, _scored(aps, firsts, n) if codes is not None else {})
