"""Evaluation on a fold's held-out families: the held-out Track-3 protocol and the seeded kin/non-kin pairs
(`HeldOut`), embeddings of table rows with flip test-time augmentation (`RowEmbedder`, as the run's feed gives
them), the per-epoch held-out metrics (`held_out_metrics`) and the pair scores of a saved run, rebuilt from its folder
without a trainer (`held_out_pair_scores`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kinret.data import Fit
from kinret.data.layout import DataLayout
from kinret.data.pixels import ImageTable
from kinret.data.track3 import Track3Split, build_protocol
from kinret.dist import resolve_device
from kinret.errors import KinretInputError
from kinret.features.feeds import feed_class, load_model
from kinret.metrics import chance_level, evaluate_ranking, roc_auc
from kinret.models.config import TrainConfig, seed_of
from kinret.models.losses import sample_pairs, trains_pair_head
from kinret.models.networks import KinNet
from kinret.scoring.protocols import SplitData, oof_split
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.similarity import l2_normalize, probe_scores
from kinret.train.checkpointing import load_checkpoint
from kinret.train.inputs import cache_dir, family_table, training_families

log = logging.getLogger("kinret.train")
METRICS = ("pair_auc_cos", "pair_auc_fc", "mAP", "rank1", "rank5", "average")
Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # table rows a, b and the label (1 = kin)


# ---- embeddings -----------------------------------------------------------------------------------------------------
@dataclass
class RowEmbedder:
    """A model's embeddings of image-table rows (`embed`: the run's feed embedding them, the mean over the image and
    its mirror image, or the image alone with `flip_views` off), and its scores of pairs of them."""

    model: KinNet
    embed: Callable[[np.ndarray], np.ndarray]
    device: torch.device
    fc_trained: bool  # a pair loss trained the FC head, so its kin logit is a score too

    @torch.no_grad()
    def pair_scores(self, ea: np.ndarray, eb: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of embedded pairs: "cosine" always, "fc" (the head's kin logit) when a pair loss trained it;
        "label" is y (1 = kin)."""
        out = {"cosine": (l2_normalize(ea) * l2_normalize(eb)).sum(1), "label": np.asarray(y)}
        if self.fc_trained:
            self.model.eval()
            out["fc"] = self.model.pair_logits(torch.from_numpy(ea).to(self.device),
                                               torch.from_numpy(eb).to(self.device)).float().cpu().numpy()
        return out

    def score_pairs(self, pairs: Pairs) -> dict[str, np.ndarray]:
        """`pair_scores` of table-row pairs, each distinct row embedded once."""
        a, b, y = pairs
        rows = np.unique(np.concatenate([a, b]))
        emb = self.embed(rows)
        return self.pair_scores(emb[np.searchsorted(rows, a)], emb[np.searchsorted(rows, b)], y)


# ---- the held-out protocol and its metrics --------------------------------------------------------------------------
@dataclass
class HeldOut:
    """What a fold is evaluated on: the Track-3 protocol of its held-out families (with the table rows of its probe
    photos and gallery faces, looked up once) and seeded kin/non-kin pairs among their images."""

    split: Track3Split
    pairs: Pairs
    probe_rows: np.ndarray
    gallery_rows: np.ndarray


def row_index(table: ImageTable) -> dict[Path, int]:
    return {p.resolve(): i for i, p in enumerate(table.paths)}  # lists may name paths another way


def held_out_pairs(cfg: TrainConfig, table: ImageTable, eval_fams: list) -> Pairs:
    """The held-out kin/non-kin pairs behind the summary's pair AUC, the same in every epoch and every rebuild."""
    held = table.subset({f.fid for f in eval_fams})
    return sample_pairs(table.family, table.member, held, cfg.eval_pairs, np.random.default_rng(seed_of(cfg.seed, 7)))


def held_out_protocol(families: list, layout: DataLayout, fold: int, seed: int, row_of: dict[Path, int]
                      ) -> Track3Split:
    """A fold's protocol is drawn from its held-out families; with --fold -1 the val split's own labelled lists
    (DATA/val/probe_list.csv, gallery_list.csv) are used when present, so scores match the official val."""
    fit = Fit.of(fold)
    if fit.evaluates_on_val and layout.val_lists is not None:
        split = layout.val_split(seed)
        missing = [p for p in split.probe_image_table()[0] + [g.path for g in split.gallery]
                   if p.resolve() not in row_of]
        if missing:
            raise KinretInputError(missing[0], "listed in the val lists but not in the val family folders")
        return split
    ref_root = layout.val if fit.evaluates_on_val else layout.train
    return build_protocol(families, ref_root, seed=seed, name=f"fold{fold} held-out")[0]


def held_out_setup(cfg: TrainConfig, fold: int, table: ImageTable, eval_fams: list, layout: DataLayout,
                   row_of: dict[Path, int]) -> HeldOut | None:
    """The fold's `HeldOut`, or None when it trains on every family and has nothing to evaluate on."""
    if not eval_fams:
        return None
    split = held_out_protocol(eval_fams, layout, fold, cfg.seed, row_of)
    prow = np.array([row_of[p.resolve()] for p in split.probe_image_table()[0]], dtype=np.int64)
    grow = np.array([row_of[g.path.resolve()] for g in split.gallery], dtype=np.int64)
    held = HeldOut(split, held_out_pairs(cfg, table, eval_fams), prow, grow)
    chance = chance_level(split.probe_fids, split.gallery_fids)
    log.info("%s; a random ranking expects Average %.4f (mAP %.4f, Rank@5 %.4f)", split.describe(),
             chance["average"], chance["mAP"], chance["rank@5"])
    return held


@dataclass
class HeldOutSet:
    """The scorer's out-of-fold split of a fold run (`kinret.scoring.protocols.oof_split`), which the trainer embeds
    after its last epoch for the scorer too: the split and the table row of each of its images."""

    split: SplitData
    table_rows: np.ndarray


def held_out_set(cfg: TrainConfig, fold: int, layout: DataLayout, row_of: dict[Path, int]) -> HeldOutSet | None:
    """The out-of-fold split of fold `fold` as the scorer draws it with protocol seed `cfg.seed` (the default's), or
    None for a run on whole splits or a split whose images are not all in the table."""
    if Fit.of(fold) is not Fit.FOLD:
        return None
    split = oof_split(layout, cfg.n_folds, cfg.fold_seed, cfg.seed, fold)
    rows = [row_of.get(p.resolve()) for p in split.images.paths] if split is not None else [None]
    return None if None in rows else HeldOutSet(split, np.array(rows))


def set_embedder(model: KinNet, embed_rows: Callable[[np.ndarray], np.ndarray], device: torch.device,
                 fc_trained: bool, arrays: dict[str, np.ndarray], held: HeldOutSet) -> RowEmbedder:
    """A `RowEmbedder` that takes a held-out set's embeddings (`arrays`, {name: (V, N, D)} as the scorer keeps them)
    for its images and `embed_rows` for any other row."""
    emb = arrays["emb"].mean(axis=0)  # the views' mean, as the scorer takes it
    at = {int(r): i for i, r in enumerate(held.table_rows)}

    def embed(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        known = np.array([r in at for r in rows.tolist()], dtype=bool)
        out = np.empty((len(rows), emb.shape[1]), dtype=emb.dtype)
        out[known] = emb[[at[r] for r in rows[known].tolist()]]
        if (~known).any():
            out[~known] = embed_rows(rows[~known])
        return out

    return RowEmbedder(model, embed, device, fc_trained)


def held_out_metrics(held: HeldOut | None, embedder: RowEmbedder) -> dict[str, float]:
    """Pair AUCs (cosine, FC) and Track-3 mAP, Rank@1, Rank@5 and Average on the held-out families (NaN without)."""
    nan = float("nan")
    if held is None:
        return dict.fromkeys(METRICS, nan)
    split, prow, grow = held.split, held.probe_rows, held.gallery_rows
    owner = split.probe_image_table()[1]
    a, b, y = held.pairs
    rows = np.unique(np.concatenate([prow, grow, a, b]))  # every distinct row embedded once
    emb = embedder.embed(rows)
    at = {r: i for i, r in enumerate(rows)}

    def take(r: np.ndarray) -> np.ndarray:
        return emb[[at[i] for i in r]]

    ok_p, ok_g = np.ones(len(prow), dtype=bool), np.ones(len(grow), dtype=bool)
    scores = probe_scores(take(prow), ok_p, owner, len(split.probes), take(grow), ok_g, "meanemb")
    res = evaluate_ranking(rank_gallery(scores), split.probe_fids, split.gallery_fids, "standard")
    pairs = embedder.pair_scores(take(a), take(b), y)
    return {"pair_auc_cos": roc_auc(pairs["cosine"], y),
            "pair_auc_fc": roc_auc(pairs["fc"], y) if "fc" in pairs else nan,
            "mAP": res.mAP, "rank1": res.rank[1], "rank5": res.rank[5], "average": res.average}


def held_out_pair_scores(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Cosine (and FC head) scores of a finished or interrupted run's held-out kin/non-kin pairs, from its last
    checkpoint: "cosine", "fc" (pair losses only) and "label" (1 = kin). The model, the image table and the pairs
    are rebuilt from the run folder as the trainer built them, so the scores are the ones behind its pair AUC."""
    model, cfg, data_cfg = load_model(run_dir)
    # mmap: only the fold and the frozen backbone's digest are read, not the tensors load_model already has
    meta = load_checkpoint(Path(run_dir), mmap=True)
    fold = int(meta["fold"])
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.channels_last:  # as the trainer embedded: the same kernels, so the same numbers
        model.to(memory_format=torch.channels_last)
    train_fams, eval_fams, _ = training_families(cfg, fold)
    if not eval_fams:
        raise KinretInputError(None, f"{run_dir}: trained on every family, so it has no held-out pairs")
    table = family_table(train_fams, eval_fams)
    feed = feed_class(cfg)(cfg, device, cache_dir(cfg))
    feed.digest = meta["backbone_digest"]
    feed.load(feed.starting_network(model), data_cfg, table, frozen=False)
    embedder = RowEmbedder(model, lambda rows: feed.embed_rows(model, rows), device, trains_pair_head(cfg.loss))
    return embedder.score_pairs(held_out_pairs(cfg, table, eval_fams))
