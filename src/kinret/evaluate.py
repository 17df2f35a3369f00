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

import numpy as np

from kinret.cli import parser, run_command
from kinret.data.track3 import Track3Split, read_labelled
from kinret.errors import KinretInputError
from kinret.metrics import AP_VARIANTS, evaluate_ranking
from kinret.submission.predictions import predictions_shape, read_predictions


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


def read_for(path: str, truth: Track3Split, probes: str, gallery: str) -> np.ndarray:
    """The ranking in `path`, read for the truth's size. A valid ranking of rows of another width than the truth's
    gallery was made for another data set or split: said so, naming both files, rather than blaming its first cell
    out of range."""
    want = (len(truth.probes), len(truth.gallery))
    try:
        return read_predictions(path, *want)
    except KinretInputError as exc:
        shape = predictions_shape(path)
        if shape is None or shape[0] == 0 or shape[1] == want[1]:  # the right width: a damaged file, not another set
            raise
        try:
            read_predictions(path, *shape)
        except KinretInputError:
            raise exc from None
    raise KinretInputError(path, f"ranks {shape[1]:,} gallery faces for each of {shape[0]:,} probes, but the truth "
                                 f"lists ({probes}, {gallery}) hold {want[0]:,} probes and {want[1]:,} gallery faces: "
                                 "the predictions and the lists are not of the same data set or split")


def run(args: argparse.Namespace) -> int:
    truth = read_labelled(args.probes, args.gallery, image_root=None, name="truth")
    ranking = read_for(args.predictions, truth, args.probes, args.gallery)
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
