"""The training loop of one variant on one fold: `Trainer` builds the model, loss and optimizer for a run folder,
draws each epoch's seeded batches, trains epoch by epoch and, after every epoch, evaluates on the held-out families
and saves the run (`fit`). It re-seeds from `seed_of(...)` at every epoch and step, so a resumed run ends with the
same weights as an uninterrupted one; under torchrun the global batch is split over the DDP processes.

Held-out evaluation lives in `kinret.train.evaluation`, the run's files in `kinret.train.checkpointing`, the command
(``python -m kinret.train``) in `kinret.train.cli`.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from kinret.data.pixels import decode_pixels, gather, normalize, to_float
from kinret.errors import KinretInputError
from kinret.log import progress
from kinret.models.config import TrainConfig, seed_of
from kinret.models.losses import build_loss
from kinret.models.networks import KinNet, build_backbone, pooled_dim, state_digest
from kinret.train.checkpointing import load_checkpoint, save_run, write_derived
from kinret.train.evaluation import (
    RowEmbedder,
    autocast,
    cache_dir,
    family_table,
    frozen_features,
    held_out_metrics,
    held_out_setup,
    resolve_device,
    row_index,
    training_families,
)
from kinret.train.sampling import augment, family_batches, sample_pairs

log = logging.getLogger("kinret.train")


class Objective(nn.Module):
    """Model and loss in one forward, so DDP sees (and synchronises) every trained parameter, the loss's included."""

    def __init__(self, model: KinNet, loss: nn.Module, head_only: bool):
        super().__init__()
        self.model, self.loss, self.head_only = model, loss, head_only

    def forward(self, x: torch.Tensor, target: torch.Tensor, n_pairs: int = 0) -> torch.Tensor:
        emb = self.model.embed_pooled(x) if self.head_only else self.model(x)
        if self.loss.kind == "pair":  # x holds the pairs' first images, then their second images
            return self.loss(self.model.pair_logits(emb[:n_pairs], emb[n_pairs:]), target)
        return self.loss(emb, target)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then a cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Trainer:
    """One run (config, fold) in one process of `world`; rank 0 evaluates and writes the run folder."""

    def __init__(self, cfg: TrainConfig, fold: int, rank: int = 0, world: int = 1):
        self.cfg, self.fold, self.rank, self.world = cfg, fold, rank, world
        self.device = resolve_device(cfg)
        self.run_dir = cfg.run_dir(fold)
        train_fams, eval_fams, root = training_families(cfg, fold)
        self.table = family_table(train_fams, eval_fams)
        self.train_rows = self.table.subset({f.fid for f in train_fams})
        self.row_of = row_index(self.table)
        self.n_train_families = len(train_fams)
        position = {fid: i for i, fid in enumerate(self.table.fids)}
        self.label_of = {position[f.fid]: i for i, f in enumerate(train_fams)}
        self.head_only = cfg.mode == "head"
        self.features: torch.Tensor | None = None  # head-only inputs: (2, N, D) cached features, image and mirror
        self.pixels: np.ndarray | None = None  # end-to-end inputs: the decoded images
        self.build_model()
        self.held_out = held_out_setup(cfg, fold, self.table, eval_fams, root, self.row_of)
        self.embedder = RowEmbedder(self.model, cfg, self.device, self.data_cfg, self.loss.kind == "pair",
                                    features=self.features, pixels=self.pixels)
        self.objective, self.ddp = self.wrap(Objective(self.model, self.loss, self.head_only))
        self.opt = self.build_optimizer()
        self.steps_per_epoch = len(self.epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise KinretInputError(None, f"{cfg.name}: an epoch has no full batch of {cfg.batch_size}: "
                                         "lower batch_size")
        self.epoch, self.step, self.rows = 0, 0, []

    def build_model(self) -> None:
        """The model on its inputs (cached features or decoded images) and the loss, seeded as every fold expects."""
        cfg = self.cfg
        torch.manual_seed(seed_of(cfg.seed))  # a scratch backbone starts the same in every fold (and feature cache)
        backbone, self.data_cfg = build_backbone(cfg)
        dim = pooled_dim(backbone, cfg.pool)
        torch.manual_seed(seed_of(cfg.seed, self.fold))  # the head's initial weights
        if self.world > 1 and self.rank > 0:
            tdist.barrier()  # rank 0 fills the pixel and feature caches first; the others then read them
        self.model = self.model_on_inputs(backbone, dim)
        if self.world > 1 and self.rank == 0:
            tdist.barrier()
        self.loss = build_loss(cfg, self.model.embed_dim, self.n_train_families)
        if self.loss.kind == "family":  # the FC head is not trained by a family loss
            self.model.head.requires_grad_(False)
            if self.head_only and cfg.neck == "none":
                raise KinretInputError(None, f"{cfg.name}: head-only mode with the family loss {cfg.loss!r} has "
                                             "nothing to train; set neck=residual (starts as the identity) or "
                                             "neck=linear")
        self.model.to(self.device)
        self.loss.to(self.device)
        if cfg.channels_last:  # faster for convolutions on CUDA and on CPU alike
            self.model.to(memory_format=torch.channels_last)

    def wrap(self, objective: Objective) -> tuple[nn.Module, nn.Module]:
        """(the objective, what a step calls): under DDP the objective wrapped, with synchronised batch norm on CUDA."""
        if self.world == 1:
            return objective, objective
        if self.device.type == "cuda":
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        return objective, nn.parallel.DistributedDataParallel(
            objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def model_on_inputs(self, backbone: nn.Module, dim: int) -> KinNet:
        """Head-only: the head alone, fed the backbone's cached features. End to end: the whole network, fed the
        decoded images, with the `freeze` prefixes of the backbone kept fixed."""
        cfg = self.cfg
        if self.head_only:
            self.backbone_digest = state_digest(backbone)
            self.features = frozen_features(backbone, self.backbone_digest, self.data_cfg, self.table, cfg,
                                            self.device)
            return KinNet(None, dim, cfg)
        self.backbone_digest = ""
        self.pixels = decode_pixels(self.table.paths, self.data_cfg["input_size"][-1], cache_dir(cfg))
        model = KinNet(backbone, dim, cfg)
        for name, p in model.backbone.named_parameters():
            if any(name.startswith(prefix) for prefix in cfg.freeze):
                p.requires_grad_(False)
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD (the paper) or AdamW over every trained parameter, the loss's included; the backbone's group gets
        `backbone_lr_mult` times the learning rate."""
        cfg = self.cfg
        backbone = [p for n, p in self.objective.named_parameters() if n.startswith("model.backbone.")
                    and p.requires_grad]
        other = [p for n, p in self.objective.named_parameters() if not n.startswith("model.backbone.")
                 and p.requires_grad]
        groups = [{"params": other, "lr_mult": 1.0}]
        if backbone:
            groups.append({"params": backbone, "lr_mult": cfg.backbone_lr_mult})
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # ---- data ------------------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Global batches of (input rows, target): pairs put first images then second images in the rows."""
        cfg = self.cfg
        rng = np.random.default_rng(seed_of(cfg.seed, epoch))
        if self.loss.kind == "pair":
            a, b, y = sample_pairs(self.table.family, self.table.member, self.train_rows, cfg.pairs_per_epoch, rng)
            n = len(y) // cfg.batch_size * cfg.batch_size  # drop the last partial batch: every process gets equal work
            return [(np.concatenate([a[i:i + cfg.batch_size], b[i:i + cfg.batch_size]]), y[i:i + cfg.batch_size])
                    for i in range(0, n, cfg.batch_size)]
        batches = family_batches(self.table.family, self.train_rows, cfg.batch_size, cfg.images_per_family, rng)
        return [(rows, np.array([self.label_of[f] for f in self.table.family[rows]])) for rows in batches
                if len(rows) == cfg.batch_size]

    def local_inputs(self, rows: np.ndarray, target: np.ndarray, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This process's slice of a global batch, as model inputs (augmented images or cached features)."""
        per = len(target) // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        if self.loss.kind == "pair":
            n = len(target)
            rows = np.concatenate([rows[:n][sl], rows[n:][sl]])
            pos = np.concatenate([np.arange(n)[sl], n + np.arange(n)[sl]])
        else:
            rows, pos = rows[sl], np.arange(len(target))[sl]
        total = len(target) * (2 if self.loss.kind == "pair" else 1)
        target_t = torch.as_tensor(target[sl], device=self.device)
        if self.head_only:
            flip = torch.rand(total, generator=gen)[pos] < (self.cfg.flip_p if self.cfg.augment else 0.0)
            x = self.features[flip.long(), torch.as_tensor(rows)].to(self.device)
            return x, target_t, per
        x = to_float(gather(self.pixels, rows), self.device)
        if self.cfg.augment:
            parts = []  # pair inputs are two slices of the global batch (first images, second images)
            for chunk_pos in np.split(pos, [per]) if self.loss.kind == "pair" else [pos]:
                parts.append(augment(x[len(parts) * per:len(parts) * per + len(chunk_pos)], self.cfg, gen,
                                     offset=int(chunk_pos[0]) if len(chunk_pos) else 0, total=total))
            x = torch.cat(parts)
        x = normalize(x, self.data_cfg["mean"], self.data_cfg["std"])
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, target_t, per

    # ---- evaluation and checkpoints --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return held_out_metrics(self.held_out, self.embedder)

    def checkpoint(self) -> dict:
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict(), "optimizer": self.opt.state_dict(),
                "epoch": self.epoch, "step": self.step, "rows": self.rows, "config": self.cfg.to_dict(),
                "fold": self.fold, "data_config": self.data_cfg, "backbone_digest": self.backbone_digest,
                "pooled_dim": self.features.shape[-1] if self.head_only else None,
                "fc_trained": self.loss.kind == "pair", "train_families": self.n_train_families}

    def save(self) -> None:
        """Checkpoint, summary and state, each written to a temporary name and renamed (rank 0 only)."""
        save_run(self.run_dir, self.checkpoint(), self.rows, self.epoch, self.cfg.epochs)

    def load(self) -> None:
        ckpt = load_checkpoint(self.run_dir, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.loss.load_state_dict(ckpt["loss"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step, self.rows = ckpt["epoch"], ckpt["step"], ckpt["rows"]
        if self.rank == 0:  # the checkpoint is the commit point: a kill after it may have left these behind
            write_derived(self.run_dir, self.rows, self.epoch, self.cfg.epochs)
        log.info("resumed %s after epoch %d", self.run_dir, self.epoch)

    # ---- the loop --------------------------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        cfg, epoch = self.cfg, self.epoch
        total = cfg.epochs * self.steps_per_epoch
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        torch.manual_seed(seed_of(cfg.seed, epoch, 1, self.rank))  # dropout; reseeded per epoch so resume matches
        self.ddp.train()
        losses, n_img, t0 = [], 0, time.perf_counter()
        bar = progress(self.epoch_batches(epoch), desc=f"{cfg.name} fold{self.fold} epoch {epoch + 1}/{cfg.epochs}",
                       total=self.steps_per_epoch, unit="batch")
        for i, (rows, target) in enumerate(bar):
            gen = torch.Generator().manual_seed(seed_of(cfg.seed, epoch, 2, i))
            x, t, n_pairs = self.local_inputs(rows, target, gen)
            factor = lr_factor(self.step, total, warmup, cfg.min_lr_ratio)
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr * factor * g["lr_mult"]
            with autocast(self.device, self.cfg.amp):
                loss = self.ddp(x, t, n_pairs)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            losses.append(loss.item())
            n_img += len(x) * self.world
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{n_img / (time.perf_counter() - t0):.0f}")
        seconds = time.perf_counter() - t0
        return {"epoch": epoch + 1, "lr": cfg.lr * factor, "train_loss": float(np.mean(losses)),
                "images_per_s": n_img / seconds, "seconds": seconds}

    def fit(self) -> list[dict]:
        while self.epoch < self.cfg.epochs:
            row = self.train_epoch()
            self.epoch += 1
            if self.rank == 0:
                row.update(self.evaluate())
                self.rows.append(row)
                self.save()
                log.info("%s fold%d epoch %d/%d: loss %.4f, %.0f img/s, held-out pair AUC cos %.3f fc %.3f, "
                         "mAP %.4f, Rank@5 %.3f, Average %.4f", self.cfg.name, self.fold, row["epoch"],
                         self.cfg.epochs, row["train_loss"], row["images_per_s"], row["pair_auc_cos"],
                         row["pair_auc_fc"], row["mAP"], row["rank5"], row["average"])
            if self.world > 1:
                tdist.barrier()
        return self.rows
