"""The labelled FIW training layout: `F0001/MID1/P00001_face1.jpg`, an optional `F0001/mid.csv` relation matrix,
and family-grouped folds over it."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kinret.data.images import is_image_file
from kinret.errors import KinretInputError

log = logging.getLogger(__name__)
FID_RE = re.compile(r"^F\d+$")
MID_RE = re.compile(r"^MID\d+$")
RELATION_CODES = {0: "none/self", 1: "child", 2: "sibling", 3: "grandchild", 4: "parent", 5: "spouse",
                  6: "grandparent", 7: "great-grandchild", 8: "great-grandparent", 9: "unknown"}


def natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class Member:
    mid: str
    images: tuple[Path, ...]


@dataclass(frozen=True)
class Family:
    """One family folder. `relations[i, j]` (from mid.csv, if present) is what MID{i+1} is to MID{j+1}."""

    fid: str
    members: tuple[Member, ...]
    relations: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not FID_RE.match(self.fid):
            raise KinretInputError(None, f"family id {self.fid!r} is not of the form F<digits>")
        mids = [m.mid for m in self.members]
        if len(set(mids)) != len(mids):
            raise KinretInputError(None, f"family {self.fid} lists a member twice: {mids}")

    @property
    def n_images(self) -> int:
        return sum(len(m.images) for m in self.members)


def read_mid_csv(path: str | Path) -> np.ndarray:
    """Parse a FIW `mid.csv`: columns `MID`, `1`..`n`, `Name`, `Gender`; returns the (n, n) int8 code matrix."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise KinretInputError(path, "relation matrix is empty", line=1)
    header = [h.strip() for h in rows[0]]
    if not header or header[0] != "MID":
        raise KinretInputError(path, f"first column must be 'MID', got {header[:1]}", line=1)
    numeric = [h for h in header[1:] if h.isdigit()]
    n = len(numeric)
    if numeric != [str(i) for i in range(1, n + 1)]:
        raise KinretInputError(path, f"member columns must be 1..n in order, got {numeric}", line=1)
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    if len(body) != n:
        raise KinretInputError(path, f"expected {n} member rows for {n} member columns, found {len(body)}")
    codes = np.zeros((n, n), dtype=np.int8)
    for i, row in enumerate(body):
        line = i + 2
        if len(row) < n + 1:
            raise KinretInputError(path, f"row has {len(row)} cells, expected at least {n + 1}", line=line)
        if row[0].strip() != str(i + 1):
            raise KinretInputError(path, f"MID must be {i + 1}, got {row[0]!r}", line=line)
        for j, cell in enumerate(row[1:n + 1]):
            cell = cell.strip()
            if not cell.isdigit() or int(cell) not in RELATION_CODES:
                raise KinretInputError(path, f"relation code {cell!r} in column {j + 1} is not one of 0-9", line=line)
            codes[i, j] = int(cell)
    return codes


def read_family(folder: str | Path, strict_members: bool = True) -> Family:
    """Read one family folder; member folders must be named MID<digits> (other files such as mid.csv are fine)."""
    folder = Path(folder)
    members = []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        if not MID_RE.match(sub.name):
            if strict_members:
                raise KinretInputError(sub, "member folder must be named MID<digits>")
            continue
        images = tuple(sorted((p for p in sub.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name)))
        members.append(Member(sub.name, images))
    relations = read_mid_csv(folder / "mid.csv") if (folder / "mid.csv").is_file() else None
    return Family(folder.name, tuple(members), relations)


def read_fiw(root: str | Path) -> list[Family]:
    """Read every `F*/` family of a labelled FIW folder, in family-id order.

    Folders at the top level that are not family ids raise (a misplaced folder would silently drop data);
    members without images are kept with no images so the caller can count them.
    """
    root = Path(root)
    if not root.is_dir():
        raise KinretInputError(root, "FIW data folder does not exist")
    families = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name)):
        if not FID_RE.match(sub.name):
            raise KinretInputError(sub, "unknown folder in a FIW layout: family folders are named F<digits>")
        families.append(read_family(sub))
    if not families:
        raise KinretInputError(root, "no family folders (F<digits>/MID<digits>/*.jpg) found")
    n_img = sum(f.n_images for f in families)
    log.info("read %d families, %d members, %d images from %s", len(families),
             sum(len(f.members) for f in families), n_img, root)
    return families


def family_folds(families: Sequence[Family], k: int, seed: int = 0) -> dict[str, int]:
    """Assign each family to one of `k` folds, balancing image counts; no family is ever split across folds.

    Families are shuffled with `seed`, then taken largest first and given to the fold with fewest images so far
    (ties: lowest fold number), so the folds are both seeded and balanced.
    """
    if k < 2:
        raise KinretInputError(None, f"need at least 2 folds, got {k}")
    if len(families) < k:
        raise KinretInputError(None, f"cannot split {len(families)} families into {k} folds")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(families))
    order = sorted(order, key=lambda i: -families[i].n_images)  # stable: the shuffle breaks size ties
    load = np.zeros(k, dtype=np.int64)
    count = np.zeros(k, dtype=np.int64)
    folds = {}
    for i in order:
        f = int(np.lexsort((np.arange(k), count, load))[0])
        folds[families[i].fid] = f
        load[f] += families[i].n_images
        count[f] += 1
    return folds
