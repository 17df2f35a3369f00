"""Score a predictions file against labelled lists.

    python -m kinret.evaluate --predictions predictions.csv --probes probe_list.csv --gallery gallery_list.csv \
        [--ap standard|trapezoid] [--json]

Exit codes: 0 scored; 2 invalid predictions or malformed lists (the message names the file and first bad row).
Any file at all gets exit code 2 and one line, never a traceback: a corrupt, truncated, encrypted or bzip2/lzma zip,
binary data, an empty file, a cell of 25 digits, or a file (or zip member) larger than the ranking can be, which is
refused before it is read, so a zip bomb never fills memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kinret.cli import parser, run_command
from kinret.data.track3 import read_labelled
from kinret.metrics import AP_VARIANTS, evaluate_ranking
from kinret.submission.predictions import read_predictions


def build_parser() -> argparse.ArgumentParser:
    p = parser("python -m kinret.evaluate", __doc__.split("\n\n")[0])
    p.add_argument("--predictions", required=True, help="predictions.csv, or a submission zip holding it")
    p.add_argument("--probes", required=True, help="labelled probe list (RFIW2021 probe_list.csv)")
    p.add_argument("--gallery", required=True, help="labelled gallery list (RFIW2021 gallery_list.csv)")
    p.add_argument("--ap", choices=AP_VARIANTS, default="standard",
                   help="AP definition: 'standard' (precision at each hit) or 'trapezoid' (the organisers' "
                        "published code); the official scorer's choice is unknown")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), args)


def run(args: argparse.Namespace) -> int:
    truth = read_labelled(args.probes, args.gallery, image_root=None, name="truth")
    ranking = read_predictions(args.predictions, len(truth.probes), len(truth.gallery))
    scores = evaluate_ranking(ranking, truth.probe_fids, truth.gallery_fids, ap=args.ap)
    gallery_families = set(truth.gallery_fids)  # built once: per probe it would cost P x N at 10x scale
    lonely = [i for i, f in enumerate(truth.probe_fids) if f not in gallery_families]
    if lonely:
        print(f"warning: {len(lonely)} probe(s) have no relative in the gallery (AP 0, still counted): "
              f"{', '.join(f's{i}' for i in lonely[:10])}", file=sys.stderr)
    if args.json:
        print(json.dumps(scores.as_dict()))
    else:
        print(scores.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
