"""The training loop of one variant on one fold: `Trainer` builds the model, loss and optimizer for a run folder,
draws each epoch's seeded batches, trains epoch by epoch and, before the first epoch (summary row 0, checked against
the starting network's zero-shot score) and after every epoch, evaluates on the held-out families and saves the run
(`fit`). A fine-tune can start its margin loss's class weights at the family means (`class_init`), give them their
own learning rate (`classifier_lr`). What the model consumes (cached frozen features, a cached prefix or pixels) is
the run's feed (`kinret.features.feeds`): the trainer asks it, never the mode.
It re-seeds from `seed_of(...)` at every epoch and step, so a resumed run ends with the same weights as an
uninterrupted one; under torchrun the global batch is split over the DDP processes.

Held-out evaluation lives in `kinret.train.heldout`, the run's inputs in `kinret.train.inputs`, the run's files in
`kinret.train.checkpointing`, training a run into its folder in `kinret.train.fit`, the command (``python -m
kinret.train``) in `kinret.train.cli`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from kinret.dist import autocast, resolve_device
from kinret.errors import KinretInputError
from kinret.features.feed import Feed, embed_pooled_rows
from kinret.features.feeds import feed_class
from kinret.features.sources import CheckpointSource, embed_set
from kinret.log import progress
from kinret.models.config import TrainConfig, seed_of
from kinret.models.losses import Batch, Loss, TrainingSet, build_loss, family_means
from kinret.models.networks import KinNet, build_backbone, freeze_batchnorm
from kinret.train.checkpointing import load_checkpoint, save_run, write_derived
from kinret.train.heldout import (
    RowEmbedder,
    held_out_metrics,
    held_out_set,
    held_out_setup,
    row_index,
    set_embedder,
)
from kinret.train.inputs import cache_dir, family_table, training_families

log = logging.getLogger("kinret.train")
START_COSINE = 0.9999  # a model at its starting network embeds a held-out image this close to it (epoch 0's check)


class Objective(nn.Module):
    """Model and loss in one forward, so DDP sees (and synchronises) every trained parameter, the loss's included.
    The feed runs the model on its inputs; the loss turns their embeddings into the batch's loss value
    (`Loss.batch_loss`)."""

    def __init__(self, model: KinNet, loss: Loss, feed: Feed):
        super().__init__()
        self.model, self.loss, self.feed = model, loss, feed

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss.batch_loss(self.model, self.feed.forward(self.model, x), target)


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
        self.device = resolve_device(cfg.device)
        self.run_dir = cfg.run_dir(fold)
        train_fams, eval_fams, self.layout = training_families(cfg, fold)
        self.table = family_table(train_fams, eval_fams)
        self.train_rows = self.table.subset({f.fid for f in train_fams})
        self.row_of = row_index(self.table)
        self.n_train_families = len(train_fams)
        position = {fid: i for i, fid in enumerate(self.table.fids)}
        self.label_of = {position[f.fid]: i for i, f in enumerate(train_fams)}
        label = np.full(len(self.table.fids), -1, dtype=np.int64)
        label[list(self.label_of)] = list(self.label_of.values())
        self.training_set = TrainingSet(self.table.family, self.table.member, self.train_rows, label[self.table.family])
        self.feed = feed_class(cfg)(cfg, self.device, cache_dir(cfg))
        self.zero_shot: dict[str, float] = {}
        self.build_model()
        self.held_out = held_out_setup(cfg, fold, self.table, eval_fams, self.layout, self.row_of)
        self.embedder = RowEmbedder(self.model, lambda rows: self.feed.embed_rows(self.model, rows), self.device,
                                    self.loss.trains_pair_head)
        self.objective, self.ddp = self.wrap(Objective(self.model, self.loss, self.feed))
        self.opt = self.build_optimizer()
        self.steps_per_epoch = len(self.epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise KinretInputError(None, f"{cfg.name}: an epoch has no full batch of {cfg.batch_size}: "
                                         "lower batch_size")
        self.epoch, self.step, self.rows = 0, 0, []

    def build_model(self) -> None:
        """The feed's inputs and model, and the loss, seeded as every fold expects."""
        cfg = self.cfg
        torch.manual_seed(seed_of(cfg.seed))  # a scratch backbone starts the same in every fold (and feature cache)
        backbone, self.data_cfg = build_backbone(cfg)
        self.feed.check(cfg, backbone)
        torch.manual_seed(seed_of(cfg.seed, self.fold))  # the head's initial weights
        if self.world > 1 and self.rank > 0:
            tdist.barrier()  # rank 0 fills the pixel and feature caches first; the others then read them
        backbone.to(self.device)
        self.feed.load(backbone, self.data_cfg, self.table, frozen=cfg.class_init == "means")
        self.model = self.feed.model(backbone, self.data_cfg)
        if self.world > 1 and self.rank == 0:
            tdist.barrier()
        self.loss = build_loss(cfg, self.model.embed_dim, self.n_train_families)
        if cfg.class_init == "means" and self.loss.has_classes:
            self.loss.init_classes(self.class_means())
        if not self.loss.trains_pair_head:
            self.model.head.requires_grad_(False)
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

    @torch.no_grad()
    def class_means(self) -> torch.Tensor:
        """(training families, D) normalised mean embeddings of each family's training images and their mirror
        images, through the model as it starts (a neck starting as the identity passes the features unchanged)."""
        rows, frozen = self.train_rows, self.feed.frozen
        feats = frozen[:, torch.as_tensor(rows)].reshape(-1, frozen.shape[-1])
        self.model.eval()
        emb = self.model.embed_pooled(feats.to(self.device)).float()
        labels = torch.as_tensor([self.label_of[f] for f in self.table.family[rows]], device=emb.device)
        return family_means(emb, labels.repeat(len(frozen)), self.n_train_families)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD (the paper) or AdamW over every trained parameter, the loss's included; the backbone's group gets
        `backbone_lr_mult` times the learning rate and, with `classifier_lr`, the loss's own parameters (class
        weights) a group of their own at that rate. Every group follows the same schedule."""
        cfg = self.cfg
        named = [(n, p) for n, p in self.objective.named_parameters() if p.requires_grad]
        own = cfg.classifier_lr > 0
        backbone = [p for n, p in named if n.startswith("model.backbone.")]
        classes = [p for n, p in named if own and n.startswith("loss.")]
        other = [p for n, p in named if not n.startswith("model.backbone.") and not (own and n.startswith("loss."))]
        groups = [{"params": other, "lr_mult": 1.0}]
        if backbone:
            groups.append({"params": backbone, "lr_mult": cfg.backbone_lr_mult})
        if classes:
            groups.append({"params": classes, "lr_mult": cfg.classifier_lr / cfg.lr})
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # fused: one kernel for every parameter (the fine-tune's step 143 against 328 ms on 2 cores, docs/decisions.md)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    # ---- data ------------------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[Batch]:
        """The epoch's global batches of (input rows, target), as the loss draws them (`Loss.epoch_batches`)."""
        rng = np.random.default_rng(seed_of(self.cfg.seed, epoch))
        return self.loss.epoch_batches(self.training_set, self.cfg, rng)

    def local_inputs(self, rows: np.ndarray, target: np.ndarray, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's slice of a global batch (`Loss.local_batch`), as the feed's model inputs and target."""
        local = self.loss.local_batch((rows, target), self.rank, self.world)
        return self.feed.batch(local, gen), torch.as_tensor(local.target, device=self.device)

    # ---- evaluation and checkpoints --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return held_out_metrics(self.held_out, self.embedder)

    def evaluate_last(self) -> tuple[dict[str, float], Callable[[], None]]:
        """The held-out scores after the last epoch and what keeps the held-out images' embeddings for the scorer
        (called once the checkpoint is saved): a fold run embeds its out-of-fold split as the scorer would
        (`kinret.features.sources.embed_set`), so the scorer reads them instead of embedding them again."""
        held = held_out_set(self.cfg, self.fold, self.layout, self.row_of) if self.held_out is not None else None
        if held is None:
            return self.evaluate(), lambda: None
        arrays = embed_set(self.feed, self.model, self.data_cfg, held.split.images)
        embedder = set_embedder(self.model, self.embedder.embed, self.device, self.loss.trains_pair_head, arrays,
                                held)
        def keep() -> None:
            CheckpointSource(self.run_dir, cache_dir(self.cfg), config=self.cfg).store(held.split.images, arrays)

        return held_out_metrics(self.held_out, embedder), keep

    def epoch_zero(self) -> dict[str, float]:
        """The held-out scores before any step (summary row epoch 0) and, when the starting network's features are
        at hand, its zero-shot cosine scores on the same protocol. A model whose neck starts as the identity must
        be that network: checked on its embeddings of a sample of held-out images, after which its scores are the
        zero-shot ones (no second pass over every held-out image); a model that fails the check is evaluated in
        full and warned about."""
        nan = float("nan")
        row = {"epoch": 0, "lr": nan, "train_loss": nan, "images_per_s": nan, "seconds": nan}
        plain = None
        if self.feed.frozen is not None:
            with torch.random.fork_rng(devices=[]):  # building a KinNet draws its head's weights: keep the stream
                plain = KinNet(None, self.feed.frozen.shape[-1], replace(self.cfg, neck="none")).to(self.device)
            frozen = self.feed.frozen
            self.zero_shot = held_out_metrics(self.held_out, RowEmbedder(
                plain, lambda rows: embed_pooled_rows(plain, frozen, rows, self.device), self.device, False))
        starts = (plain is not None and self.cfg.neck != "linear" and not self.loss.trains_pair_head
                  and self.starts_at(plain))
        row.update(self.zero_shot if starts else self.evaluate())
        zs, now = self.zero_shot.get("average", nan), row["average"]
        log.info("%s fold%d epoch 0 (before training): held-out mAP %.4f, Rank@5 %.3f, Average %.4f (zero-shot "
                 "cosine of the starting network: %.4f)", self.cfg.name, self.fold, row["mAP"], row["rank5"], now, zs)
        gap = max((abs(row[k] - self.zero_shot[k]) for k in ("pair_auc_cos", "mAP", "average")
                   if k in self.zero_shot), default=0.0)
        if self.cfg.neck != "linear" and gap > self.feed.tolerance:  # NaN (nothing to compare) never warns
            log.warning("%s fold%d: held-out Average %.4f before training differs from the zero-shot %.4f of the "
                        "same network: the model does not start at the pretrained network", self.cfg.name, self.fold,
                        now, zs)
        return row

    def starts_at(self, plain: KinNet, sample: int = 256) -> bool:
        """Whether the model embeds a sample of the held-out images as the starting network does (cosine >=
        `START_COSINE` each; a float16 prefix moves an embedding by ~1e-3 relative, a moved network by far more)."""
        if self.held_out is None:
            return False
        rows = np.unique(np.concatenate([self.held_out.probe_rows, self.held_out.gallery_rows]))
        rows = rows[np.linspace(0, len(rows) - 1, min(sample, len(rows))).astype(int)]
        mine, ref = self.feed.embed_rows(self.model, rows), embed_pooled_rows(plain, self.feed.frozen, rows,
                                                                               self.device)
        cos = (mine * ref).sum(1) / np.maximum(np.linalg.norm(mine, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
        return bool(len(cos)) and float(cos.min()) >= START_COSINE

    def checkpoint(self) -> dict:
        """What resumes or scores the run; the optimizer's state only while epochs remain (a finished run is never
        resumed, and AdamW's moments doubled a fine-tune's checkpoint)."""
        finished = self.epoch >= self.cfg.epochs
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict(),
                "optimizer": None if finished else self.opt.state_dict(),
                "epoch": self.epoch, "step": self.step, "rows": self.rows, "config": self.cfg.to_dict(),
                "fold": self.fold, "data_config": self.data_cfg, "backbone_digest": self.feed.digest,
                "train_families": self.n_train_families, "zero_shot": self.zero_shot}

    def save(self) -> None:
        """Checkpoint, summary and state, each written to a temporary name and renamed (rank 0 only)."""
        save_run(self.run_dir, self.checkpoint(), self.rows, self.epoch, self.cfg.epochs)

    def load(self) -> None:
        ckpt = load_checkpoint(self.run_dir, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.loss.load_state_dict(ckpt["loss"])
        if ckpt["optimizer"] is not None:  # None in a last epoch's checkpoint (a kill before its state was written)
            self.opt.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step, self.rows = ckpt["epoch"], ckpt["step"], ckpt["rows"]
        self.zero_shot = ckpt.get("zero_shot", {})
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
        if cfg.freeze_bn:  # BatchNorm keeps its pretrained running statistics
            freeze_batchnorm(self.model)
        losses, n_img, t0 = [], 0, time.perf_counter()
        bar = progress(self.epoch_batches(epoch), desc=f"{cfg.name} fold{self.fold} epoch {epoch + 1}/{cfg.epochs}",
                       total=self.steps_per_epoch, unit="batch")
        for i, (rows, target) in enumerate(bar):
            gen = torch.Generator().manual_seed(seed_of(cfg.seed, epoch, 2, i))
            x, t = self.local_inputs(rows, target, gen)
            factor = lr_factor(self.step, total, warmup, cfg.min_lr_ratio)
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr * factor * g["lr_mult"]
            with autocast(self.device, self.cfg.amp, self.cfg.amp_cpu):
                loss = self.ddp(x, t)
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
        if self.epoch == 0 and not self.rows:  # a fresh run: where training starts, kept as the summary's epoch 0
            if self.rank == 0:
                self.rows.append(self.epoch_zero())
            if self.world > 1:
                tdist.barrier()
        while self.epoch < self.cfg.epochs:
            row = self.train_epoch()
            self.epoch += 1
            if self.rank == 0:
                scores, keep = self.evaluate_last() if self.epoch == self.cfg.epochs else (self.evaluate(), None)
                row.update(scores)
                self.rows.append(row)
                self.save()
                if keep is not None:
                    keep()
                fc = "" if math.isnan(row["pair_auc_fc"]) else f" fc {row['pair_auc_fc']:.3f}"  # no FC head: no figure
                log.info("%s fold%d epoch %d/%d: loss %.4f, %.0f img/s, held-out pair AUC cos %.3f%s, "
                         "mAP %.4f, Rank@5 %.3f, Average %.4f", self.cfg.name, self.fold, row["epoch"],
                         self.cfg.epochs, row["train_loss"], row["images_per_s"], row["pair_auc_cos"], fc,
                         row["mAP"], row["rank5"], row["average"])
            if self.world > 1:
                tdist.barrier()
        return self.rows
