"""Readers and writers of the Track-3 list files.

- index lists: `index path` per line (space separated, CRLF allowed, no trailing newline needed), or a CSV
  `index,path` with a header line;
- labelled lists (RFIW2021): `probe_list.csv` (unnamed index column, then `ref,fid,feat_path`) and
  `gallery_list.csv` (unnamed index column, then `fid,mid,labels,ref`); the path column may be called `original`.
Row i of a probe list is probe `s{i}`; row j of a gallery list is `face{j}.jpg`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kinret.data.fiw import FID_RE
from kinret.errors import KinretInputError
from kinret.io import write_text_atomic

INDEX_COLUMN_NAMES = ("", "index", "Unnamed: 0")
PATH_COLUMN_NAMES = ("ref", "original")
_INDEX_RE = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also passes "²", which int() refuses
_INDEX_DIGITS = 15  # no list is a thousand billion lines long; int() itself refuses more than 4300 digits
_LINE_END = re.compile(r"\r\n|\r|\n")


def _line_at(raw: bytes, pos: int) -> int:
    """The 1-based line of byte `pos`, counting line ends as `_read_lines` splits them."""
    return len(_LINE_END.split(raw[:pos].decode("latin-1")))


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a BOM allowed); a missing, unreadable or binary file is an input error."""
    if not path.is_file():
        raise KinretInputError(path, "list file is missing")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KinretInputError(path, f"list file cannot be read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_at(raw, exc.start)
        raise KinretInputError(path, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", line=line) from exc
    if b"\0" in raw:  # csv reads NUL since Python 3.11, and a path holding one makes os calls raise ValueError
        raise KinretInputError(path, "holds a NUL byte: not a text list", line=_line_at(raw, raw.index(b"\0")))
    # CR, LF or CRLF end a line, a missing trailing newline is fine; str.splitlines would also split on form feeds
    # and \x1c..\x1e, so the line numbers quoted in errors would drift from what an editor shows
    lines = _LINE_END.split(text)
    return lines[:-1] if lines and not lines[-1] else lines


def _gap_message(indices: Sequence[int], lines: Sequence[int], order: Sequence[int], k: int) -> str:
    """Say which index is missing and between which lines, for indices sorted by `order` whose k-th is not k."""
    r = order[k]
    if k == 0:
        return f"index 0 is missing: the {'list starts at' if r == 0 else 'lowest index is'} index {indices[r]}"
    prev = order[k - 1]
    if r == prev + 1:  # the list is in order here: the gap sits between two neighbouring lines
        return f"index {k} is missing: line {lines[r]} jumps from index {k - 1} to {indices[r]}"
    return f"index {k} is missing: the next index after {k - 1} (line {lines[prev]}) is {indices[r]}"


def _check_indices(path: Path, indices: Sequence[int], lines: Sequence[int]) -> list[int]:
    """Indices must be exactly 0..n-1, each once; returns the row order that sorts them.

    A duplicate is reported at its second line, a negative index where it stands, and a missing index at the
    first line after the gap (where it should have been), not at the last line, where "index n is outside
    0..n-1" would blame a line that is right.
    """
    seen: dict[int, int] = {}
    for idx, line in zip(indices, lines, strict=True):
        if idx in seen:
            raise KinretInputError(path, f"duplicate index {idx} (first seen on line {seen[idx]})", line=line)
        if idx < 0:
            raise KinretInputError(path, f"index {idx} is negative: indices run 0..{len(indices) - 1}", line=line)
        seen[idx] = line
    order = sorted(range(len(indices)), key=lambda r: indices[r])
    for k, r in enumerate(order):
        if indices[r] != k:  # distinct and non-negative, so index k is the first one missing
            raise KinretInputError(path, _gap_message(indices, lines, order, k), line=lines[r])
    return order


def _parse_index(path: Path, cell: str, line: int) -> int:
    cell = cell.strip()
    if not _INDEX_RE.fullmatch(cell):
        raise KinretInputError(path, f"index {cell[:20]!r} is not an integer", line=line)
    if len(cell.lstrip("-0")) > _INDEX_DIGITS:
        raise KinretInputError(path, f"index {cell[:20]}... ({len(cell)} digits) is too large", line=line)
    return int(cell)


@dataclass(frozen=True)
class IndexEntry:
    """One line of an index list: its index, the path as written, and its 1-based line in the file."""

    index: int
    path: str
    line: int


def read_index_entries(path: str | Path) -> list[IndexEntry]:
    """Read an index list (`index path` text or `index,path` CSV with header); returns its entries in index order,
    each with the line it was read from (for errors about the path it names)."""
    path = Path(path)
    lines = _read_lines(path)
    entries: list[IndexEntry] = []
    is_csv = bool(lines) and lines[0].replace(" ", "").lower().startswith("index,")
    for n, raw in enumerate(lines, start=1):
        if is_csv and n == 1:
            continue
        if not raw.strip():
            continue
        parts = raw.split(",", 1) if is_csv else raw.strip().split(None, 1)
        if len(parts) != 2 or not parts[1].strip():
            raise KinretInputError(path, f"expected 'index{',' if is_csv else ' '}path', got {raw[:80]!r}", line=n)
        entries.append(IndexEntry(_parse_index(path, parts[0], n), parts[1].strip(), n))
    if not entries:
        raise KinretInputError(path, "list has no entries")
    order = _check_indices(path, [e.index for e in entries], [e.line for e in entries])
    return [entries[r] for r in order]


def read_index_list(path: str | Path) -> list[str]:
    """Read an index list (`index path` text or `index,path` CSV with header); returns paths in index order."""
    return [e.path for e in read_index_entries(path)]


def write_index_list(paths: Sequence[str], target: str | Path) -> Path:
    """Write `index path` lines in the organisers' form: CRLF line ends, no trailing newline."""
    return write_text_atomic(target, "\r\n".join(f"{i} {p}" for i, p in enumerate(paths)))


@dataclass(frozen=True)
class ProbeRow:
    ref: str        # e.g. "F0754/MID3": the member folder, relative to the image root
    fid: str
    feat_path: str = ""


@dataclass(frozen=True)
class GalleryRow:
    fid: str
    mid: str
    ref: str        # e.g. "F0775/MID3/P08183_face2.jpg", relative to the image root
    labels: str = ""


def _read_table(path: Path, required: Sequence[str]) -> tuple[list[dict[str, str]], list[int]]:
    """Read a labelled CSV whose first column is an unnamed index; returns rows in index order and their lines."""
    lines = _read_lines(path)
    if not lines:
        raise KinretInputError(path, "list is empty", line=1)
    reader = csv.reader(io.StringIO("\n".join(lines)))
    try:
        return _parse_table(path, reader, required)
    except csv.Error as exc:  # a NUL byte, a field past csv's size limit: the reader's line is where it stopped
        raise KinretInputError(path, f"not a readable CSV ({exc})", line=reader.line_num) from exc


def _parse_table(path: Path, reader, required: Sequence[str]) -> tuple[list[dict[str, str]], list[int]]:
    """The rows of a `csv.reader` (its `line_num` gives the file line of each row) checked as `_read_table` says."""
    header = [h.strip() for h in next(reader)]
    if not header or header[0] not in INDEX_COLUMN_NAMES:
        raise KinretInputError(path, f"first column must be the unnamed index column, got {header[:1]}", line=1)
    cols = header[1:]
    if not any(c in cols for c in PATH_COLUMN_NAMES):
        raise KinretInputError(path, f"needs a 'ref' (or 'original') column; columns are {cols}", line=1)
    missing = [c for c in required if c not in cols]
    if missing:
        raise KinretInputError(path, f"missing column(s) {missing}; columns are {cols}", line=1)
    rows, indices, line_nos = [], [], []
    for cells in reader:
        n = reader.line_num  # the file line the row ends on, also after a quoted cell that spans lines
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise KinretInputError(path, f"row has {len(cells)} cells, header has {len(header)}", line=n)
        indices.append(_parse_index(path, cells[0], n))
        row = {c: v.strip() for c, v in zip(cols, cells[1:], strict=True)}
        row["ref"] = row.get("ref") or row.get("original", "")
        fid = row.get("fid", "")
        if not FID_RE.match(fid):
            raise KinretInputError(path, f"unknown family id {fid!r} (expected F<digits>)", line=n)
        if not row["ref"].startswith(fid + "/"):
            raise KinretInputError(path, f"path {row['ref']!r} does not belong to family {fid}", line=n)
        rows.append(row)
        line_nos.append(n)
    if not rows:
        raise KinretInputError(path, "list has no rows")
    order = _check_indices(path, indices, line_nos)
    return [rows[r] for r in order], [line_nos[r] for r in order]


def read_probe_list(path: str | Path) -> list[ProbeRow]:
    """Read an RFIW2021 `probe_list.csv` in probe-index order."""
    rows, _ = _read_table(Path(path), required=("fid",))
    return [ProbeRow(ref=r["ref"].rstrip("/"), fid=r["fid"], feat_path=r.get("feat_path", "")) for r in rows]


def read_gallery_list(path: str | Path) -> list[GalleryRow]:
    """Read an RFIW2021 `gallery_list.csv` in gallery-index order (`mid` is taken from the path if absent)."""
    rows, _ = _read_table(Path(path), required=("fid",))
    out = []
    for r in rows:
        parts = r["ref"].split("/")
        out.append(GalleryRow(fid=r["fid"], mid=r.get("mid") or (parts[1] if len(parts) > 2 else ""), ref=r["ref"],
                              labels=r.get("labels", "")))
    return out


def _write_csv(target: str | Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(target, buf.getvalue())


def write_probe_list(rows: Sequence[ProbeRow], target: str | Path) -> Path:
    return _write_csv(target, ["", "ref", "fid", "feat_path"],
                      [(i, r.ref, r.fid, r.feat_path) for i, r in enumerate(rows)])


def write_gallery_list(rows: Sequence[GalleryRow], target: str | Path) -> Path:
    return _write_csv(target, ["", "fid", "mid", "labels", "ref"],
                      [(i, r.fid, r.mid, r.labels, r.ref) for i, r in enumerate(rows)])
