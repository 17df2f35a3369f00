"""The training loop of one variant on one fold: `Trainer` builds the model, loss and optimizer for a run folder,
draws each epoch's seeded batches, trains epoch by epoch and, before the first epoch (summary row 0, checked against
the starting network's zero-shot score) and after every epoch, evaluates on the held-out families and saves the run
(`fit`). A fine-tune can start its margin loss's class weights at the family means (`class_init`), give them their
own learning rate (`classifier_lr`) and feed the cached output of its frozen leading units (`kinret.features.prefix`).
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
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from kinret.data.pixels import decode_pixels, gather, normalize, to_float
from kinret.dist import autocast, resolve_device
from kinret.errors import KinretInputError
from kinret.features.prefix import Prefix, checked_cut, gather_prefix
from kinret.log import progress
from kinret.models.config import TrainConfig, seed_of
from kinret.models.losses import Batch, Loss, TrainingSet, build_loss, family_means
from kinret.models.networks import KinNet, build_backbone, freeze_prefixes, pooled_dim, state_digest
from kinret.train.checkpointing import load_checkpoint, save_run, write_derived
from kinret.train.heldout import RowEmbedder, held_out_metrics, held_out_setup, row_index
from kinret.train.inputs import cache_dir, family_table, frozen_features, training_families
from kinret.train.sampling import augment

log = logging.getLogger("kinret.train")


class Objective(nn.Module):
    """Model and loss in one forward, so DDP sees (and synchronises) every trained parameter, the loss's included.
    Inputs are cached pooled features (`head_only`), the cached output of the backbone's first `cut` units, or
    images; the loss turns their embeddings into the batch's loss value (`Loss.batch_loss`)."""

    def __init__(self, model: KinNet, loss: Loss, head_only: bool, cut: int = 0):
        super().__init__()
        self.model, self.loss, self.head_only, self.cut = model, loss, head_only, cut

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.head_only:
            emb = self.model.embed_pooled(x)
        else:
            emb = self.model.embed_rest(x, self.cut) if self.cut else self.model(x)
        return self.loss.batch_loss(self.model, emb, target)


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
        train_fams, eval_fams, layout = training_families(cfg, fold)
        self.table = family_table(train_fams, eval_fams)
        self.train_rows = self.table.subset({f.fid for f in train_fams})
        self.row_of = row_index(self.table)
        self.n_train_families = len(train_fams)
        position = {fid: i for i, fid in enumerate(self.table.fids)}
        self.label_of = {position[f.fid]: i for i, f in enumerate(train_fams)}
        label = np.full(len(self.table.fids), -1, dtype=np.int64)
        label[list(self.label_of)] = list(self.label_of.values())
        self.training_set = TrainingSet(self.table.family, self.table.member, self.train_rows, label[self.table.family])
        self.head_only = cfg.mode == "head"
        self.features: torch.Tensor | None = None  # head-only inputs: (2, N, D) cached features, image and mirror
        self.frozen: torch.Tensor | None = None  # the starting network's pooled features, when a run needs them
        self.pixels: np.ndarray | None = None  # end-to-end inputs: the decoded images
        self.prefix: np.ndarray | None = None  # with cache_prefix: (views, N, C, H, W) outputs of the frozen units
        self.cut, self.zero_shot = 0, {}
        self.build_model()
        self.held_out = held_out_setup(cfg, fold, self.table, eval_fams, layout, self.row_of)
        self.embedder = RowEmbedder(self.model, cfg, self.device, self.data_cfg, self.loss.trains_pair_head,
                                    features=self.features, pixels=self.pixels, prefix=self.prefix, cut=self.cut)
        self.objective, self.ddp = self.wrap(Objective(self.model, self.loss, self.head_only, self.cut))
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

    def model_on_inputs(self, backbone: nn.Module, dim: int) -> KinNet:
        """Head-only: the head alone, fed the backbone's cached features. End to end: the whole network, fed the
        decoded images, with the `freeze` prefixes of the backbone kept fixed."""
        cfg = self.cfg
        backbone.to(self.device)
        if self.head_only:
            self.backbone_digest = state_digest(backbone)
            self.features = self.frozen = frozen_features(backbone, self.backbone_digest, self.data_cfg, self.table,
                                                          cfg, self.device)
            return KinNet(None, dim, cfg)
        self.backbone_digest = ""
        prefix = None
        if cfg.cache_prefix:  # the frozen units' output: a frozen feature pass gives it too
            self.cut = checked_cut(cfg, backbone)
            prefix = Prefix.of(cfg, backbone, self.cut, self.data_cfg, self.device)
        if cfg.class_init == "means":  # the class weights start at the frozen network's family means
            self.frozen = frozen_features(backbone, state_digest(backbone), self.data_cfg, self.table, cfg, self.device,
                                          prefix)
        model = KinNet(backbone, dim, cfg)
        names = [name for name, _ in model.backbone.named_parameters()]
        frozen = freeze_prefixes(backbone, cfg)
        unmatched = [f for f in frozen if not any(n.startswith(f) for n in names)]
        if unmatched:  # a prefix that freezes nothing is a typo, not a recipe
            raise KinretInputError(None, f"{cfg.name}: freeze prefix {unmatched[0]!r} matches no parameter of the "
                                         f"backbone {cfg.backbone!r} (its names look like {names[0]!r})")
        for name, p in model.backbone.named_parameters():
            if any(name.startswith(f) for f in frozen):
                p.requires_grad_(False)
        if prefix is not None:  # computed here only when no feature pass wrote it
            self.prefix = prefix.table(self.table.paths, cache_dir(cfg))
        else:
            self.pixels = decode_pixels(self.table.paths, self.data_cfg["input_size"][-1], cache_dir(cfg))
        return model

    @torch.no_grad()
    def class_means(self) -> torch.Tensor:
        """(training families, D) normalised mean embeddings of each family's training images and their mirror
        images, through the model as it starts (a neck starting as the identity passes the features unchanged)."""
        rows = self.train_rows
        feats = self.frozen[:, torch.as_tensor(rows)].reshape(-1, self.frozen.shape[-1])
        self.model.eval()
        emb = self.model.embed_pooled(feats.to(self.device)).float()
        labels = torch.as_tensor([self.label_of[f] for f in self.table.family[rows]], device=emb.device)
        return family_means(emb, labels.repeat(len(self.frozen)), self.n_train_families)

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
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # ---- data ------------------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[Batch]:
        """The epoch's global batches of (input rows, target), as the loss draws them (`Loss.epoch_batches`)."""
        rng = np.random.default_rng(seed_of(self.cfg.seed, epoch))
        return self.loss.epoch_batches(self.training_set, self.cfg, rng)

    def local_inputs(self, rows: np.ndarray, target: np.ndarray, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's slice of a global batch (`Loss.local_batch`), as model inputs (augmented images or cached
        features) and target."""
        local = self.loss.local_batch((rows, target), self.rank, self.world)
        rows, pos, total = local.rows, local.positions, local.total
        target_t = torch.as_tensor(local.target, device=self.device)
        if self.head_only:
            flip = torch.rand(total, generator=gen)[pos] < (self.cfg.flip_p if self.cfg.augment else 0.0)
            view = flip.long().clamp(max=len(self.features) - 1)  # one view (flip_views off): no flip to draw
            return self.features[view, torch.as_tensor(rows)].to(self.device), target_t
        if self.prefix is not None:
            return self.prefix_inputs(rows, pos, total, gen), target_t
        x = to_float(gather(self.pixels, rows), self.device)
        if self.cfg.augment:
            parts, start = [], 0  # each block is a run of positions in the global batch, augmented as one slice
            for block in local.blocks:
                parts.append(augment(x[start:start + len(block)], self.cfg, gen,
                                     offset=int(block[0]) if len(block) else 0, total=total))
                start += len(block)
            x = torch.cat(parts)
        x = normalize(x, self.data_cfg["mean"], self.data_cfg["std"])
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, target_t

    def prefix_inputs(self, rows: np.ndarray, pos: np.ndarray, total: int, gen: torch.Generator) -> torch.Tensor:
        """The cached prefix outputs of the views drawn as `augment` draws them (flip, then greyscale when on), so
        a family-loss run on the cache takes the views a run on pixels would."""
        on = self.cfg.augment
        mirrors = 2 if self.cfg.flip_views else 1  # views: image, mirror, then their greyscale copies
        view = (torch.rand(total, generator=gen)[pos] < (self.cfg.flip_p if on else 0.0)).long().clamp(max=mirrors - 1)
        if len(self.prefix) > mirrors:
            view += mirrors * (torch.rand(total, generator=gen)[pos] < self.cfg.grey_p).long()
        x = torch.from_numpy(gather_prefix(self.prefix, rows, view.numpy())).to(self.device).float()
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    # ---- evaluation and checkpoints --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return held_out_metrics(self.held_out, self.embedder)

    def epoch_zero(self) -> dict[str, float]:
        """The held-out scores before any step (summary row epoch 0) and, when the starting network's features are
        at hand, its zero-shot cosine scores on the same protocol: a model whose neck starts as the identity must
        score the same, or the evaluation and the features disagree (warned)."""
        nan = float("nan")
        row = {"epoch": 0, "lr": nan, "train_loss": nan, "images_per_s": nan, "seconds": nan, **self.evaluate()}
        if self.frozen is not None:
            with torch.random.fork_rng(devices=[]):  # building a KinNet draws its head's weights: keep the stream
                plain = KinNet(None, self.frozen.shape[-1], replace(self.cfg, neck="none")).to(self.device)
            self.zero_shot = held_out_metrics(self.held_out, RowEmbedder(plain, self.cfg, self.device, self.data_cfg,
                                                                         False, features=self.frozen))
        zs, now = self.zero_shot.get("average", nan), row["average"]
        log.info("%s fold%d epoch 0 (before training): held-out mAP %.4f, Rank@5 %.3f, Average %.4f (zero-shot "
                 "cosine of the starting network: %.4f)", self.cfg.name, self.fold, row["mAP"], row["rank5"], now, zs)
        gap = max((abs(row[k] - self.zero_shot[k]) for k in ("pair_auc_cos", "mAP", "average")
                   if k in self.zero_shot), default=0.0)
        # a prefix stored in float16 moves the embeddings by ~1e-3 relative: a tie or two in the ranking may turn
        tolerance = 2e-3 if self.prefix is not None and self.prefix.dtype == np.float16 else 1e-6
        if self.cfg.neck != "linear" and gap > tolerance:  # NaN (nothing to compare) never warns
            log.warning("%s fold%d: held-out Average %.4f before training differs from the zero-shot %.4f of the "
                        "same network: the model does not start at the pretrained network", self.cfg.name, self.fold,
                        now, zs)
        return row

    def checkpoint(self) -> dict:
        """What resumes or scores the run; the optimizer's state only while epochs remain (a finished run is never
        resumed, and AdamW's moments doubled a fine-tune's checkpoint)."""
        finished = self.epoch >= self.cfg.epochs
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict(),
                "optimizer": None if finished else self.opt.state_dict(),
                "epoch": self.epoch, "step": self.step, "rows": self.rows, "config": self.cfg.to_dict(),
                "fold": self.fold, "data_config": self.data_cfg, "backbone_digest": self.backbone_digest,
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
        if cfg.freeze_bn and self.model.backbone is not None:  # BatchNorm keeps its pretrained running statistics
            for m in self.model.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
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
                row.update(self.evaluate())
                self.rows.append(row)
                self.save()
                fc = "" if math.isnan(row["pair_auc_fc"]) else f" fc {row['pair_auc_fc']:.3f}"  # no FC head: no figure
                log.info("%s fold%d epoch %d/%d: loss %.4f, %.0f img/s, held-out pair AUC cos %.3f%s, "
                         "mAP %.4f, Rank@5 %.3f, Average %.4f", self.cfg.name, self.fold, row["epoch"],
                         self.cfg.epochs, row["train_loss"], row["images_per_s"], row["pair_auc_cos"], fc,
                         row["mAP"], row["rank5"], row["average"])
            if self.world > 1:
                tdist.barrier()
        return self.rows
