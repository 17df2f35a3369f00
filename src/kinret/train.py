"""Train one variant on one fold: ``python -m kinret.train -C <experiment> --fold k [--set key=value ...]``.

``--fold -1`` trains on every training family (evaluated on DATA/val when present). Outputs go to
``runs/{experiment}/fold{k}/``: ``checkpoint.pt`` (written to a temporary name, then renamed, after every epoch),
``config.json`` (the resolved config), ``summary.csv`` (one row per epoch) and ``state.json``. ``--resume`` continues
an interrupted run from its last finished epoch, with the same result as an uninterrupted run. Under
``torchrun --nproc_per_node N -m kinret.train ...`` the global batch is split over N DDP processes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from .config import TrainConfig, apply_overrides, config_from_dict, load_experiment, save_config, seed_of
from .data import ImageTable, augment, decode_pixels, family_batches, gather, normalize, sample_pairs, to_float
from .embed import cached_features
from .errors import KinretInputError
from .fiw import family_folds, read_fiw
from .io import atomic_path, write_text_atomic
from .log import progress, setup_logging
from .losses import build_loss
from .metrics import chance_level, evaluate_ranking, roc_auc
from .models import KinNet, build_backbone, pooled_dim, state_digest
from .pipeline import probe_scores
from .ranking import l2_normalize, rank_gallery
from .runs import prepare_run_dir
from .split import Track3Split, build_protocol, read_labelled
from .synth import SynthConfig, generate

log = logging.getLogger("kinret.train")
SYNTH_ROOT = Path("data") / "synthetic"
SUMMARY_FIELDS = ("epoch", "lr", "train_loss", "images_per_s", "seconds", "pair_auc_cos", "pair_auc_fc", "mAP",
                  "rank1", "rank5", "average")


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


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def training_families(cfg: TrainConfig, fold: int) -> tuple[list, list, Path]:
    """(families to train on, families to evaluate on, the data root)."""
    root = Path(cfg.data_root)
    if not (root / "train").is_dir():
        if root != SYNTH_ROOT:
            raise KinretInputError(root / "train", "no training families: expected FIW folders F*/MID*/*.jpg")
        generate(root, SynthConfig())
    families = read_fiw(root / "train")
    if fold < 0:
        val = read_fiw(root / "val") if (root / "val").is_dir() else []
        return families, val, root
    if fold >= cfg.n_folds:
        raise ValueError(f"--fold {fold} is out of range for n_folds={cfg.n_folds}")
    folds = family_folds(families, cfg.n_folds, cfg.fold_seed)
    return ([f for f in families if folds[f.fid] != fold], [f for f in families if folds[f.fid] == fold], root)


class Trainer:
    def __init__(self, cfg: TrainConfig, fold: int, rank: int = 0, world: int = 1):
        self.cfg, self.fold, self.rank, self.world = cfg, fold, rank, world
        self.device = resolve_device(cfg)
        self.run_dir = cfg.run_dir(fold)
        train_fams, eval_fams, root = training_families(cfg, fold)
        # in family-id order whatever the fold, so every fold shares one pixel and one feature cache
        self.table = ImageTable.from_families(sorted(train_fams + eval_fams, key=lambda f: f.fid))
        self.train_rows = self.table.subset({f.fid for f in train_fams})
        self.row_of = {p.resolve(): i for i, p in enumerate(self.table.paths)}  # lists may name paths another way
        self.n_train_families = len(train_fams)
        position = {fid: i for i, fid in enumerate(self.table.fids)}
        self.label_of = {position[f.fid]: i for i, f in enumerate(train_fams)}
        torch.manual_seed(seed_of(cfg.seed))  # a scratch backbone starts the same in every fold (and feature cache)
        backbone, self.data_cfg = build_backbone(cfg)
        size = self.data_cfg["input_size"][-1]
        cache = Path(cfg.out_root) / "_cache"
        self.head_only = cfg.mode == "head"
        dim = pooled_dim(backbone, cfg.pool)
        torch.manual_seed(seed_of(cfg.seed, fold))  # the head's initial weights
        if world > 1 and rank > 0:
            tdist.barrier()  # rank 0 fills the pixel and feature caches first; the others then read them
        if self.head_only:
            self.backbone_digest = state_digest(backbone)
            feats = cached_features(backbone, self.backbone_digest, self.data_cfg, self.table.paths,
                                    lambda: decode_pixels(self.table.paths, size, cache), cache, cfg.backbone,
                                    self.device, cfg.eval_batch_size, cfg.gem_p, cfg.channels_last)
            self.features = torch.from_numpy(feats[cfg.pool])  # (2, N, D): image, mirror image
            self.model = KinNet(None, dim, cfg)
        else:
            self.backbone_digest = ""
            self.pixels = decode_pixels(self.table.paths, size, cache)
            self.model = KinNet(backbone, dim, cfg)
            for name, p in self.model.backbone.named_parameters():
                if any(name.startswith(prefix) for prefix in cfg.freeze):
                    p.requires_grad_(False)
        if world > 1 and rank == 0:
            tdist.barrier()
        self.loss = build_loss(cfg, self.model.embed_dim, self.n_train_families)
        if self.loss.kind == "family":  # the FC head is not trained by a family loss
            self.model.head.requires_grad_(False)
            if self.head_only and cfg.neck == "none":
                raise ValueError(f"{cfg.name}: head-only mode with the family loss {cfg.loss!r} has nothing to train; "
                                 "set neck=residual (starts as the identity) or neck=linear")
        self.model.to(self.device)
        self.loss.to(self.device)
        if cfg.channels_last:  # faster for convolutions on CUDA and on CPU alike
            self.model.to(memory_format=torch.channels_last)
        self.eval_split = None
        if eval_fams:
            self.eval_split = self.held_out_protocol(eval_fams, root, fold)
            held = self.table.subset({f.fid for f in eval_fams})
            rng = np.random.default_rng(seed_of(cfg.seed, 7))
            self.eval_pairs = sample_pairs(self.table.family, self.table.member, held, cfg.eval_pairs, rng)
            chance = chance_level(self.eval_split.probe_fids, self.eval_split.gallery_fids)
            log.info("%s; a random ranking expects Average %.4f (mAP %.4f, Rank@5 %.4f)", self.eval_split.describe(),
                     chance["average"], chance["mAP"], chance["rank@5"])
        self.objective = Objective(self.model, self.loss, self.head_only)
        self.ddp = self.objective
        if world > 1:
            if self.device.type == "cuda":
                self.objective = nn.SyncBatchNorm.convert_sync_batchnorm(self.objective)
            self.ddp = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = self.build_optimizer()
        self.steps_per_epoch = len(self.epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.name}: an epoch has no full batch of {cfg.batch_size}: lower batch_size")
        self.epoch, self.step, self.rows = 0, 0, []

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

    def held_out_protocol(self, families: list, root: Path, fold: int) -> Track3Split:
        """A fold's protocol is drawn from its held-out families; with --fold -1 the val split's own labelled lists
        (DATA/val/probe_list.csv, gallery_list.csv) are used when present, so scores match the official val."""
        val = root / "val"
        if fold < 0 and (val / "probe_list.csv").is_file() and (val / "gallery_list.csv").is_file():
            split = read_labelled(val / "probe_list.csv", val / "gallery_list.csv", val, name="val")
            known = set(self.row_of)
            missing = [p for p in split.probe_image_table()[0] + [g.path for g in split.gallery]
                       if p.resolve() not in known]
            if missing:
                raise KinretInputError(missing[0], "listed in the val lists but not in the val family folders")
            return split
        ref_root = val if fold < 0 else root / "train"
        return build_protocol(families, ref_root, seed=self.cfg.seed, name=f"fold{fold} held-out")[0]

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

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_rows(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of table rows with flip test-time augmentation (mean of the image's and its mirror's)."""
        self.model.eval()
        if self.head_only:
            pooled = self.features[:, torch.as_tensor(rows)].mean(0).to(self.device)
            return self.model.embed_pooled(pooled).float().cpu().numpy()
        out = []
        for i in range(0, len(rows), self.cfg.eval_batch_size):
            chunk = np.asarray(rows[i:i + self.cfg.eval_batch_size])
            x = normalize(to_float(gather(self.pixels, chunk), self.device),
                          self.data_cfg["mean"], self.data_cfg["std"])
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                e = (self.model(x).float() + self.model(x.flip(3)).float()) / 2
            out.append(e.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.embed_dim), np.float32)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        nan = float("nan")
        if self.eval_split is None:
            return dict.fromkeys(("pair_auc_cos", "pair_auc_fc", "mAP", "rank1", "rank5", "average"), nan)
        split = self.eval_split
        paths, owner = split.probe_image_table()
        prow = np.array([self.row_of[p.resolve()] for p in paths])
        grow = np.array([self.row_of[g.path.resolve()] for g in split.gallery])
        a, b, y = self.eval_pairs
        rows = np.unique(np.concatenate([prow, grow, a, b]))
        emb = self.embed_rows(rows)
        at = {r: i for i, r in enumerate(rows)}

        def take(r: np.ndarray) -> np.ndarray:
            return emb[[at[i] for i in r]]

        ok_p, ok_g = np.ones(len(prow), dtype=bool), np.ones(len(grow), dtype=bool)
        scores = probe_scores(take(prow), ok_p, owner, len(split.probes), take(grow), ok_g, "mean")
        res = evaluate_ranking(rank_gallery(scores), split.probe_fids, split.gallery_fids, "standard")
        pairs = self.pair_scores(take(a), take(b), y)
        return {"pair_auc_cos": roc_auc(pairs["cosine"], y),
                "pair_auc_fc": roc_auc(pairs["fc"], y) if "fc" in pairs else nan,
                "mAP": res.mAP, "rank1": res.rank[1], "rank5": res.rank[5], "average": res.average}

    @torch.no_grad()
    def pair_scores(self, ea: np.ndarray, eb: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of embedded pairs: "cosine" always, "fc" (the head's kin logit) when a pair loss trained it;
        "label" is y (1 = kin)."""
        out = {"cosine": (l2_normalize(ea) * l2_normalize(eb)).sum(1), "label": np.asarray(y)}
        if self.loss.kind == "pair":
            self.model.eval()
            out["fc"] = self.model.pair_logits(torch.from_numpy(ea).to(self.device),
                                               torch.from_numpy(eb).to(self.device)).float().cpu().numpy()
        return out

    def held_out_pairs(self) -> dict[str, np.ndarray]:
        """`pair_scores` of the fold's held-out kin/non-kin pairs (the pairs behind the summary's pair AUC)."""
        if self.eval_split is None:
            raise ValueError(f"{self.run_dir}: trained on every family, so it has no held-out pairs")
        a, b, y = self.eval_pairs
        rows = np.unique(np.concatenate([a, b]))
        emb = self.embed_rows(rows)
        return self.pair_scores(emb[np.searchsorted(rows, a)], emb[np.searchsorted(rows, b)], y)

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint, summary and state, each written to a temporary name and renamed (rank 0 only)."""
        ckpt = {"model": self.model.state_dict(), "loss": self.loss.state_dict(), "optimizer": self.opt.state_dict(),
                "epoch": self.epoch, "step": self.step, "rows": self.rows, "config": self.cfg.to_dict(),
                "fold": self.fold, "data_config": self.data_cfg, "backbone_digest": self.backbone_digest,
                "pooled_dim": self.features.shape[-1] if self.head_only else None,
                "fc_trained": self.loss.kind == "pair", "train_families": self.n_train_families}
        with atomic_path(self.run_dir / "checkpoint.pt", suffix=".pt") as tmp:
            torch.save(ckpt, tmp)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.run_dir / "summary.csv", buf.getvalue())
        state = {"epoch": self.epoch, "epochs": self.cfg.epochs, "finished": self.epoch >= self.cfg.epochs,
                 "last": self.rows[-1] if self.rows else None}
        write_text_atomic(self.run_dir / "state.json", json.dumps(state, indent=2) + "\n")

    def load(self) -> None:
        ckpt = torch.load(self.run_dir / "checkpoint.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.loss.load_state_dict(ckpt["loss"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step, self.rows = ckpt["epoch"], ckpt["step"], ckpt["rows"]
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
            with self.autocast():
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


def held_out_pair_scores(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Cosine (and FC head) scores of a finished or interrupted run's held-out kin/non-kin pairs, from its last
    checkpoint: "cosine", "fc" (pair losses only) and "label" (1 = kin)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train this run first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    trainer = Trainer(config_from_dict(ckpt["config"]), int(ckpt["fold"]))
    trainer.model.load_state_dict(ckpt["model"])
    return trainer.held_out_pairs()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kinret.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-C", "--config", required=True, help="experiment name (src/kinret/experiments/) or a .py file")
    p.add_argument("--fold", type=int, default=0, help="held-out fold; -1 trains on every training family")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="typed config override")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    p.add_argument("--restart", action="store_true", help="delete this run's outputs and start again")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (fields changed from the defaults marked *) and exit")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        cfg, _ = load_experiment(args.config)
        cfg = apply_overrides(cfg, args.set)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    if args.show_config:
        defaults = TrainConfig().to_dict()
        for key, value in cfg.to_dict().items():
            print(f"{'*' if defaults[key] != value else ' '} {key} = {value!r}")
        return 0
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if resolve_device(cfg).type == "cuda" else "gloo")
        if resolve_device(cfg).type == "cuda":
            torch.cuda.set_device(resolve_device(cfg))
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world} processes")
    try:
        status = prepare_run_dir(cfg, args.fold, args.resume, args.restart) if rank == 0 else None
        if world > 1:
            box = [status]
            tdist.broadcast_object_list(box, src=0)
            status = box[0]
        if status == "finished":
            log.info("%s is finished; nothing to do (--restart to train again)", cfg.run_dir(args.fold))
            return 0
        defaults = TrainConfig().to_dict()
        log.info("%s fold %d: %s", cfg.name, args.fold,
                 ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if defaults[k] != v) or "all defaults")
        trainer = Trainer(cfg, args.fold, rank, world)
        if rank == 0:
            save_config(cfg, trainer.run_dir / "config.json")
        if status == "resume":
            trainer.load()
        rows = trainer.fit()
        if rank == 0 and rows:
            last = rows[-1]
            print(f"{cfg.name} fold {args.fold}: held-out Average {last['average']:.4f} (mAP {last['mAP']:.4f}, "
                  f"Rank@5 {last['rank5']:.3f}), pair AUC cos {last['pair_auc_cos']:.3f} -> {trainer.run_dir}")
        return 0
    except (KinretInputError, ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        if world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
