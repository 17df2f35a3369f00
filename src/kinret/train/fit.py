"""Train one run (a config and a fold) into its run folder: the function behind ``python -m kinret.train``, the
grid's workers and ``make_submission.py``.

The run folder's state decides what happens (`kinret.train.runs`): a fresh run records its data and config and
trains from the start, an unfinished one resumes (with the thread count it started with) when asked, a finished one
is left alone. Under torchrun the processes share the run: rank 0 decides and writes, every process trains its slice
of each global batch.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as tdist

from kinret.dist import process_group, resolve_device
from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, save_config
from kinret.train.runs import fixed_runtime, prepare_run_dir, save_data_fingerprint
from kinret.train.trainer import Trainer

log = logging.getLogger("kinret.train")


def _shared_status(cfg: TrainConfig, fold: int, resume: bool, restart: bool, rank: int, world: int) -> str:
    """'fresh', 'resume' or 'finished', decided by rank 0 and shared with every process."""
    status = prepare_run_dir(cfg, fold, resume, restart) if rank == 0 else None
    if world > 1:
        box = [status]
        tdist.broadcast_object_list(box, src=0)
        status = box[0]
    return status


def train_run(cfg: TrainConfig, fold: int, resume: bool = False, restart: bool = False) -> list[dict]:
    """Train run (cfg, fold) to its last epoch and return its summary rows (empty when it was already finished, or
    in a torchrun process other than rank 0). `resume` continues an unfinished run (else it is refused), `restart`
    deletes the run folder first."""
    with process_group(resolve_device(cfg.device).type == "cuda") as (rank, world):
        if cfg.batch_size % world:
            raise KinretInputError(None, f"batch_size {cfg.batch_size} must divide evenly over {world} processes")
        status = _shared_status(cfg, fold, resume, restart, rank, world)
        if status == "finished":
            log.info("%s is finished; nothing to do (--restart to train again)", cfg.run_dir(fold))
            return []
        cfg = fixed_runtime(cfg, fold, status)  # a resumed run keeps the thread count it started with
        torch.set_num_threads(cfg.threads)
        defaults = TrainConfig().to_dict()
        log.info("%s fold %d: %s", cfg.name, fold,
                 ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if defaults[k] != v) or "all defaults")
        trainer = Trainer(cfg, fold, rank, world)
        if rank == 0:
            if status == "fresh":  # what it trains on, recorded before its first checkpoint (data.json)
                save_data_fingerprint(cfg, fold)
            save_config(cfg, trainer.run_dir / "config.json")
        if status == "resume":
            trainer.load()
        rows = trainer.fit()
        if rank == 0 and rows:
            last = rows[-1]
            print(f"{cfg.name} fold {fold}: held-out Average {last['average']:.4f} (mAP {last['mAP']:.4f}, "
                  f"Rank@5 {last['rank5']:.3f}), pair AUC cos {last['pair_auc_cos']:.3f} -> {trainer.run_dir}")
        return rows if rank == 0 else []
