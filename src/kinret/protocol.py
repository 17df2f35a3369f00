"""`python -m kinret.protocol`: build a Track-3 protocol (and family folds) from labelled FIW folders.

    python -m kinret.protocol --fiw data/fiw/val --out data/val_protocol [--codalab data/val_codalab] [--folds 5]

writes `probe_list.csv` and `gallery_list.csv` (RFIW2021 columns, refs relative to --fiw) to --out; with
--codalab, also an unlabelled Codalab-style copy there (`s{i}/`, anonymised `face{j}.jpg`, probe.txt and
gallery.txt), its truth lists staying in --out; with --folds K, `folds.csv` (fid,fold) with K family-grouped folds.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from kinret.cli import parser, run_command
from kinret.data.fiw import family_folds, read_fiw
from kinret.data.track3 import build_protocol, write_codalab, write_labelled
from kinret.io import write_text_atomic


def write_folds(folds: dict[str, int], target: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["fid", "fold"])
    w.writerows(sorted(folds.items()))
    return write_text_atomic(target, buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("python -m kinret.protocol", __doc__)
    p.add_argument("--fiw", type=Path, required=True, help="labelled FIW folder (F*/MID*/*.jpg)")
    p.add_argument("--out", type=Path, required=True, help="where the labelled lists (and folds.csv) go")
    p.add_argument("--codalab", type=Path, help="also write an unlabelled Codalab-style copy here")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe-member draw and gallery order")
    p.add_argument("--folds", type=int, default=0, help="also write folds.csv with this many family folds")
    args = p.parse_args(argv)
    return run_command(lambda: run(args), args)


def run(args: argparse.Namespace) -> int:
    families = read_fiw(args.fiw)
    split, skipped = build_protocol(families, args.fiw, seed=args.seed, name=args.fiw.name)
    write_labelled(split, args.out)
    print(f"{split.describe()}; {skipped} single-member famil{'y' if skipped == 1 else 'ies'} skipped")
    print(f"wrote {args.out / 'probe_list.csv'} and {args.out / 'gallery_list.csv'}")
    if args.codalab:
        write_codalab(split, args.codalab, args.out)
        print(f"wrote the unlabelled copy {args.codalab} (truth stays in {args.out})")
    if args.folds:
        print(f"wrote {write_folds(family_folds(families, args.folds, args.seed), args.out / 'folds.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
