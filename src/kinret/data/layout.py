"""A Track-3 data folder, read once: which parts it holds and each part as a typed object.

    DATA/train/F0001/MID1/*.jpg                 labelled FIW folders (training, the out-of-fold protocols)
    DATA/val/                                   labelled FIW folders, and optionally probe_list.csv + gallery_list.csv
    DATA/test/probes/probe_subjects/s{i}/, DATA/test/gallery/gallery_faces/face{j}.jpg, probe.txt, gallery.txt
    DATA/test_truth/probe_list.csv, gallery_list.csv    optional test labels

`DataLayout.of(root)` looks at the folder once; its methods read a part when first asked (and keep it), and raise
`KinretInputError` naming the file and line when a part is malformed. Training, scoring, the data check and the run
status all ask it: nothing else looks at the folder's layout. `stray_images` walks the whole folder for the image
files no part reads (each with the reason), and `nesting_hints` spots a layout that sits one level too deep.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kinret.data import Fit
from kinret.data.fiw import MID_RE, Family, family_folds, read_fiw
from kinret.data.images import IMAGE_SUFFIXES
from kinret.data.track3 import Track3Split, build_protocol, read_codalab, read_labelled
from kinret.errors import KinretInputError

LISTS = ("probe_list.csv", "gallery_list.csv")  # the RFIW2021 labelled lists, always a pair
TRUTH_FIX = ("restore the organisers' lists of this test split (row i is probe s{i}, row j face{j}), or move "
             "DATA/test_truth away to skip the local test score")
PARTS = ("train", "val", "test")
# image formats a data folder may hold that the kit does not read (it reads IMAGE_SUFFIXES)
OTHER_IMAGE_SUFFIXES = (".tif", ".tiff", ".gif", ".jfif", ".jpe", ".heic", ".heif", ".avif", ".jp2", ".ppm", ".pgm",
                        ".pnm", ".ico")


def _pair(folder: Path) -> tuple[Path, Path] | None:
    """The labelled lists in `folder` when both are there; one without the other is refused."""
    found = [(folder / name).is_file() for name in LISTS]
    if all(found):
        return folder / LISTS[0], folder / LISTS[1]
    if any(found):
        raise KinretInputError(folder, f"{LISTS[0]} and {LISTS[1]} come together (only "
                                       f"{LISTS[found.index(True)]} is there)")
    return None


@dataclass(frozen=True)
class DataLayout:
    """The parts of one data folder. `train`, `val`, `test` are the folders that exist (None otherwise);
    `truth` is DATA/test_truth when its probe list is there."""

    root: Path
    train: Path | None
    val: Path | None
    test: Path | None
    truth: Path | None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, root: str | os.PathLike) -> DataLayout:
        """The layout of `root`; a folder that does not exist is refused."""
        root = Path(root)
        if not root.is_dir():
            raise KinretInputError(root, "data folder does not exist")

        def part(name: str) -> Path | None:
            return root / name if (root / name).is_dir() else None

        truth = root / "test_truth"
        return cls(root, part("train"), part("val"), part("test"),
                   truth if (truth / LISTS[0]).is_file() else None)

    # ---- training families -----------------------------------------------------------------------------------------
    @cached_property
    def train_families(self) -> list[Family]:
        """DATA/train's families in family-id order."""
        with _hinted(self):
            if self.train is None:
                raise KinretInputError(self.root / "train", "no training families: expected FIW folders F*/MID*/*.jpg")
            return sorted(read_fiw(self.train), key=lambda f: f.fid)

    @cached_property
    def val_families(self) -> list[Family]:
        """DATA/val's families (empty without DATA/val)."""
        with _hinted(self):
            return read_fiw(self.val) if self.val is not None else []

    def fold_families(self, n_folds: int, fold_seed: int, fold: int) -> tuple[list[Family], list[Family]]:
        """(families trained on, families held out) of one run (`Fit.of(fold)` says which): fold k of
        `family_folds`; every training family with DATA/val's held out; or both trained on, nothing held out."""
        families = self.train_families
        fit = Fit.of(fold)
        if fit.trains_on_val:
            val = self.val_families
            both = {f.fid for f in families} & {f.fid for f in val}
            if both:
                raise KinretInputError(self.val, f"families {sorted(both)[:3]} are in DATA/train too: a final fit "
                                                 "trains on both, so each family must be in one of them")
            return sorted(families + val, key=lambda f: f.fid), []
        if fit.evaluates_on_val:
            return families, self.val_families
        if fold >= n_folds:
            raise KinretInputError(None, f"--fold {fold} is out of range for n_folds={n_folds}")
        folds = family_folds(families, n_folds, fold_seed)
        return [f for f in families if folds[f.fid] != fold], [f for f in families if folds[f.fid] == fold]

    # ---- val and test ----------------------------------------------------------------------------------------------
    @property
    def val_lists(self) -> tuple[Path, Path] | None:
        """DATA/val/probe_list.csv and gallery_list.csv, when DATA/val holds them."""
        return _pair(self.val) if self.val is not None else None

    def val_split(self, seed: int) -> Track3Split | None:
        """DATA/val as a labelled split: its lists when present, else a protocol drawn from its families (seeded);
        None without DATA/val."""
        if self.val is None:
            return None
        key = ("val", seed)
        if key not in self._memo:
            with _hinted(self), _advised(self.val, f"restore the organisers' {LISTS[0]} and {LISTS[1]}, or delete "
                                                   "both to draw a protocol from DATA/val's family folders"):
                lists = self.val_lists
                self._memo[key] = (read_labelled(*lists, self.val, name="val") if lists is not None
                                   else build_protocol(self.val_families, self.val, seed=seed, name="val")[0])
        return self._memo[key]

    @cached_property
    def test_split(self) -> Track3Split:
        """The Codalab test split (DATA/test)."""
        with _hinted(self):
            return read_codalab(self.root / "test", name="test")

    @cached_property
    def test_labels(self) -> Track3Split | None:
        """DATA/test_truth's labelled lists, their row counts checked against the test split; None without them."""
        truth = self.truth_lists()
        if truth is None:
            return None
        test = self.test_split
        with _advised(self.truth, TRUTH_FIX):
            for path, n_truth, n_test, kind in ((self.truth / LISTS[0], len(truth.probes), len(test.probes), "probe"),
                                                (self.truth / LISTS[1], len(truth.gallery), len(test.gallery),
                                                 "gallery")):
                if n_truth != n_test:
                    raise KinretInputError(path, f"has {n_truth} rows but the test split has {n_test} {kind} entries")
        return truth

    def truth_lists(self) -> Track3Split | None:
        """DATA/test_truth's labelled lists as they are, not yet held against the test split."""
        if self.truth is None:
            return None
        with _advised(self.truth, TRUTH_FIX):
            return read_labelled(self.truth / LISTS[0], self.truth / LISTS[1], None, name="test truth")

    # ---- what a run's data is made of --------------------------------------------------------------------------------
    def training_files(self, with_val: bool) -> tuple[list[str], list[str]]:
        """(family folders as `part/F0001`, files as paths relative to the root: every image at F*/MID*/ and the
        labelled lists) of DATA/train, and DATA/val too `with_val`, by a plain directory walk in no particular order:
        a status check of many runs fingerprints the data, so it must cost far less than reading the families."""
        families, files = [], []
        for part, folder in (("train", self.train), ("val", self.val if with_val else None)):
            if folder is None:
                continue
            for fam in os.scandir(folder):
                if not fam.is_dir() or fam.name.startswith("."):
                    continue
                families.append(f"{part}/{fam.name}")
                for member in os.scandir(fam.path):
                    if member.is_dir() and not member.name.startswith("."):
                        files += [f"{part}/{fam.name}/{member.name}/{e.name}" for e in os.scandir(member.path)
                                  if e.is_file() and not e.name.startswith(".")
                                  and e.name.lower().endswith(IMAGE_SUFFIXES)]
            files += [f"{part}/{n}" for n in LISTS if (folder / n).is_file()]
        return families, files

    # ---- what the run leaves out ---------------------------------------------------------------------------------
    def counted_images(self) -> tuple[set[Path], set[str]]:
        """(every image a run reads: the training families', DATA/val's (its lists' when it has them, else its
        families') and the test split's; the parts that could not be read, whose images are not judged)."""
        counted: set[Path] = set()
        unread: set[str] = set()

        def val_images() -> list[Path]:
            if self.val_lists is not None:
                split = self.val_split(0)
                return [p for q in split.probes for p in q.images] + [g.path for g in split.gallery]
            return [p for f in self.val_families for m in f.members for p in m.images]

        readers = {"train": lambda: [p for f in self.train_families for m in f.members for p in m.images],
                   "val": val_images,
                   "test": lambda: [p for q in self.test_split.probes for p in q.images]
                   + [g.path for g in self.test_split.gallery]}
        for part, read in readers.items():
            if getattr(self, part) is None:
                continue
            try:
                counted.update(read())
            except KinretInputError:
                unread.add(part)
        return counted, unread

    def stray_images(self) -> list[tuple[Path, str]]:
        """Every image file under the root that no part of a run reads, with the reason, in path order: outside a
        MID* folder, an extension the kit does not read, a hidden file, a folder the layout does not use. Files in a
        part that cannot be read at all are left to that part's error. Symbolic links are followed, each folder
        walked once."""
        counted, unread = self.counted_images()
        counted = {os.path.realpath(p) for p in counted}  # readers hold resolved paths, the walk the given ones
        val_lists = self.val is not None and "val" not in unread and self.val_lists is not None
        found, seen = [], set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            here = Path(dirpath)
            stat = here.stat()
            if (stat.st_dev, stat.st_ino) in seen:
                dirnames.clear()
                continue
            seen.add((stat.st_dev, stat.st_ino))
            rel = here.relative_to(self.root).parts
            if rel and (rel[0] in unread or rel[0].startswith(".")):
                dirnames.clear()
                continue
            dirnames.sort()
            for name in sorted(filenames):
                path = here / name
                if (Path(name).suffix.lower() in IMAGE_SUFFIXES + OTHER_IMAGE_SUFFIXES
                        and os.path.realpath(path) not in counted):
                    found.append((path, _why((*rel, name), val_lists)))
        return found

    def nesting_hints(self) -> list[tuple[Path, str]]:
        """(folder, how to fix it) for a layout that sits one level too deep: DATA/test/test/, DATA/train/train/, or
        the whole layout in one subfolder of the folder given."""
        hints = []
        for part in PARTS:
            inner = self.root / part / part
            if inner.is_dir():
                hints.append((inner, f"{inner} looks like DATA/{part} one level too deep: move its contents up (mv "
                                     f"{inner}/* {self.root / part}/ and remove the empty {inner})"))
        if not any(getattr(self, part) for part in PARTS):
            for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
                held = [f"{x}/" for x in PARTS if (sub / x).is_dir()]
                if held:
                    hints.append((sub, f"{sub} holds {', '.join(held)}: pass --data-root {sub}"))
        return hints


@contextmanager
def _hinted(layout: DataLayout) -> Iterator[None]:
    """A part that cannot be read, with the fix of a layout that sits one level too deep when there is one (what
    ``python -m kinret.data check`` says), so that a run's error says it too; `bare` keeps the error without it."""
    try:
        yield
    except KinretInputError as exc:
        hints = [text for _, text in layout.nesting_hints()]
        if not hints or getattr(exc, "bare", None):
            raise
        hinted = KinretInputError(exc.path, f"{exc.message}; hint: {'; '.join(hints)}", exc.line)
        hinted.bare = str(exc)
        raise hinted from exc


@contextmanager
def _advised(folder: Path | None, advice: str) -> Iterator[None]:
    """An error about a list in `folder` with what to do about it."""
    try:
        yield
    except KinretInputError as exc:
        ours = folder is not None and exc.path is not None and Path(exc.path).is_relative_to(folder)
        if not ours or "to fix it" in exc.message:
            raise
        raise KinretInputError(exc.path, f"{exc.message}; to fix it, {advice}", exc.line) from exc


def _why(parts: tuple[str, ...], val_lists: bool) -> str:
    """Why the image at `parts` (relative to the data root) is not read."""
    name, top, depth = parts[-1], parts[0], len(parts)
    suffix = Path(name).suffix.lower()
    if name.startswith("."):
        return "a hidden file"
    if suffix not in IMAGE_SUFFIXES:
        return f"extension {suffix} is not read (only {', '.join(IMAGE_SUFFIXES)})"
    if depth == 1:
        return "directly in the data folder, outside train/, val/ and test/"
    if top in ("train", "val"):
        if top == "val" and val_lists:
            return "not named in DATA/val's probe_list.csv or gallery_list.csv"
        if depth == 2:
            return f"directly in DATA/{top}/, outside a family folder F*/MID*/"
        if depth == 3:
            return f"outside a MID* folder (DATA/{top}/{parts[1]}/MID1/ holds member 1's faces)"
        if not MID_RE.match(parts[2]):
            return f"in {parts[2]}/, not a member folder MID<digits>"
        return "in a subfolder of a member folder (only F*/MID*/*.jpg is read)"
    if top == "test":
        return "not in the test layout's probes/probe_subjects/s*/ or gallery/gallery_faces/ (or not in their lists)"
    return f"in {top}/, a folder the layout does not use (it reads train/, val/, test/)"
