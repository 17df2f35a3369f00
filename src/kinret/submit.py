"""`make_submission.py`: from a data folder (or the embedded synthetic default) to a validated Codalab zip.

Data folder layout (`--data-root DIR`):
    DIR/train/F0001/MID1/*.jpg        labelled FIW folders (optional F0001/mid.csv)
    DIR/test/probes/probe_subjects/s{i}/*.jpg, DIR/test/gallery/gallery_faces/face{j}.jpg,
    DIR/test/probe.txt, DIR/test/gallery.txt       the Codalab test layout and its index lists
    DIR/val/                          optional: labelled FIW folders, with or without probe_list.csv/gallery_list.csv
    DIR/test_truth/probe_list.csv, gallery_list.csv   optional test labels: if present, the run prints local scores
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import KinretInputError
from .features import FEATURES, get_feature
from .fiw import read_fiw
from .log import setup_logging
from .metrics import chance_level, evaluate_ranking
from .pipeline import score_split, submit
from .ranking import AGGREGATIONS, rank_gallery
from .split import Track3Split, build_protocol, read_codalab, read_labelled
from .synth import SynthConfig, generate

log = logging.getLogger("kinret.submit")
DEFAULT_SYNTH_ROOT = Path("data") / "synthetic"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_submission.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=None,
                   help="real data folder laid out as above; default: the synthetic dataset in "
                        f"{DEFAULT_SYNTH_ROOT} (generated on first use, reused afterwards)")
    p.add_argument("--out", type=Path, default=Path("submissions"),
                   help="where predictions.csv and the zip go (default: submissions/)")
    p.add_argument("--zip-name", default="submission.zip", help="name of the zip in --out (default: submission.zip)")
    p.add_argument("--feature", choices=sorted(FEATURES), default="raw_pixels",
                   help="image feature used for cosine similarity (default: raw_pixels, a training-free baseline)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="mean",
                   help="fusion over a probe's images: mean (mean embedding) or max of cosines (default: mean)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="rank unreadable gallery faces last and drop unreadable probe images instead of stopping")
    p.add_argument("--seed", type=int, default=SynthConfig.seed,
                   help="seed of the synthetic dataset and of a val protocol drawn from labelled folders (default: 0)")
    p.add_argument("--regenerate", action="store_true", help="rebuild the synthetic dataset even if cached")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _val_split(val_dir: Path, seed: int) -> Track3Split | None:
    if not val_dir.is_dir():
        return None
    if (val_dir / "probe_list.csv").is_file() and (val_dir / "gallery_list.csv").is_file():
        return read_labelled(val_dir / "probe_list.csv", val_dir / "gallery_list.csv", val_dir, name="val")
    split, _ = build_protocol(read_fiw(val_dir), val_dir, seed=seed, name="val")
    return split


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    root = args.data_root
    if root is None:
        root = generate(DEFAULT_SYNTH_ROOT, SynthConfig(seed=args.seed), force=args.regenerate)
        print(f"data: synthetic families in {root} (seed {args.seed}); pass --data-root for real FIW data")
    else:
        print(f"data: {root}")
    if (root / "train").is_dir():
        families = read_fiw(root / "train")
        print(f"train: {len(families)} families, {sum(f.n_images for f in families)} images "
              "(not used by the training-free baseline feature)")
    test = read_codalab(root / "test", name="test")
    print(test.describe())
    truth_dir = root / "test_truth"
    truth = None
    if (truth_dir / "probe_list.csv").is_file():
        truth = read_labelled(truth_dir / "probe_list.csv", truth_dir / "gallery_list.csv", None, name="test truth")
        for kind, n_truth, n_test in (("probe", len(truth.probes), len(test.probes)),
                                      ("gallery", len(truth.gallery), len(test.gallery))):
            if n_truth != n_test:
                raise KinretInputError(truth_dir / f"{kind}_list.csv", f"has {n_truth} rows but the test split has "
                                                                      f"{n_test} {kind} entries")
    feature = get_feature(args.feature)
    variant = f"{args.feature}, cosine, {args.aggregation} over probe images"
    result = submit(score_split(test, feature, args.aggregation, args.skip_bad_images), test, args.out, truth,
                    args.zip_name)
    print(f"wrote {result.csv_path} and {result.zip_path} ({variant})")
    if result.scores:
        for ap, scores in result.scores.items():
            print(f"\nlocal test score, {ap} AP:\n{scores.table()}")
        chance = chance_level(truth.probe_fids, truth.gallery_fids)
        print(f"(a random ranking expects standard mAP {chance['mAP']:.4f}, Rank@5 {chance['rank@5']:.4f}, "
              f"Average {chance['average']:.4f})")
    else:
        print(f"no test labels in {truth_dir}: local test score skipped")
    val = _val_split(root / "val", args.seed)
    if val is not None:
        ranking = rank_gallery(score_split(val, feature, args.aggregation, args.skip_bad_images))
        for ap in ("standard", "trapezoid"):
            print(f"\nval score ({val.describe()}), {ap} AP:\n"
                  f"{evaluate_ranking(ranking, val.probe_fids, val.gallery_fids, ap).table()}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        return run(args)
    except KinretInputError as exc:
        log.error("%s", exc)
        return 2
