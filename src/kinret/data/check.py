"""``python -m kinret.data check DATA``: what a data folder holds for Track 3 and what is missing, before a long run.

Reads the folder with the same readers the run uses, so a list or folder that would stop `make_submission.py`
stops here, named with its line: DATA/train (FIW family folders: training and the out-of-fold protocols), DATA/val
(labelled folders, with or without probe_list.csv/gallery_list.csv), DATA/test (the Codalab probes/gallery and
probe.txt/gallery.txt) and DATA/test_truth (optional test labels). Every image file the run would not read is
listed with the reason (outside a MID* folder, an extension the kit does not read, a folder the layout does not
use), and a layout one level too deep (DATA/test/test/) gets the move that fixes it. ``--decode`` also opens every
image (slower: a few thousand images a second), so a corrupt file is found now rather than an hour into a run.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kinret.cli import parser, run_command
from kinret.data.fiw import Family
from kinret.data.images import load_image
from kinret.data.layout import DataLayout
from kinret.data.track3 import Track3Split
from kinret.errors import KinretInputError
from kinret.log import progress

NEEDED = "DATA/test (probes/probe_subjects/s*/, gallery/gallery_faces/face*.jpg, probe.txt, gallery.txt)"


SHOWN = 20  # stray files listed per reason; the rest are counted


@dataclass
class Report:
    """One line per part found, the problems that would stop a run, what is missing but optional, the image files a
    run would not read (with the reason) and hints for a misplaced layout; `root` names the folder in the verdict."""

    found: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    strays: list[tuple[Path, str]] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    root: Path = Path("DATA")

    def stray_lines(self) -> list[str]:
        by_reason: dict[str, list[Path]] = defaultdict(list)
        for path, reason in self.strays:
            by_reason[reason].append(path)
        lines = [f"  skipped  {len(self.strays):,} image file(s) a run does not read:"] if self.strays else []
        for reason, paths in by_reason.items():
            lines.append(f"    {len(paths):,} {reason}:")
            lines += [f"      {p}" for p in paths[:SHOWN]]
            if len(paths) > SHOWN:
                lines.append(f"      ... and {len(paths) - SHOWN:,} more")
        return lines

    def text(self) -> str:
        lines = [f"  ok       {x}" for x in self.found] + [f"  missing  {x}" for x in self.missing]
        lines += self.stray_lines()
        lines += [f"  ERROR    {x}" for x in self.errors] + [f"  hint     {x}" for x in self.hints]
        where = shlex.quote(str(Path(self.root).resolve()))
        verdict = (f"usable: python make_submission.py --data-root {where}" if not self.errors
                   else f"{len(self.errors)} problem(s) stop a run: fix them first")
        return "\n".join(lines + [verdict])


def families_line(label: str, families: Sequence[Family]) -> str:
    members = sum(len(f.members) for f in families)
    faces = sum(f.n_images for f in families)
    empty = sum(1 for f in families for m in f.members if not m.images)
    relations = sum(1 for f in families if f.relations is not None)
    return (f"{label}: {len(families):,} families, {members:,} members, {faces:,} faces"
            + (f" ({empty} members without images)" if empty else "") + f", mid.csv in {relations}")


def split_line(label: str, split: Track3Split) -> str:
    faces = sum(len(p.images) for p in split.probes)
    fids = {p.fid for p in split.probes} - {None}
    return (f"{label}: {len(split.probes):,} probes ({faces:,} faces), {len(split.gallery):,} gallery faces"
            + (f", {len(fids):,} families labelled" if fids else ", unlabelled"))


def truth_line(label: str, truth: Track3Split) -> str:
    """The test labels: one family id per probe and per gallery face (no images of their own)."""
    fids = {p.fid for p in truth.probes} | {g.fid for g in truth.gallery}
    return (f"{label}: family labels of {len(truth.probes):,} probes and {len(truth.gallery):,} gallery faces, "
            f"{len(fids):,} families")


def _attempt(report: Report, what: Callable[[], str | None]) -> None:
    try:
        line = what()
        if line:
            report.found.append(line)
    except KinretInputError as exc:
        report.errors.append(getattr(exc, "bare", str(exc)))  # a misplaced layout's fix is a hint line of its own


def read_families(families: Sequence[Family], label: str, report: Report) -> str:
    """Remember a FIW folder's images for --decode, and say what it holds."""
    report.images += [p for f in families for m in f.members for p in m.images]
    return families_line(label, families)


def read_split(split: Track3Split, label: str, report: Report) -> str:
    """Remember a split's images for --decode, and say what it holds."""
    report.images += [p for q in split.probes for p in q.images] + [g.path for g in split.gallery]
    return split_line(label, split)


def check_train(layout: DataLayout, report: Report) -> None:
    if layout.train is None:
        report.missing.append("DATA/train (FIW family folders F*/MID*/): no training, no out-of-fold choice; only "
                              "training-free variants (frozen SFace, raw pixels) with nothing to choose on")
        return
    _attempt(report, lambda: read_families(layout.train_families, "DATA/train", report))


def check_val(layout: DataLayout, report: Report) -> None:
    if layout.val is None:
        report.missing.append("DATA/val (optional labelled families): scores on a second labelled split")
        return
    try:
        lists = layout.val_lists
    except KinretInputError as exc:
        report.errors.append(str(exc))
        lists = None
    if lists is not None:
        _attempt(report, lambda: read_split(layout.val_split(0), "DATA/val (its probe_list.csv/gallery_list.csv)",
                                            report))
        return
    _attempt(report, lambda: read_families(layout.val_families, "DATA/val (a protocol is drawn from the folders)",
                                           report))


def check_test(layout: DataLayout, report: Report) -> None:
    test = layout.root / "test"
    if layout.test is None:
        report.errors.append(f"{test} does not exist: a submission needs {NEEDED}")
        return
    for name in ("probe.txt", "gallery.txt"):
        if not (test / name).is_file():
            report.missing.append(f"DATA/test/{name}: the order is taken from the numbers in the folder names")
    errors = len(report.errors)
    _attempt(report, lambda: read_split(layout.test_split, "DATA/test", report))
    if layout.truth is None:
        report.missing.append("DATA/test_truth/probe_list.csv, gallery_list.csv (optional): no local test score")
        return
    test_read = len(report.errors) == errors  # else the truth's row counts have nothing to be held against
    _attempt(report, lambda: truth_line("DATA/test_truth", layout.test_labels if test_read else layout.truth_lists()))


def decode_all(paths: Iterable[Path], report: Report) -> None:
    paths = list(dict.fromkeys(paths))
    bad = 0
    for p in progress(paths, desc="decode", total=len(paths), unit="img"):
        try:
            load_image(p)
        except KinretInputError as exc:
            bad += 1
            if bad <= 20:
                report.errors.append(str(exc))
    if bad > 20:
        report.errors.append(f"... and {bad - 20} more unreadable images")
    report.found.append(f"decoded {len(paths) - bad:,} of {len(paths):,} images")


def check(root: str | Path, decode: bool = False) -> Report:
    """Everything `make_submission.py --data-root root` would read, read; problems collected, not raised."""
    report = Report(root=Path(root))
    try:
        layout = DataLayout.of(root)
    except KinretInputError as exc:
        report.errors.append(str(exc))
        return report
    check_train(layout, report)
    check_val(layout, report)
    check_test(layout, report)
    hints = layout.nesting_hints()
    report.hints = [text for _, text in hints]
    # images inside a misplaced layout are what its hint moves: not listed one by one
    report.strays = [(p, why) for p, why in layout.stray_images() if not any(p.is_relative_to(f) for f, _ in hints)]
    if decode:
        decode_all(report.images, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("python -m kinret.data", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="list what a data folder holds and what is missing")
    c.add_argument("data", type=Path, help="the data folder (as given to make_submission.py --data-root)")
    c.add_argument("--decode", action="store_true", help="also open every image")
    args = p.parse_args(argv)

    def body() -> int:
        report = check(args.data, args.decode)
        print(f"{args.data}:\n{report.text()}")
        return 2 if report.errors else 0

    return run_command(body, args)

