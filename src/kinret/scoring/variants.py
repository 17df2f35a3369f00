"""Variants and their cached score matrices: how a group of variants (one source, or one trained variant's fold
models) turns embeddings into scores on a split, and the matrices themselves, loaded when cached and fresh, else
computed and saved.

A variant with fold models is scored on an out-of-fold split by the fold model that never saw it, and on val and
test by every fold model, the matrices averaged, as the paper did. A transductive variant (kind "tr", a recipe of
`kinret.scoring.transductive.RESCORINGS` on the main embedding) re-scores the similarity the plain variant uses:
with K fold models that is the mean of their K cosines, which is exactly the cosine of the concatenated unit
vectors [x_1, .., x_K] / sqrt(K) (probe: each model's mean embedding; gallery: each model's embedding), so the
recipe runs once on those joint vectors, after the fold average. Re-scoring each fold model and averaging the
matrices would instead blur the orders the recipes produce (an identity-diverse head is an exact order, which a mean
of K matrices does not keep) and cluster the gallery K times. Score matrices go to
``{scores_dir}/{variant}/{split}.npy`` with ids beside them (see `kinret.scoring.store`); the cache key stored with
them covers the variant, its sources' content and the split's ids, so a stale matrix is never reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kinret.errors import KinretInputError
from kinret.log import progress
from kinret.scoring.similarity import (
    COSINE_AGGREGATIONS,
    FC_AGGREGATIONS,
    aggregate,
    cosine_variant,
    fc_matrix,
    fc_rerank,
    fc_variant,
    l2_normalize,
    mean_embedding,
)
from kinret.scoring.splits import SplitData
from kinret.scoring.store import ids_digest, load_scores, safe_name, save_scores, stored_key
from kinret.scoring.transductive import DEFAULT_RESCORINGS, RESCORE_CODE_VERSION, RESCORINGS, rescore

log = logging.getLogger(__name__)
SCORE_CODE_VERSION = 1  # bump when a similarity's formula changes


@dataclass(frozen=True)
class Similarity:
    """How one variant turns a source's embeddings into scores: kind cos | fc | rerank | tr, on embedding `emb`; for
    kind tr, `agg` names the re-scoring recipe in `RESCORINGS`."""

    kind: str
    emb: str
    agg: str
    top_n: int = 0

    @property
    def label(self) -> str:
        if self.kind == "rerank":
            return f"rerank{self.top_n}-{self.emb}"
        if self.kind == "tr":
            return f"{self.agg}-{self.emb}"
        return f"{self.kind}-{self.emb}-{self.agg}" if self.kind == "cos" else f"fc-{self.agg}"


def similarities(emb_names: Sequence[str], has_fc: bool, top_n: int = 100, fc_all: bool = False,
                 rescore_emb: str | None = None, every_rescoring: bool = False) -> list[Similarity]:
    """Cosine per embedding and aggregation; each re-scoring recipe of `RESCORINGS` on the cosine of `rescore_emb`
    (the source's main embedding), when given (the `DEFAULT_RESCORINGS`, or all with `every_rescoring`); with a
    trained pair head, the FC re-rank of the cosine shortlist of the model's embedding, and only with `fc_all` the
    FC head over every probe-photo x gallery pair per aggregation (it never beat the cosine of the same model and
    costs M x N head calls a split)."""
    out = [Similarity("cos", e, a) for e in emb_names for a in COSINE_AGGREGATIONS]
    if rescore_emb is not None:
        out += [Similarity("tr", rescore_emb, r) for r in (RESCORINGS if every_rescoring else DEFAULT_RESCORINGS)]
    if has_fc:
        if fc_all:
            out += [Similarity("fc", "emb", a) for a in FC_AGGREGATIONS]
        out.append(Similarity("rerank", "emb", "mean", top_n))
    return out


@dataclass
class Group:
    """Variants that share their sources: `sources` maps a fold to its model (None: one source for every split,
    e.g. a training-free feature); `scores_dir` set means precomputed external matrices (one variant);
    `on_request` are variants scored only when named (e.g. FC over all pairs), never listed in `variants`."""

    name: str
    sims: list[Similarity]
    sources: dict[int | None, object] = field(default_factory=dict)
    scores_dir: Path | None = None
    on_request: list[Similarity] = field(default_factory=list)

    def variant(self, sim: Similarity | None) -> str:
        return self.name if sim is None else f"{self.name}:{sim.label}"

    @property
    def variants(self) -> list[str]:
        return [self.name] if self.scores_dir is not None else [self.variant(s) for s in self.sims]

    def sources_for(self, sd: SplitData) -> list:
        if None in self.sources:
            return [self.sources[None]]
        if sd.fold is not None:
            if sd.fold not in self.sources:
                raise KinretInputError(None, f"{self.name}: no fold-{sd.fold} model for the out-of-fold split "
                                             f"{sd.name}")
            return [self.sources[sd.fold]]
        return [self.sources[k] for k in sorted(self.sources)]


def _score_one(source, sims: list[Similarity], sd: SplitData
               ) -> tuple[dict[Similarity, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """This source's matrix of every variant but the transductive ones, and for those, per embedding, the unit
    (probe mean embedding, gallery embedding) pair they re-score (see `joint_vectors`)."""
    emb = source.embeddings(sd.images)
    n = len(sd.split.probes)
    per_image: dict[str, np.ndarray] = {}  # the FC head over every probe-photo x gallery pair, computed once

    def fc(name: str, how: str) -> np.ndarray:
        pe, ge = emb[name][sd.probe_rows], emb[name][sd.gallery_rows]
        if how == "meanemb":
            return fc_variant(source.pair_fn, pe, sd.owner, n, ge, how)
        if name not in per_image:
            per_image[name] = fc_matrix(source.pair_fn, pe, ge)
        return aggregate(per_image[name], sd.owner, n, how)

    out, views = {}, {}
    for sim in sims:
        pe, ge = emb[sim.emb][sd.probe_rows], emb[sim.emb][sd.gallery_rows]
        if sim.kind == "cos":
            out[sim] = cosine_variant(pe, sd.owner, n, ge, sim.agg)
        elif sim.kind == "fc":
            out[sim] = fc(sim.emb, sim.agg)
        elif sim.kind == "rerank":
            out[sim] = fc_rerank(source.pair_fn, pe, sd.owner, n, ge, sim.top_n)
        elif sim.emb not in views:
            views[sim.emb] = (mean_embedding(pe, sd.owner, n), l2_normalize(ge))
    return out, views


def joint_vectors(views: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """K models' unit (probe, gallery) vectors concatenated and scaled by 1/sqrt(K): their cosine is the mean of the
    K models' cosines, the fold average every plain variant takes."""
    scale = np.float32(1.0 / np.sqrt(len(views)))
    return (np.hstack([q for q, _ in views]) * scale, np.hstack([g for _, g in views]) * scale)


def group_key(group: Group, sim: Similarity, sd: SplitData) -> str:
    parts = [SCORE_CODE_VERSION, sim, ids_digest(sd.probe_ids, sd.gallery_ids)]
    if sim.kind == "tr":  # the recipe's parameters and code: a changed recipe is a changed variant
        parts += [RESCORE_CODE_VERSION, RESCORINGS[sim.agg]]
    parts += [s.key(sd.images) for s in group.sources_for(sd)]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def missing_scores(group: Group, sd: SplitData, scores_dir: Path) -> list[str]:
    """The variants of `group` whose cached matrix for `sd` is absent or stale."""
    if group.scores_dir is not None:
        return []
    return [group.variant(s) for s in group.sims
            if stored_key(Path(scores_dir) / safe_name(group.variant(s)) / f"{sd.name}.npy") != group_key(group, s, sd)]


def group_scores(group: Group, sd: SplitData, scores_dir: Path) -> dict[str, np.ndarray]:
    """{variant: (P, N) scores} of every variant of `group` on split `sd`: loaded when cached and fresh, else
    computed (fold models averaged) and saved."""
    if group.scores_dir is not None:
        path = group.scores_dir / f"{sd.name}.npy"
        return {group.name: load_scores(path, sd.probe_ids, sd.gallery_ids)}
    paths = {s: Path(scores_dir) / safe_name(group.variant(s)) / f"{sd.name}.npy" for s in group.sims}
    keys = {s: group_key(group, s, sd) for s in group.sims}
    todo = [s for s in group.sims if stored_key(paths[s]) != keys[s]]
    out = {group.variant(s): load_scores(paths[s], sd.probe_ids, sd.gallery_ids) for s in group.sims if s not in todo}
    if todo:
        sources = group.sources_for(sd)
        total: dict[Similarity, np.ndarray] = {}
        views: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for source in progress(sources, desc=f"score {group.name} {sd.name}", total=len(sources)):
            mats, source_views = _score_one(source, todo, sd)
            for sim, s in mats.items():
                total[sim] = s if sim not in total else total[sim] + s
            for emb, pair in source_views.items():
                views.setdefault(emb, []).append(pair)
        for sim in todo:
            if sim.kind == "tr":
                scores = rescore(*joint_vectors(views[sim.emb]), RESCORINGS[sim.agg])
            else:
                scores = total[sim] / np.float32(len(sources))
            save_scores(paths[sim], scores, sd.probe_ids, sd.gallery_ids, keys[sim])
            out[group.variant(sim)] = scores
    return {v: out[v] for v in group.variants}
