"""``python -m kinret.train -C <experiment> --fold k [--set key=value ...]``: train one variant on one fold.

--fold -1 trains on every training family (evaluated on DATA/val when present); --fold -2, the final fit, on every
labelled family (train and val), holding nothing out. Outputs go to the data set's runs folder
(runs/{data set}/, named after the data folder: see README, "Where outputs go"; --set out_root=DIR: DIR itself), in
{experiment}/fold{k}/ (one variant of a GRID, --variant NAME, in {experiment}/{variant}/fold{k}/; python
-m kinret.grid trains them all; --show-config lists them): checkpoint.pt (written to a temporary name, then renamed,
after every epoch), config.json (the resolved config), summary.csv (one row per epoch), state.json and data.json
(the training families and the content hash of each of their images). --resume continues an interrupted run from its
last finished epoch, with the thread count it started with and the same result as an uninterrupted run; a run whose
training data changed is trained again from the start. Under torchrun --nproc_per_node N -m kinret.train ... the
global batch is split over N DDP processes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from kinret.cli import parser, run_command
from kinret.dist import env_rank_world
from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, apply_overrides
from kinret.train.experiments import check_weights, expand, load_experiment, own_runs_folder
from kinret.train.fit import train_run

log = logging.getLogger("kinret.train")


def build_parser() -> argparse.ArgumentParser:
    p = parser("python -m kinret.train", __doc__)
    p.add_argument("-C", "--config", required=True,
                   help="experiment name (src/kinret/train/experiments/) or a .py file")
    p.add_argument("--fold", type=int, default=0,
                   help="held-out fold; -1 trains on every training family (scored on DATA/val); -2, the final fit, "
                        "trains on every labelled family (train and val) into {runs}/{experiment}/full/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="typed config override")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    p.add_argument("--restart", action="store_true", help="delete this run's outputs and start again")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="one variant of the experiment's GRID (e.g. bce-comb1; --show-config lists them): its "
                        "overrides are applied and it trains into {runs}/{experiment}/{variant}/fold{k}/")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (fields changed from the defaults marked *) and the experiment's "
                        "grid variants, then exit")
    return p


def grid_variants(experiment: str, cfg: TrainConfig) -> dict[str, list[str]]:
    """variant name -> its --set overrides, for every point of the experiment's GRID (empty without a GRID)."""
    _, grid = load_experiment(experiment)
    out: dict[str, list[str]] = {}
    for run in expand(cfg, grid):
        if run.overrides and run.cfg.name != cfg.name:
            out.setdefault(run.cfg.name.removeprefix(f"{cfg.name}/"),
                           [s for s in run.overrides if not s.startswith("name=")])
    return out


def show_config(cfg: TrainConfig, variants: dict[str, list[str]], experiment: str) -> None:
    defaults = TrainConfig().to_dict()
    for key, value in cfg.to_dict().items():
        print(f"{'*' if defaults[key] != value else ' '} {key} = {value!r}")
    if not variants:
        print(f"\nno GRID: one run per fold, in {cfg.out_root}/{cfg.name}/fold{{k}}/")
        return
    print(f"\nGRID: {len(variants)} variants x {cfg.n_folds} folds, each in {cfg.out_root}/{cfg.name}/{{variant}}/"
          f"fold{{k}}/ (python -m kinret.grid -C {experiment} trains them all; one of them: python -m kinret.train "
          f"-C {experiment} --variant NAME --fold K)")
    for name, sets in variants.items():
        print(f"  {name:<24} {' '.join(sets)}")


def run(args: argparse.Namespace) -> int:
    base = own_runs_folder(apply_overrides(load_experiment(args.config)[0], args.set), args.set)
    variants = grid_variants(args.config, base)
    cfg = base
    if args.variant is not None:
        if args.variant not in variants:
            raise KinretInputError(None, f"{args.config} has no grid variant {args.variant!r}; its variants: "
                                         f"{', '.join(variants) or 'none (it defines no GRID)'}")
        cfg = apply_overrides(base, [f"name={base.name}/{args.variant}", *variants[args.variant], *args.set])
    if args.show_config:
        show_config(cfg, {} if args.variant else variants, args.config)
        return 0
    check_weights(cfg)
    train_run(cfg, args.fold, args.resume, args.restart)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if env_rank_world()[0] > 0:
        args.quiet = True
    return run_command(lambda: run(args), args)
