"""The stages from a split to a submission: features -> per-probe score matrix -> ranking -> predictions.csv.

Each stage is a function of arrays so later pieces (trained backbones, cached score matrices, blends) replace one
stage without touching the others: anything that yields a (P, N) score matrix in split order can be ranked,
written and evaluated here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import FeatureFn
from .metrics import Track3Scores, evaluate_ranking
from .ranking import AGGREGATIONS, aggregate, cosine_scores, mean_embedding, rank_gallery
from .split import Track3Split
from .submission import write_predictions

log = logging.getLogger(__name__)


def probe_scores(probe_feats: np.ndarray, probe_ok: np.ndarray, owner: np.ndarray, n_probes: int,
                 gallery_feats: np.ndarray, gallery_ok: np.ndarray, how: str = "mean") -> np.ndarray:
    """Cosine scores (n_probes, N), fused over each probe's images by `how` ("mean" = mean embedding, which orders
    the gallery as the mean of cosines does; "max" = max of per-image cosines).

    Unreadable probe images (`probe_ok` False) are left out; a probe left with none scores 0 everywhere, so its
    ranking is gallery order. Unreadable gallery faces score -inf and rank last.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    keep = np.asarray(probe_ok, dtype=bool)
    has_image = np.bincount(owner[keep], minlength=n_probes) > 0
    scores = np.zeros((n_probes, len(gallery_feats)), dtype=np.float32)
    if has_image.any():
        remap = np.cumsum(has_image) - 1  # probes with images, renumbered 0..K-1
        sub_owner = remap[owner[keep]]
        k = int(has_image.sum())
        if how == "mean":
            scores[has_image] = cosine_scores(mean_embedding(probe_feats[keep], sub_owner, k), gallery_feats)
        else:
            scores[has_image] = aggregate(cosine_scores(probe_feats[keep], gallery_feats), sub_owner, k, how)
    if not has_image.all():
        log.warning("%d probe(s) have no readable image and are ranked in gallery order: %s",
                    int((~has_image).sum()), np.flatnonzero(~has_image)[:10].tolist())
    scores[:, ~np.asarray(gallery_ok, dtype=bool)] = -np.inf
    return scores


def score_split(split: Track3Split, feature: FeatureFn, how: str = "mean", skip_bad: bool = False) -> np.ndarray:
    """Extract features for a split's probe and gallery images and return its (P, N) score matrix."""
    paths, owner = split.probe_image_table()
    pf, pok = feature(paths, skip_bad)
    gf, gok = feature([g.path for g in split.gallery], skip_bad)
    return probe_scores(pf, pok, owner, len(split.probes), gf, gok, how)


@dataclass(frozen=True)
class SubmissionResult:
    csv_path: Path
    zip_path: Path
    ranking: np.ndarray
    scores: dict[str, Track3Scores]  # by AP variant; empty when the split is unlabelled


def submit(scores: np.ndarray, split: Track3Split, out_dir: str | Path, truth: Track3Split | None = None,
           zip_name: str = "submission.zip") -> SubmissionResult:
    """Rank, write and validate `predictions.csv` plus its zip, and score it when labels are known."""
    if scores.shape != (len(split.probes), len(split.gallery)):
        raise ValueError(f"score matrix {scores.shape} does not match {split.describe()}")
    ranking = rank_gallery(scores)
    out_dir = Path(out_dir)
    csv_path = write_predictions(ranking, out_dir / "predictions.csv", out_dir / zip_name)
    labels = truth if truth is not None else (split if split.labelled else None)
    results = {}
    if labels is not None:
        if (len(labels.probes), len(labels.gallery)) != scores.shape:
            raise ValueError(f"truth lists ({labels.describe()}) do not match the split ({split.describe()})")
        results = {ap: evaluate_ranking(ranking, labels.probe_fids, labels.gallery_fids, ap=ap)
                   for ap in ("standard", "trapezoid")}
    return SubmissionResult(csv_path, out_dir / zip_name, ranking, results)
