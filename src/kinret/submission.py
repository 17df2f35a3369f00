"""The Codalab submission: `predictions.csv` (one row per probe in probe-index order, every gallery index best
first, integers, no header, no index column) zipped with the CSV at the root of the archive.

`write_predictions` writes a ranking held whole; `score_rank_write` scores, ranks, writes and evaluates a block of
probes at a time on a few threads, for large galleries.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import KinretInputError
from .io import atomic_path
from .metrics import AP_VARIANTS, Track3Scores, family_codes, ranked_block_metrics, track3_scores
from .ranking import first_non_permutation, rank_gallery

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


_LOCAL = struct.Struct("<IHHHHHIIIHH")  # zip local file header, APPNOTE 4.3.7
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header, 4.3.12
_END = struct.Struct("<IHHHHIIH")  # end of central directory record, 4.3.16


def _deflate_block(data: bytes, last: bool) -> bytes:
    """Raw deflate of one block, Huffman coding only: on rows of shuffled indices LZ77 finds little to match, so
    this is ~1.8x faster than level 1 and ~13% smaller. A sync flush ends the block on a byte boundary, so independently
    compressed blocks concatenate into one stream (as pigz does); the last one finishes it."""
    co = zlib.compressobj(1, zlib.DEFLATED, -15, 8, zlib.Z_HUFFMAN_ONLY)
    return co.compress(data) + co.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class _DeflatedMember:
    """A zip archive of one deflated member, written block by block to the binary file `f` (at its start); `close`
    patches the CRC and sizes into the local header and writes the central directory. No zip64: < 4 GiB."""

    def __init__(self, f: io.BufferedWriter, name: str) -> None:
        y, mo, d, h, mi, sec = time.localtime()[:6]
        self.f, self.name = f, name.encode()
        self.dos = ((h << 11) | (mi << 5) | (sec // 2), ((y - 1980) << 9) | (mo << 5) | d)
        self.crc = self.csize = self.usize = 0
        f.write(self._header())

    def _header(self) -> bytes:
        return _LOCAL.pack(0x04034B50, 20, 0, 8, *self.dos, self.crc, self.csize, self.usize, len(self.name), 0) + \
            self.name

    def write(self, data: bytes, deflated: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.usize += len(data)
        self.csize += len(deflated)
        self.f.write(deflated)

    def close(self) -> None:
        if max(self.usize, self.csize) >= 0xFFFFFFFF:
            raise ValueError(f"{self.usize} bytes need zip64; use write_predictions")
        end = self.f.tell()
        self.f.seek(0)
        self.f.write(self._header())
        self.f.seek(end)
        central = _CENTRAL.pack(0x02014B50, (3 << 8) | 20, 20, 0, 8, *self.dos, self.crc, self.csize, self.usize,
                                len(self.name), 0, 0, 0, 0, 0o100644 << 16, 0) + self.name
        self.f.write(central + _END.pack(0x06054B50, 0, 0, 1, 1, len(central), end, 0))


def _blas_threads(n: int | None) -> contextlib.AbstractContextManager:
    """Cap BLAS at `n` threads for the block (process-wide, via threadpoolctl when installed, else no cap): with
    workers already on every core, BLAS threads that spin between calls slow the sorts by ~2x."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas") if n is not None else contextlib.nullcontext()


def _rank_block(score_rows: Callable[[int, int], np.ndarray], a: int, b: int, out: np.ndarray,
                codes: tuple[np.ndarray, np.ndarray] | None, aps: Sequence[str], deflate: bool) -> tuple:
    """Score, rank (into out[a:b]), encode, deflate and evaluate probes a..b-1.

    Returns the CSV bytes, their deflated block (or None), the metrics (or None) and the seconds per stage."""
    t0 = time.perf_counter()
    scores = score_rows(a, b)
    if scores.shape != (b - a, out.shape[1]):
        raise ValueError(f"score_rows({a}, {b}) gave shape {scores.shape}, expected ({b - a}, {out.shape[1]})")
    t1 = time.perf_counter()
    out[a:b] = rank_gallery(scores, dtype=out.dtype)
    t2 = time.perf_counter()
    data = _encode_rows(out[a:b])
    t3 = time.perf_counter()
    deflated = _deflate_block(data, last=b == len(out)) if deflate else None
    t4 = time.perf_counter()
    metrics = ranked_block_metrics(out[a:b], codes[0][a:b], codes[1], aps) if codes is not None else None
    t5 = time.perf_counter()
    return data, deflated, metrics, {"score": t1 - t0, "rank": t2 - t1, "encode": t3 - t2, "zip": t4 - t3,
                                     "evaluate": t5 - t4}


def score_rank_write(score_rows: Callable[[int, int], np.ndarray], n_probes: int, n_gallery: int,
                     csv_path: str | Path, zip_path: str | Path | None = None, probe_fids: Sequence | None = None,
                     gallery_fids: Sequence | None = None, aps: Sequence[str] = AP_VARIANTS, chunk_rows: int = 64,
                     threads: int = 2, blas_threads: int | None = None, timings: dict[str, float] | None = None,
                     ) -> tuple[np.ndarray, dict[str, Track3Scores]]:
    """Rank every probe, write `predictions.csv` (and the zip) and score it, `chunk_rows` probes at a time.

    `score_rows(a, b)` gives the float32 scores of probes a..b-1 (e.g. `kinret.ranking.probe_score_rows`).
    `threads` workers score, rank, encode, deflate and evaluate blocks; this thread writes them in order. The result
    equals `rank_gallery` + `write_predictions` + `evaluate_ranking` on the whole matrix (same CSV bytes, an
    equivalent zip), holding only the int32 ranking and a few blocks. Returns the ranking and Track3Scores by AP
    variant (empty without family ids). Rows are permutations by construction (each sort key carries its column),
    so they are not re-validated. BLAS gets `blas_threads` threads meanwhile (default: 1 when `threads` > 1).
    `timings`, when given, gains the seconds per stage, summed over threads.
    """
    if n_probes < 1 or n_gallery < 1:
        raise ValueError(f"need at least one probe and one gallery face, got {n_probes} x {n_gallery}")
    if n_gallery > _TOKEN_LIMIT or (zip_path is not None and n_probes * (_tokens(n_gallery)[1].sum() + n_gallery)
                                    >= 0xFFFFFFFF):
        raise ValueError(f"{n_probes} x {n_gallery} is too large for the blocked writer; use write_predictions")
    codes = None
    if probe_fids is not None and gallery_fids is not None:
        if (len(probe_fids), len(gallery_fids)) != (n_probes, n_gallery):
            raise ValueError(f"family ids ({len(probe_fids)}, {len(gallery_fids)}) do not match "
                             f"{n_probes} x {n_gallery}")
        codes = tuple(c.astype(np.int32) for c in family_codes(probe_fids, gallery_fids))
    ranking = np.empty((n_probes, n_gallery), dtype=np.int32)
    ap = {v: np.zeros(n_probes) for v in aps} if codes is not None else {}
    first = np.zeros(n_probes, dtype=np.int64)
    times = dict.fromkeys(("score", "rank", "encode", "evaluate", "write_csv", "zip"), 0.0)
    starts = list(range(0, n_probes, chunk_rows))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_blas_threads(blas_threads if blas_threads is not None or threads < 2 else 1))
        csv_file = stack.enter_context(stack.enter_context(atomic_path(csv_path)).open("wb"))
        member = None
        if zip_path is not None:
            zip_file = stack.enter_context(stack.enter_context(atomic_path(zip_path, suffix=".zip")).open("wb"))
            member = _DeflatedMember(zip_file, CSV_NAME)
        pool = stack.enter_context(ThreadPoolExecutor(max(1, threads)))
        stack.callback(pool.shutdown, cancel_futures=True)  # on an error, drop the blocks not started
        pending: list[Future] = []
        for i, a in enumerate(starts):
            while len(pending) < threads + 2 and i + len(pending) < len(starts):
                lo = starts[i + len(pending)]
                pending.append(pool.submit(_rank_block, score_rows, lo, min(lo + chunk_rows, n_probes), ranking,
                                           codes, aps, member is not None))
            data, deflated, metrics, stage = pending.pop(0).result()
            t0 = time.perf_counter()
            csv_file.write(data)
            t1 = time.perf_counter()
            if member is not None:
                member.write(data, deflated)
                if a == starts[-1]:
                    member.close()
            for key, value in stage.items():
                times[key] += value
            times["write_csv"] += t1 - t0
            times["zip"] += time.perf_counter() - t1
            if metrics is not None:
                for v, values in metrics[0].items():
                    ap[v][a:a + len(values)] = values
                first[a:a + len(metrics[1])] = metrics[1]
    if timings is not None:
        for key, value in times.items():
            timings[key] = timings.get(key, 0.0) + value
    return ranking, {v: track3_scores(ap[v], first, n_gallery, v) for v in ap}
