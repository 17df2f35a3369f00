"""Kinds of similarity variant. Each kind is a frozen dataclass that owns its parameters, its name (`label`, and
`parse` back), what it computes from one source's embeddings on a split (`part`), how the parts of a group's sources
(K fold models) reduce to one (P, N) matrix (`reduce`), what its cache key adds (`key_parts`), and which of its
variants a group's sources offer and list (`offered`, `listed`). `KINDS` registers them; `parse_kind` reads any
kind's name back.

- `Cosine` (``cos-EMB-FUSION``): the cosine of embedding EMB, fused over a probe's photos by FUSION
  (`kinret.scoring.similarity.FUSIONS`);
- `Rescored` (``RECIPE-EMB``): a re-scoring recipe of `kinret.scoring.transductive.RESCORINGS` on the cosine of the
  source's main embedding;
- `FcAllPairs` (``fc-FUSION``): the trained FC pair head over every probe-photo x gallery pair, fused by FUSION;
- `FcRerank` (``rerankN-EMB``): the cosine top-N shortlist re-ordered by the FC pair head.

Fold models: a plain kind's matrix is the mean of the fold models' matrices, as the paper did. A re-scoring
re-scores the similarity the plain variant uses: with K fold models that is the mean of their K cosines, which is
exactly the cosine of the concatenated unit vectors [x_1, .., x_K] / sqrt(K) (probe: each model's mean embedding;
gallery: each model's embedding), so the recipe runs once on those joint vectors (`joint_vectors`). Re-scoring each
fold model and averaging the matrices would instead blur the orders the recipes produce (an identity-diverse head is
an exact order, which a mean of K matrices does not keep) and cluster the gallery K times.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kinret.errors import KinretInputError
from kinret.scoring.protocols import SplitData
from kinret.scoring.similarity import (
    EARLY_FUSION,
    FUSIONS,
    aggregate,
    check_fusion,
    cosine_variant,
    fc_matrix,
    fc_rerank,
    fc_variant,
    l2_normalize,
    mean_embedding,
)
from kinret.scoring.transductive import DEFAULT_RESCORINGS, RESCORINGS, rescore

PAIR_HEAD_EMB = "emb"  # the embedding a trained FC pair head compares


@dataclass(frozen=True)
class GroupSpec:
    """What a group's sources offer (embeddings, a main embedding to re-score, a trained FC pair head) and which of
    their variants a run lists; the others are scored only when named."""

    embs: tuple[str, ...]  # every embedding the cosine scores
    main: str | None = None  # the embedding the re-scorings re-score
    pair_head: bool = False  # the sources hold a trained FC pair head
    top_n: int = 100  # the cosine shortlist the FC head re-ranks
    fc_all: bool = False  # list the FC head over every probe-photo x gallery pair
    rescore_listed: bool = True  # list the default re-scorings


class SourceScoring:
    """One source's embeddings of a split's images (`names`: those the variants to compute compare; None: all), with
    what several variants of that source share (the FC head's per-image matrix, a re-scoring's unit vectors)
    computed once."""

    def __init__(self, source: Any, sd: SplitData, names: Collection[str] | None = None):
        self.source, self.sd = source, sd
        self.emb = source.embeddings(sd.images, names)
        self.n_probes = len(sd.split.probes)
        self._shared: dict[object, object] = {}

    def probe(self, emb: str) -> np.ndarray:
        return self.emb[emb][self.sd.probe_rows]

    def gallery(self, emb: str) -> np.ndarray:
        return self.emb[emb][self.sd.gallery_rows]

    def shared(self, key: object, compute: Callable[[], Any]) -> Any:
        """`compute()`, once per `key` for this source and split."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


def compared(kinds: Collection[VariantKind]) -> set[str]:
    """The embeddings `kinds` compare."""
    return {getattr(k, "emb", PAIR_HEAD_EMB) for k in kinds}


def _check_emb(emb: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_]+", emb):
        raise KinretInputError(None, f"embedding name {emb!r} must be letters, digits or _")


def _check_fusion(similarity: str, fusion: str) -> None:
    try:
        check_fusion(similarity, fusion)
    except ValueError as e:
        raise KinretInputError(None, str(e)) from None


class VariantKind:
    """A kind of variant; subclasses are frozen dataclasses and register in `KINDS`."""

    FORM: ClassVar[str]  # the shape of the kind's names, for error messages

    @property
    def label(self) -> str:
        raise NotImplementedError

    @classmethod
    def parse(cls, label: str) -> VariantKind | None:
        """The variant `label` names when it has this kind's form (an error when its parameters are bad), else None."""
        raise NotImplementedError

    @classmethod
    def offered(cls, spec: GroupSpec) -> list[VariantKind]:
        """Every variant of this kind a group's sources offer, in listing order."""
        raise NotImplementedError

    def listed(self, spec: GroupSpec) -> bool:
        """Whether a run lists this variant (else it is scored only when named)."""
        return True

    def key_parts(self) -> tuple:
        """What the score matrices' cache key adds beyond the label."""
        return ()

    def part(self, scoring: SourceScoring) -> Any:
        """This variant's part computed from one source's embeddings (see `reduce`)."""
        raise NotImplementedError

    def reduce(self, parts: Iterable[Any], shared: dict | None = None) -> np.ndarray:
        """The (P, N) scores from the parts of a group's sources, taken one at a time (a part may be a whole matrix):
        the mean of their matrices. `shared`, one dict for every kind of a group on one split, keeps what several
        kinds reduce alike."""
        total, count = None, 0
        for p in parts:
            total = p if total is None else np.add(total, p, out=total)
            count += 1
        return total / np.float32(count)


@dataclass(frozen=True)
class Cosine(VariantKind):
    emb: str
    fusion: str = EARLY_FUSION
    FORM: ClassVar[str] = f"cos-EMB-FUSION (FUSION: {', '.join(FUSIONS['cosine'])})"

    def __post_init__(self) -> None:
        _check_emb(self.emb)
        _check_fusion("cosine", self.fusion)

    @property
    def label(self) -> str:
        return f"cos-{self.emb}-{self.fusion}"

    @classmethod
    def parse(cls, label: str) -> Cosine | None:
        parts = label.split("-")
        return cls(parts[1], parts[2]) if len(parts) == 3 and parts[0] == "cos" else None

    @classmethod
    def offered(cls, spec: GroupSpec) -> list[Cosine]:
        return [cls(e, f) for e in spec.embs for f in FUSIONS["cosine"]]

    def part(self, scoring: SourceScoring) -> np.ndarray:
        sd = scoring.sd
        return cosine_variant(scoring.probe(self.emb), sd.owner, scoring.n_probes, scoring.gallery(self.emb),
                              self.fusion)


def joint_vectors(views: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """K models' unit (probe, gallery) vectors concatenated and scaled by 1/sqrt(K): their cosine is the mean of the
    K models' cosines, the fold average every plain variant takes."""
    scale = np.float32(1.0 / np.sqrt(len(views)))
    return (np.hstack([q for q, _ in views]) * scale, np.hstack([g for _, g in views]) * scale)


@dataclass(frozen=True)
class Rescored(VariantKind):
    recipe: str
    emb: str
    FORM: ClassVar[str] = f"RECIPE-EMB (RECIPE: {', '.join(RESCORINGS)})"

    def __post_init__(self) -> None:
        if self.recipe not in RESCORINGS:
            raise KinretInputError(None, f"unknown re-scoring {self.recipe!r}; choose one of {', '.join(RESCORINGS)}")
        _check_emb(self.emb)

    @property
    def label(self) -> str:
        return f"{self.recipe}-{self.emb}"

    @classmethod
    def parse(cls, label: str) -> Rescored | None:
        recipe, _, emb = label.rpartition("-")
        return cls(recipe, emb) if recipe in RESCORINGS else None

    @classmethod
    def offered(cls, spec: GroupSpec) -> list[Rescored]:
        return [cls(r, spec.main) for r in RESCORINGS] if spec.main is not None else []

    def listed(self, spec: GroupSpec) -> bool:
        return spec.rescore_listed and self.recipe in DEFAULT_RESCORINGS

    def key_parts(self) -> tuple:  # the recipe's parameters (its code is in every score key): a changed variant
        return (RESCORINGS[self.recipe],)

    def part(self, scoring: SourceScoring) -> tuple[np.ndarray, np.ndarray]:
        """The unit (probe mean embedding, gallery embedding) pair, shared by every recipe on this embedding."""
        return scoring.shared(("unit", self.emb), lambda: (
            mean_embedding(scoring.probe(self.emb), scoring.sd.owner, scoring.n_probes),
            l2_normalize(scoring.gallery(self.emb))))

    def reduce(self, parts: Iterable[tuple[np.ndarray, np.ndarray]], shared: dict | None = None) -> np.ndarray:
        """The recipe on the joint vectors; the recipes on one embedding share their neighbour lists, DBA and
        clusters through `shared`."""
        memo = None if shared is None else shared.setdefault(("rescore", self.emb), {})
        return rescore(*joint_vectors(list(parts)), RESCORINGS[self.recipe], memo)


@dataclass(frozen=True)
class FcAllPairs(VariantKind):
    fusion: str
    FORM: ClassVar[str] = f"fc-FUSION (FUSION: {', '.join(FUSIONS['fc'])})"

    def __post_init__(self) -> None:
        _check_fusion("fc", self.fusion)

    @property
    def label(self) -> str:
        return f"fc-{self.fusion}"

    @classmethod
    def parse(cls, label: str) -> FcAllPairs | None:
        kind, sep, fusion = label.partition("-")
        return cls(fusion) if kind == "fc" and sep else None

    @classmethod
    def offered(cls, spec: GroupSpec) -> list[FcAllPairs]:
        return [cls(f) for f in FUSIONS["fc"]] if spec.pair_head else []

    def listed(self, spec: GroupSpec) -> bool:
        return spec.fc_all

    def part(self, scoring: SourceScoring) -> np.ndarray:
        pe, ge, sd = scoring.probe(PAIR_HEAD_EMB), scoring.gallery(PAIR_HEAD_EMB), scoring.sd
        pair_fn = scoring.source.pair_fn
        if self.fusion == EARLY_FUSION:
            return fc_variant(pair_fn, pe, sd.owner, scoring.n_probes, ge, self.fusion)
        per_image = scoring.shared("fc_matrix", lambda: fc_matrix(pair_fn, pe, ge))  # shared by the late fusions
        return aggregate(per_image, sd.owner, scoring.n_probes, self.fusion)


@dataclass(frozen=True)
class FcRerank(VariantKind):
    top_n: int
    emb: str = PAIR_HEAD_EMB
    FORM: ClassVar[str] = "rerankN-EMB (N a positive shortlist size)"

    def __post_init__(self) -> None:
        if isinstance(self.top_n, bool) or not isinstance(self.top_n, int) or self.top_n < 1:
            raise KinretInputError(None, f"the re-ranked shortlist must be a positive number, not {self.top_n!r}")
        _check_emb(self.emb)

    @property
    def label(self) -> str:
        return f"rerank{self.top_n}-{self.emb}"

    @classmethod
    def parse(cls, label: str) -> FcRerank | None:
        m = re.fullmatch(r"rerank([1-9][0-9]*)-(.+)", label)
        return cls(int(m.group(1)), m.group(2)) if m else None

    @classmethod
    def offered(cls, spec: GroupSpec) -> list[FcRerank]:
        return [cls(spec.top_n)] if spec.pair_head else []

    def part(self, scoring: SourceScoring) -> np.ndarray:
        return fc_rerank(scoring.source.pair_fn, scoring.probe(self.emb), scoring.sd.owner, scoring.n_probes,
                         scoring.gallery(self.emb), self.top_n)


# Every kind, in the order a group lists its variants.
KINDS: tuple[type[VariantKind], ...] = (
    Cosine,
    Rescored,
    FcAllPairs,
    FcRerank,
)


def parse_kind(label: str) -> VariantKind:
    """The variant a kind's name (``cos-emb-meanemb``, ``dba10-native``, ``rerank100-emb``, ...) stands for."""
    for kind in KINDS:
        found = kind.parse(label)
        if found is not None:
            return found
    raise KinretInputError(None, f"unknown variant name {label!r}; a name is one of: "
                                 f"{'; '.join(k.FORM for k in KINDS)}")


def offered_variants(spec: GroupSpec) -> tuple[list[VariantKind], list[VariantKind]]:
    """(listed, on request): every variant a group's sources offer, split by whether a run lists it."""
    every = [v for kind in KINDS for v in kind.offered(spec)]
    return [v for v in every if v.listed(spec)], [v for v in every if not v.listed(spec)]
