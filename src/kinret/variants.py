"""The splits every variant is scored on, the variants each source yields, and their score matrices, cached.

Splits: `oof{k}`, a Track-3 protocol drawn from fold k's held-out training families (scored by the fold-k model,
which never saw them, and embedded by it alone: a fold model embeds only its own held-out images), `val` when
DATA/val exists, and `test`. A variant with fold models is scored on val and test by each fold model and the
matrices averaged, as the paper did.

Score matrices go to ``{scores_dir}/{variant}/{split}.npy`` with ids beside them (see `kinret.scores`); the cache key
stored with them covers the variant, its sources' content and the split's ids, so a stale matrix is never reused.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .data import ImageTable
from .ensemble import safe_name
from .errors import KinretInputError
from .fiw import family_folds, read_fiw
from .log import progress
from .ranking import aggregate
from .scores import (
    COSINE_AGGREGATIONS,
    FC_AGGREGATIONS,
    cosine_variant,
    fc_matrix,
    fc_variant,
    ids_digest,
    load_scores,
    rerank,
    save_scores,
    stored_key,
)
from .sources import ImageSet
from .split import Track3Split, build_protocol, read_codalab, read_labelled

log = logging.getLogger(__name__)
SCORE_CODE_VERSION = 1  # bump when a similarity's formula changes


@dataclass(frozen=True)
class SplitData:
    """One split, located in its image set: probe image rows, their owners, gallery rows; and its ids and labels."""

    name: str
    split: Track3Split
    images: ImageSet
    probe_rows: np.ndarray
    owner: np.ndarray
    gallery_rows: np.ndarray
    labels: Track3Split | None  # the split itself when labelled, the test truth for the test split, else None

    @property
    def probe_ids(self) -> list[str]:
        return [p.ref for p in self.split.probes]

    @property
    def gallery_ids(self) -> list[str]:
        return [g.ref for g in self.split.gallery]

    @property
    def fold(self) -> int | None:
        m = re.fullmatch(r"oof(\d+)", self.name)
        return int(m.group(1)) if m else None


def _image_set(label: str, paths: Sequence[Path], root: Path) -> ImageSet:
    def rel(p: Path) -> str:
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return str(p)

    return ImageSet(label, tuple(paths), tuple(rel(p) for p in paths))


def _locate(name: str, split: Track3Split, images: ImageSet, labels: Track3Split | None) -> SplitData:
    row_of = {p.resolve(): i for i, p in enumerate(images.paths)}
    paths, owner = split.probe_image_table()
    try:
        prow = np.array([row_of[p.resolve()] for p in paths])
        grow = np.array([row_of[g.path.resolve()] for g in split.gallery])
    except KeyError as exc:
        raise KinretInputError(exc.args[0], f"listed in split {name!r} but not among its {images.label} images"
                               ) from None
    return SplitData(name, split, images, prow, owner, grow, labels)


def _own_images(label: str, split: Track3Split, root: Path) -> ImageSet:
    paths = list(dict.fromkeys(split.probe_image_table()[0] + [g.path for g in split.gallery]))
    return _image_set(label, paths, root)


def read_val(val_dir: Path, seed: int) -> Track3Split | None:
    """DATA/val as a labelled split: its probe_list.csv/gallery_list.csv when present, else a protocol drawn from
    its family folders (seeded)."""
    if not val_dir.is_dir():
        return None
    if (val_dir / "probe_list.csv").is_file() and (val_dir / "gallery_list.csv").is_file():
        return read_labelled(val_dir / "probe_list.csv", val_dir / "gallery_list.csv", val_dir, name="val")
    return build_protocol(read_fiw(val_dir), val_dir, seed=seed, name="val")[0]


def read_test(root: Path) -> tuple[Track3Split, Track3Split | None]:
    """The Codalab test split and, when DATA/test_truth holds its lists, its labels (row counts checked)."""
    test = read_codalab(root / "test", name="test")
    truth_dir = root / "test_truth"
    if not (truth_dir / "probe_list.csv").is_file():
        return test, None
    truth = read_labelled(truth_dir / "probe_list.csv", truth_dir / "gallery_list.csv", None, name="test truth")
    for kind, n_truth, n_test in (("probe", len(truth.probes), len(test.probes)),
                                  ("gallery", len(truth.gallery), len(test.gallery))):
        if n_truth != n_test:
            raise KinretInputError(truth_dir / f"{kind}_list.csv", f"has {n_truth} rows but the test split has "
                                                                  f"{n_test} {kind} entries")
    return test, truth


def build_splits(root: str | Path, n_folds: int, fold_seed: int = 0, seed: int = 0) -> dict[str, SplitData]:
    """oof0..oof{n_folds-1} (when DATA/train exists), val (when DATA/val exists) and test, in that order.

    `n_folds` 0 means the trainer's default (fewer on a folder with fewer families). The folds are the trainer's
    (`family_folds(families, n_folds, fold_seed)`) and the train image set is the trainer's table (families in id
    order), so a fold model is only ever scored on families it never saw."""
    root = Path(root)
    out: dict[str, SplitData] = {}
    if (root / "train").is_dir():
        families = sorted(read_fiw(root / "train"), key=lambda f: f.fid)
        if n_folds == 0:  # no fold models to respect: the trainer's default, or fewer on a small folder
            n_folds = min(TrainConfig.n_folds, len(families))
    if (root / "train").is_dir() and n_folds > 1:
        train = _image_set("train", ImageTable.from_families(families).paths, root)
        position = {p.resolve(): i for i, p in enumerate(train.paths)}
        folds = family_folds(families, n_folds, fold_seed)
        for k in range(n_folds):
            held = [f for f in families if folds[f.fid] == k and sum(1 for m in f.members if m.images) >= 2]
            if not held:
                log.warning("fold %d has no family with two members: no out-of-fold split for it", k)
                continue
            split = build_protocol(held, root / "train", seed=seed, name=f"oof{k}")[0]
            own = _own_images(f"oof{k}", split, root)
            own = replace(own, parent=train, rows=tuple(position[p.resolve()] for p in own.paths))
            out[f"oof{k}"] = _locate(f"oof{k}", split, own, split)
    val = read_val(root / "val", seed)
    if val is not None:
        out["val"] = _locate("val", val, _own_images("val", val, root), val)
    test, truth = read_test(root)
    out["test"] = _locate("test", test, _own_images("test", test, root), truth)
    return out


# ---- variants -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Similarity:
    """How one variant turns a source's embeddings into scores: kind cos | fc | rerank, on embedding `emb`."""

    kind: str
    emb: str
    agg: str
    top_n: int = 0

    @property
    def label(self) -> str:
        if self.kind == "rerank":
            return f"rerank{self.top_n}-{self.emb}"
        return f"{self.kind}-{self.emb}-{self.agg}" if self.kind == "cos" else f"fc-{self.agg}"


def similarities(emb_names: Sequence[str], has_fc: bool, top_n: int = 100) -> list[Similarity]:
    """Cosine per embedding and aggregation; with a trained pair head, FC per aggregation and the FC re-rank of the
    cosine shortlist of the model's embedding."""
    out = [Similarity("cos", e, a) for e in emb_names for a in COSINE_AGGREGATIONS]
    if has_fc:
        out += [Similarity("fc", "emb", a) for a in FC_AGGREGATIONS]
        out.append(Similarity("rerank", "emb", "mean", top_n))
    return out


@dataclass
class Group:
    """Variants that share their sources: `sources` maps a fold to its model (None: one source for every split,
    e.g. a training-free feature); `scores_dir` set means precomputed external matrices (one variant)."""

    name: str
    sims: list[Similarity]
    sources: dict[int | None, object] = field(default_factory=dict)
    scores_dir: Path | None = None

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
                raise FileNotFoundError(f"{self.name}: no fold-{sd.fold} model for the out-of-fold split {sd.name}")
            return [self.sources[sd.fold]]
        return [self.sources[k] for k in sorted(self.sources)]


def _score_one(source, sims: list[Similarity], sd: SplitData) -> dict[Similarity, np.ndarray]:
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

    out = {}
    for sim in sims:
        pe, ge = emb[sim.emb][sd.probe_rows], emb[sim.emb][sd.gallery_rows]
        if sim.kind == "cos":
            out[sim] = cosine_variant(pe, sd.owner, n, ge, sim.agg)
        elif sim.kind == "fc":
            out[sim] = fc(sim.emb, sim.agg)
        else:
            out[sim] = rerank(cosine_variant(pe, sd.owner, n, ge, "meanemb"), fc(sim.emb, sim.agg), sim.top_n)
    return out


def group_key(group: Group, sim: Similarity, sd: SplitData) -> str:
    parts = [SCORE_CODE_VERSION, sim, ids_digest(sd.probe_ids, sd.gallery_ids)]
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
        for source in progress(sources, desc=f"score {group.name} {sd.name}", total=len(sources)):
            for sim, s in _score_one(source, todo, sd).items():
                total[sim] = s if sim not in total else total[sim] + s
        for sim in todo:
            scores = total[sim] / np.float32(len(sources))
            save_scores(paths[sim], scores, sd.probe_ids, sd.gallery_ids, keys[sim])
            out[group.variant(sim)] = scores
    return {v: out[v] for v in group.variants}
