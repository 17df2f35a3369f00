"""``python -m kinret.synth``: generate (or reuse) the synthetic dataset (`kinret.data.synth`) and report how much
family signal its test split carries (`kinret.scoring.signal`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kinret.cli import parser, run_command
from kinret.data import DEFAULT_ROOT
from kinret.data.synth import SynthConfig, generate
from kinret.scoring.signal import signal_report, style_retrieval

FIELD_HELP = {
    "seed": "seed of every draw", "n_train": "training families", "n_val": "validation families (0: none)",
    "n_test": "test families", "min_members": "least members per family", "max_members": "most members per family",
    "min_images": "least photos per member", "max_images": "most photos per member", "size": "photo side in pixels",
    "jpeg_quality": "JPEG quality of the photos",
    "old_photo_p": "chance that a photo is an old print (greyscale or sepia, faded, grainy, vignetted), per photo",
}


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m kinret.synth", __doc__)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the dataset goes")
    for f in dataclasses.fields(SynthConfig):
        if f.name != "version":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                           help=FIELD_HELP.get(f.name))
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes that render the photos (default: the usable cores, fewer for small sets); "
                        "the files are the same for any number")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    p.add_argument("--no-report", action="store_true", help="only generate")
    args = p.parse_args(argv)
    return run_command(lambda: _run(args), args)


def _run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig) if f.name != "version"})
    root = generate(args.root, cfg, force=args.force, jobs=args.jobs)
    if not args.no_report:
        print(f"test split of {root}, standard AP:")
        for name, s in signal_report(root).items():
            print(f"  {name:<17} mAP {s['mAP']:.4f}  Rank@5 {s['rank@5']:.4f}  Average {s['average']:.4f}")
        shares = style_retrieval(root)
        if shares:
            print("share of old prints: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
