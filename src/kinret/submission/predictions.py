"""The Codalab submission: `predictions.csv` (one row per probe in probe-index order, every gallery index best
first, integers, no header, no index column) zipped with the CSV at the root of the archive.

`submit` ranks a score matrix, writes and validates the CSV and its zip, and scores it when the labels are known;
`read_predictions` reads any submission back, naming the first bad row.
"""

from __future__ import annotations

import functools
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kinret.data.split import Track3Split
from kinret.errors import KinretInputError
from kinret.io import atomic_path
from kinret.metrics import Track3Scores, evaluate_ranking
from kinret.scoring.ranking import first_non_permutation, rank_gallery

CSV_NAME = "predictions.csv"
_ROW_RE = re.compile(r"\d+(?:,\d+)*")
_TOKEN_LIMIT = 10**7  # "9999999," is the longest cell that fits the 8 bytes of one uint64 token


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
        with atomic_path(zip_path, suffix=".zip") as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                zf.writestr(CSV_NAME, data)
    return csv_path


def _first_bad_line(path: Path, lines: list[str], n_gallery: int) -> None:
    for n, line in enumerate(lines, start=1):
        if not _ROW_RE.fullmatch(line):
            cell = next((c for c in line.split(",") if not c.strip().isdigit()), line[:40])
            what = "a header or text" if n == 1 and not line[:1].isdigit() else "a non-integer cell"
            raise KinretInputError(path, f"row {n} holds {what}: {cell!r}", line=n)
        row = np.array(line.split(","), dtype=np.int64)
        if row.size != n_gallery or not np.array_equal(np.sort(row), np.arange(n_gallery)):
            raise KinretInputError(path, f"row {n} is not a permutation of 0..{n_gallery - 1} "
                                         f"({row.size} entries, {np.unique(row).size} distinct)", line=n)


def read_predictions(path: str | Path, n_probes: int, n_gallery: int) -> np.ndarray:
    """Read and validate a predictions file (plain CSV or a zip holding `predictions.csv` at its root).

    Raises KinretInputError naming the first bad row: a header, a non-integer cell, a row that is not a
    permutation of 0..N-1, or a row count other than `n_probes`.
    """
    path = Path(path)
    if not path.is_file():
        raise KinretInputError(path, "predictions file is missing")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if CSV_NAME not in zf.namelist():
                raise KinretInputError(path, f"zip has no {CSV_NAME} at its root (holds {zf.namelist()[:5]})")
            raw = zf.read(CSV_NAME)
    else:
        raw = path.read_bytes()
    # fast path: numpy's C parser on a file of digits, commas and line ends only
    if raw and not raw.translate(None, b"0123456789,\r\n"):
        try:
            ranking = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
        except ValueError:
            ranking = None
        if ranking is not None and ranking.shape == (n_probes, n_gallery) and first_non_permutation(ranking) is None:
            return ranking
    # slow path, only to name the first bad row
    try:
        lines = raw.decode("ascii").splitlines()
    except UnicodeDecodeError as exc:
        raise KinretInputError(path, f"not a text file ({exc})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != n_probes and not (lines and not _ROW_RE.fullmatch(lines[0])):
        raise KinretInputError(path, f"has {len(lines)} rows, expected one per probe ({n_probes})")
    _first_bad_line(path, lines, n_gallery)
    # every line is a valid row, so the count is what is wrong (or a header shifted it, caught above)
    raise KinretInputError(path, f"has {len(lines)} rows, expected one per probe ({n_probes})")


@dataclass(frozen=True)
class SubmissionResult:
    csv_path: Path
    zip_path: Path
    ranking: np.ndarray
    scores: dict[str, Track3Scores]  # by AP variant; empty when the split is unlabelled


def submit(scores: np.ndarray, split: Track3Split, out_dir: str | Path, truth: Track3Split | None = None,
           zip_name: str = "submission.zip") -> SubmissionResult:
    """Rank, write and validate `predictions.csv` plus its zip, and score it when labels are known."""
    if scores.shape != (len(split.probes), len(split.gallery)):
        raise ValueError(f"score matrix {scores.shape} does not match {split.describe()}")
    ranking = rank_gallery(scores)
    out_dir = Path(out_dir)
    csv_path = write_predictions(ranking, out_dir / "predictions.csv", out_dir / zip_name)
    labels = truth if truth is not None else (split if split.labelled else None)
    results = {}
    if labels is not None:
        if (len(labels.probes), len(labels.gallery)) != scores.shape:
            raise KinretInputError(None, f"truth lists ({labels.describe()}) do not match the split "
                                         f"({split.describe()})")
        results = {ap: evaluate_ranking(ranking, labels.probe_fids, labels.gallery_fids, ap=ap)
                   for ap in ("standard", "trapezoid")}
    return SubmissionResult(csv_path, out_dir / zip_name, ranking, results)
