"""Groups of variants and their cached score matrices: a group holds the sources its variants share (one source, or
one trained variant's fold models) and the variants themselves (kinds of `kinret.scoring.variant_kinds`); its
matrices on a split are loaded when cached and fresh, else computed and saved.

A group with fold models is scored on an out-of-fold split by the fold model that never saw it, and on val and test
by every fold model, each kind reducing the fold models' parts (`VariantKind.reduce`). Score matrices go to
``{scores_dir}/{variant}/{split}.npy`` with ids beside them (see `kinret.scoring.store`); the cache key stored with
them covers the variant, its sources' content and the split's ids, so a stale matrix is never reused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kinret.errors import KinretInputError
from kinret.log import progress
from kinret.scoring.protocols import SplitData
from kinret.scoring.store import cached_scores, ids_digest, load_scores, safe_name, save_scores, stored_key
from kinret.scoring.variant_kinds import SourceScoring, VariantKind

log = logging.getLogger(__name__)
SCORE_CODE_VERSION = 1  # bump when a similarity's formula changes


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


def source_parts(source: Any, kinds: list[VariantKind], sd: SplitData) -> dict[VariantKind, Any]:
    """Each kind's part computed from one source's embeddings of split `sd`, shared work done once."""
    scoring = SourceScoring(source, sd)
    return {k: k.part(scoring) for k in kinds}


def group_key(group: Group, kind: VariantKind, sd: SplitData) -> str:
    """The cache key of `kind`'s matrix on `sd`: the score code, the variant, the split's ids and the sources."""
    parts = [SCORE_CODE_VERSION, kind.label, *kind.key_parts(), ids_digest(sd.probe_ids, sd.gallery_ids)]
    parts += [s.key(sd.images) for s in group.sources_for(sd)]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def missing_scores(group: Group, sd: SplitData, scores_dir: Path) -> list[str]:
    """The variants of `group` whose cached matrix for `sd` is absent or stale."""
    if group.scores_dir is not None:
        return []
    return [group.variant(k) for k in group.kinds
            if stored_key(Path(scores_dir) / safe_name(group.variant(k)) / f"{sd.name}.npy") != group_key(group, k, sd)]


def group_scores(group: Group, sd: SplitData, scores_dir: Path) -> dict[str, np.ndarray]:
    """{variant: (P, N) scores} of every variant of `group` on split `sd`: loaded when cached and fresh, else
    computed (each kind reducing its sources' parts) and saved."""
    if group.scores_dir is not None:
        path = group.scores_dir / f"{sd.name}.npy"
        return {group.name: load_scores(path, sd.probe_ids, sd.gallery_ids)}
    paths = {k: Path(scores_dir) / safe_name(group.variant(k)) / f"{sd.name}.npy" for k in group.kinds}
    keys = {k: group_key(group, k, sd) for k in group.kinds}
    fresh = [k for k in group.kinds if stored_key(paths[k]) == keys[k]]
    out = {group.variant(k): m for k in fresh if (m := cached_scores(paths[k], sd.probe_ids, sd.gallery_ids))
           is not None}  # a damaged matrix is computed again
    todo = [k for k in group.kinds if group.variant(k) not in out]
    if todo:
        sources = group.sources_for(sd)
        parts: dict[VariantKind, list] = {k: [] for k in todo}
        for source in progress(sources, desc=f"score {group.name} {sd.name}", total=len(sources)):
            for kind, part in source_parts(source, todo, sd).items():
                parts[kind].append(part)
        for kind in todo:
            scores = kind.reduce(parts[kind])
            save_scores(paths[kind], scores, sd.probe_ids, sd.gallery_ids, keys[kind])
            out[group.variant(kind)] = scores
    return {v: out[v] for v in group.variants}
