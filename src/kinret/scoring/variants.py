"""Groups of variants and their stored scores: a group holds the sources its variants share (one source, or one
trained variant's fold models) and the variants themselves (kinds of `kinret.scoring.variant_kinds`).

A group with fold models is scored on an out-of-fold split by the fold model that never saw it, and on val and test
by every fold model, each kind reducing the fold models' parts (`VariantKind.reduce`). A variant's matrix on a split
is computed, evaluated (its per-probe results, on a labelled split), written where something reads it back, and
released before the next variant's (`score_group`), so memory holds one matrix at a time whatever the number of
variants. What is kept (see `kinret.scoring.store`): every variant's per-probe results; the matrices of the splits
the choice is made on (a blend's weights are searched on their values); elsewhere only the matrices of the chosen
variants, as float16 when they are read back for their ranking alone and float16 ranks them alike. The cache key
stored with each covers the variant, its sources' content and the split's ids, so a stale one is never reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kinret.errors import KinretInputError
from kinret.scoring.protocols import SplitData
from kinret.scoring.ranking import float16_ranks_alike
from kinret.scoring.store import (
    cached_scores,
    ids_digest,
    load_results,
    load_scores,
    read_kept,
    safe_name,
    save_results,
    save_scores,
    stored_dtype,
    stored_key,
)
from kinret.scoring.variant_kinds import SourceScoring, VariantKind, compared
from kinret.versions import code_version

log = logging.getLogger(__name__)
Evaluate = Callable[[np.ndarray], pd.DataFrame]  # a matrix -> its per-probe results on a labelled split


def variant_name(group: str, kind: VariantKind | None) -> str:
    """A variant's full name: its group's name, and the kind's label after a colon (none for an external matrix)."""
    return group if kind is None else f"{group}:{kind.label}"


@dataclass
class Group:
    """Variants that share their sources: `sources` maps a fold to its model (None: one source for every split,
    e.g. a training-free feature); `scores_dir` set means precomputed external matrices (one variant);
    `on_request` are variants scored only when named (e.g. FC over all pairs), never listed in `variants`."""

    name: str
    kinds: list[VariantKind]
    sources: dict[int | None, object] = field(default_factory=dict)
    scores_dir: Path | None = None
    on_request: list[VariantKind] = field(default_factory=list)

    def variant(self, kind: VariantKind | None) -> str:
        return variant_name(self.name, kind)

    @property
    def variants(self) -> list[str]:
        return [self.name] if self.scores_dir is not None else [self.variant(k) for k in self.kinds]

    def sources_for(self, sd: SplitData) -> list:
        if None in self.sources:
            return [self.sources[None]]
        if sd.fold is not None:
            if sd.fold not in self.sources:
                raise KinretInputError(None, f"{self.name}: no fold-{sd.fold} model for the out-of-fold split "
                                             f"{sd.name}")
            return [self.sources[sd.fold]]
        return [self.sources[k] for k in sorted(self.sources)]


@dataclass(frozen=True)
class Keep:
    """Which matrices of a split are written to the store: `every` (a split the choice is made on, or a caller that
    wants them all), else those of the `variants` named; `ranks_only`, the variants read back for their ranking
    alone (stored as float16 when that ranks them alike); `scored`, the variants scored on a labelled split where
    not all are (`kinret.ensemble.settings.EnsembleSettings.score_others`; None: every variant); `combined`, the
    splits where the chosen blend is kept combined already (`kinret.ensemble.chosen.keep_blend`): its variants'
    matrices are not kept there."""

    every: bool = True
    variants: frozenset[str] = frozenset()
    ranks_only: frozenset[str] = frozenset()
    scored: frozenset[str] | None = None
    combined: frozenset[str] = frozenset()

    def __contains__(self, variant: str) -> bool:
        return self.every or variant in self.variants

    def wants(self, variant: str, split: str) -> bool:
        """Whether `variant`'s matrix on `split` is kept."""
        return self.every or (variant in self.variants and split not in self.combined)


def open_sources(group: Group, sd: SplitData) -> list[SourceScoring]:
    """Each source's embeddings of the split's images that the group's kinds compare, with what its variants share,
    for the kinds to compute."""
    names = compared(group.kinds)
    return [SourceScoring(source, sd, names) for source in group.sources_for(sd)]


def source_key(source: Any, images: Any) -> str:
    """`source.key(images)`, once per source object and image set (a source's content is fixed while it lives:
    a checkpoint's digest is taken once)."""
    digest = getattr(images, "digest", None)
    if digest is None:
        return source.key(images)
    memo = source.__dict__.setdefault("_keys", {})
    if digest not in memo:
        memo[digest] = source.key(images)
    return memo[digest]


def group_key(group: Group, kind: VariantKind, sd: SplitData) -> str:
    """The cache key of `kind`'s matrix on `sd`: the scoring code (`kinret.versions.code_version`), the variant, the
    split's ids and the sources."""
    parts = [code_version("kinret.scoring"), kind.label, *kind.key_parts(), ids_digest(sd.probe_ids, sd.gallery_ids)]
    parts += [source_key(s, sd.images) for s in group.sources_for(sd)]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def score_path(scores_dir: Path, group: Group, kind: VariantKind, sd: SplitData) -> Path:
    return Path(scores_dir) / safe_name(group.variant(kind)) / f"{sd.name}.npy"


def _fresh(path: Path, key: str, ranks_only: bool) -> bool:
    """Whether the matrix at `path` is stored under `key` in a form that serves: float32 always, float16 only for
    its ranking."""
    return stored_key(path) == key and (ranks_only or stored_dtype(path) == np.float32)


def stored_keep(scores_dir: Path, sd: SplitData) -> Keep:
    """What the store keeps of split `sd` by its record (`kinret.scoring.store.write_kept`): every matrix on a split
    the choice is made on, and wherever nothing was recorded yet; elsewhere the chosen variants'."""
    kept = read_kept(scores_dir)
    if kept is None or sd.name in kept["choose_on"]:
        return Keep()
    scored = kept["narrowed"].get(sd.name)
    return Keep(False, frozenset(kept["variants"]), frozenset(kept["ranks_only"]),
                None if scored is None else frozenset(scored))


def missing_scores(group: Group, sd: SplitData, scores_dir: Path, keep: Keep | None = None) -> list[str]:
    """The variants of `group` with something to build on `sd`: per-probe results on a labelled split (absent or
    stale), a matrix to keep (absent, stale, or float16 where its values are read). `keep`: what is kept of `sd`
    (default: as the store recorded, `stored_keep`)."""
    if group.scores_dir is not None:
        return []
    keep = stored_keep(scores_dir, sd) if keep is None else keep
    labelled = sd.labels is not None
    out = []
    for kind in group.kinds:
        v, path, key = group.variant(kind), score_path(scores_dir, group, kind, sd), group_key(group, kind, sd)
        evaluated = labelled and (keep.scored is None or v in keep.scored)
        if (keep.wants(v, sd.name) and not _fresh(path, key, v in keep.ranks_only)) or (
                evaluated and load_results(path, key, len(sd.probe_ids), len(sd.gallery_ids)) is None):
            out.append(v)
    return out


@dataclass
class _Scoring:
    """One group on one split while its kinds are scored: the sources opened once, on the first kind computed, and
    what its kinds share (`VariantKind.reduce`'s `shared`)."""

    group: Group
    sd: SplitData
    opened: list[SourceScoring] | None = None
    shared: dict = field(default_factory=dict)

    def compute(self, kind: VariantKind) -> np.ndarray:
        if self.opened is None:
            self.opened = open_sources(self.group, self.sd)
        return kind.reduce((kind.part(s) for s in self.opened), self.shared)


def score_group(group: Group, sd: SplitData, scores_dir: Path, evaluate: Evaluate | None = None,
                keep: Keep = Keep()) -> Iterator[tuple[str, pd.DataFrame | None]]:
    """(variant, its per-probe results on `sd`, None without `evaluate`) for every variant of `group`, one at a time:
    results and matrices stored fresh are read back; what is missing is computed from the sources, evaluated, its
    results and (when `keep` asks) its matrix written, and released before the next variant."""
    if group.scores_dir is not None:
        if evaluate is not None or group.name in keep:
            scores = load_scores(group.scores_dir / f"{sd.name}.npy", sd.probe_ids, sd.gallery_ids)
            yield group.name, evaluate(scores) if evaluate is not None else None
        return
    scoring = _Scoring(group, sd)
    for kind in group.kinds:
        v, path, key = group.variant(kind), score_path(scores_dir, group, kind, sd), group_key(group, kind, sd)
        results = load_results(path, key, len(sd.probe_ids), len(sd.gallery_ids)) if evaluate is not None else None
        want = keep.wants(v, sd.name)
        have = want and _fresh(path, key, v in keep.ranks_only)
        if (evaluate is None or results is not None) and (have or not want):
            yield v, results
            continue
        scores = cached_scores(path, sd.probe_ids, sd.gallery_ids) if have else None  # a damaged one: computed again
        if scores is None:
            scores, have = scoring.compute(kind), False
        if evaluate is not None and results is None:
            results = evaluate(scores)
            save_results(path, results, key)
        if want and not have:
            _keep_matrix(path, scores, sd, key, v in keep.ranks_only)
        del scores
        yield v, results


def variant_scores(group: Group, kind: VariantKind | None, sd: SplitData, scores_dir: Path) -> np.ndarray:
    """One variant's (P, N) scores on `sd`: read back when stored fresh (float16 too: its ranking is the same),
    else computed (not stored, but for a kept matrix found damaged, written again as it was kept)."""
    if group.scores_dir is not None:
        return load_scores(group.scores_dir / f"{sd.name}.npy", sd.probe_ids, sd.gallery_ids)
    path, key = score_path(scores_dir, group, kind, sd), group_key(group, kind, sd)
    stored = stored_key(path) == key
    found = cached_scores(path, sd.probe_ids, sd.gallery_ids) if stored else None
    if found is not None:
        return found
    scores = _Scoring(group, sd).compute(kind)
    if stored:  # a kept matrix found damaged: written again as it was kept
        keep = stored_keep(scores_dir, sd)
        if group.variant(kind) in keep:
            _keep_matrix(path, scores, sd, key, group.variant(kind) in keep.ranks_only)
    return scores


def _keep_matrix(path: Path, scores: np.ndarray, sd: SplitData, key: str, ranks_only: bool) -> None:
    """Store a kept matrix: as float16 when it is read back for its ranking alone and float16 ranks it alike."""
    half = ranks_only and float16_ranks_alike(scores)
    save_scores(path, scores, sd.probe_ids, sd.gallery_ids, key, np.float16 if half else np.float32)


def group_scores(group: Group, sd: SplitData, scores_dir: Path) -> dict[str, np.ndarray]:
    """{variant: (P, N) scores} of every variant of `group` on split `sd`: loaded when cached fresh as float32, else
    computed one kind at a time (each reducing its sources' parts) and saved."""
    if group.scores_dir is not None:
        return {group.name: load_scores(group.scores_dir / f"{sd.name}.npy", sd.probe_ids, sd.gallery_ids)}
    scoring, out = _Scoring(group, sd), {}
    for kind in group.kinds:
        path, key = score_path(scores_dir, group, kind, sd), group_key(group, kind, sd)
        found = cached_scores(path, sd.probe_ids, sd.gallery_ids) if _fresh(path, key, ranks_only=False) else None
        if found is not None:  # a damaged matrix is computed again
            out[group.variant(kind)] = found
        else:
            out[group.variant(kind)] = scores = scoring.compute(kind)
            save_scores(path, scores, sd.probe_ids, sd.gallery_ids, key)
    return out


class SplitScores(Mapping):
    """variant -> its (P, N) scores on one split, read (or computed) when asked for and never held: iterating
    costs nothing, and each lookup reads the matrix again (`variant_scores`)."""

    def __init__(self, groups: Collection[Group], sd: SplitData, scores_dir: Path):
        self.sd, self.scores_dir = sd, Path(scores_dir)
        self._where: dict[str, tuple[Group, VariantKind | None]] = {}
        for g in groups:
            if g.scores_dir is not None:
                self._where[g.name] = (g, None)
            else:
                self._where.update({g.variant(k): (g, k) for k in g.kinds})

    def __getitem__(self, variant: str) -> np.ndarray:
        group, kind = self._where[variant]
        return variant_scores(group, kind, self.sd, self.scores_dir)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, variant: object) -> bool:  # without reading the matrix, as Mapping's would
        return variant in self._where

    def __len__(self) -> int:
        return len(self._where)

    def where(self, variant: str) -> tuple[Group, Any]:
        return self._where[variant]
