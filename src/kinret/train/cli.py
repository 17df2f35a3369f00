"""``python -m kinret.train -C <experiment> --fold k [--set key=value ...]``: train one variant on one fold.

--fold -1 trains on every training family (evaluated on DATA/val when present). Outputs go to
runs/{experiment}/fold{k}/ (one variant of a GRID, --variant NAME, to runs/{experiment}/{variant}/fold{k}/; python
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

import torch
import torch.distributed as tdist

from kinret.cli import parser, run_command
from kinret.dist import env_rank_world, process_group
from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, apply_overrides, save_config
from kinret.train.evaluation import resolve_device
from kinret.train.experiments import expand, load_experiment
from kinret.train.runs import fixed_runtime, prepare_run_dir, save_data_fingerprint
from kinret.train.trainer import Trainer

log = logging.getLogger("kinret.train")


def build_parser() -> argparse.ArgumentParser:
    p = parser("python -m kinret.train", __doc__)
    p.add_argument("-C", "--config", required=True,
                   help="experiment name (src/kinret/train/experiments/) or a .py file")
    p.add_argument("--fold", type=int, default=0, help="held-out fold; -1 trains on every training family")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="typed config override")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    p.add_argument("--restart", action="store_true", help="delete this run's outputs and start again")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="one variant of the experiment's GRID (e.g. bce-comb1; --show-config lists them): its "
                        "overrides are applied and it trains into runs/{experiment}/{variant}/fold{k}/")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (fields changed from the defaults marked *) and the experiment's "
                        "grid variants, then exit")
    return p


def grid_variants(experiment: str, cfg: TrainConfig) -> dict[str, list[str]]:
    """variant name -> its --set overrides, for every point of the experiment's GRID (empty without a GRID)."""
    _, grid = load_experiment(experiment)
    out: dict[str, list[str]] = {}
    for vcfg, _, sets in expand(cfg, grid):
        if sets and vcfg.name != cfg.name:
            out.setdefault(vcfg.name.removeprefix(f"{cfg.name}/"), [s for s in sets if not s.startswith("name=")])
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


def run_status_everywhere(cfg: TrainConfig, args: argparse.Namespace, rank: int, world: int) -> str:
    """'fresh', 'resume' or 'finished', decided by rank 0 and shared with every process."""
    status = prepare_run_dir(cfg, args.fold, args.resume, args.restart) if rank == 0 else None
    if world > 1:
        box = [status]
        tdist.broadcast_object_list(box, src=0)
        status = box[0]
    return status


def train(cfg: TrainConfig, args: argparse.Namespace) -> int:
    with process_group(resolve_device(cfg).type == "cuda") as (rank, world):
        if cfg.batch_size % world:
            raise KinretInputError(None, f"batch_size {cfg.batch_size} must divide evenly over {world} processes")
        status = run_status_everywhere(cfg, args, rank, world)
        if status == "finished":
            log.info("%s is finished; nothing to do (--restart to train again)", cfg.run_dir(args.fold))
            return 0
        cfg = fixed_runtime(cfg, args.fold, status)  # a resumed run keeps the thread count it started with
        torch.set_num_threads(cfg.threads)
        defaults = TrainConfig().to_dict()
        log.info("%s fold %d: %s", cfg.name, args.fold,
                 ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if defaults[k] != v) or "all defaults")
        trainer = Trainer(cfg, args.fold, rank, world)
        if rank == 0:
            if status == "fresh":  # what it trains on, recorded before its first checkpoint (data.json)
                save_data_fingerprint(cfg, args.fold)
            save_config(cfg, trainer.run_dir / "config.json")
        if status == "resume":
            trainer.load()
        rows = trainer.fit()
        if rank == 0 and rows:
            last = rows[-1]
            print(f"{cfg.name} fold {args.fold}: held-out Average {last['average']:.4f} (mAP {last['mAP']:.4f}, "
                  f"Rank@5 {last['rank5']:.3f}), pair AUC cos {last['pair_auc_cos']:.3f} -> {trainer.run_dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    base = apply_overrides(load_experiment(args.config)[0], args.set)
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
    return train(cfg, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if env_rank_world()[0] > 0:
        args.quiet = True
    return run_command(lambda: run(args), args)
