"""The splits every variant is scored on, each located in the image set its embeddings come from.

`oof{k}`: a Track-3 protocol drawn from fold k's held-out training families (scored by the fold-k model, which
never saw them, and embedded by it alone: a fold model embeds only its own held-out images); `val` when DATA/val
exists; and `test` (with its truth when DATA/test_truth holds it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kinret.data.layout import DataLayout
from kinret.data.pixels import ImageTable
from kinret.data.track3 import Track3Split, build_protocol
from kinret.errors import KinretInputError
from kinret.features.sources import ImageSet
from kinret.models.config import TrainConfig

log = logging.getLogger(__name__)


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
        return oof_fold(self.name)


def _image_set(label: str, paths: Sequence[Path], root: Path) -> ImageSet:
    resolved_root = root.resolve()

    def rel(p: Path) -> str:
        if p.is_absolute() == root.is_absolute() and ".." not in p.parts:
            try:  # the readers give root/...: no need to ask the file system
                return p.relative_to(root).as_posix()
            except ValueError:
                pass
        try:
            return p.resolve().relative_to(resolved_root).as_posix()
        except ValueError:
            return str(p)

    return ImageSet(label, tuple(paths), tuple(rel(p) for p in paths))


def _resolver() -> Callable[[Path], Path]:
    """`Path.resolve`, asked of the file system once per path: building the splits looks each image up several
    times (95,000 calls for the real size's 25,568 photos; the splits took 5.0 s, now 2.3 s)."""
    seen: dict[Path, Path] = {}

    def resolve(p: Path) -> Path:
        if p not in seen:
            seen[p] = p.resolve()
        return seen[p]

    return resolve


def _locate(name: str, split: Track3Split, images: ImageSet, labels: Track3Split | None,
            resolve: Callable[[Path], Path]) -> SplitData:
    row_of = {resolve(p): i for i, p in enumerate(images.paths)}
    paths, owner = split.probe_image_table()
    try:
        prow = np.array([row_of[resolve(p)] for p in paths])
        grow = np.array([row_of[resolve(g.path)] for g in split.gallery])
    except KeyError as exc:
        raise KinretInputError(exc.args[0], f"listed in split {name!r} but not among its {images.label} images"
                               ) from None
    return SplitData(name, split, images, prow, owner, grow, labels)


def _own_images(label: str, split: Track3Split, root: Path) -> ImageSet:
    paths = list(dict.fromkeys(split.probe_image_table()[0] + [g.path for g in split.gallery]))
    return _image_set(label, paths, root)


def oof_fold(name: str) -> int | None:
    """k for an out-of-fold split's name "oof{k}", None for any other split."""
    m = re.fullmatch(r"oof(\d+)", name)
    return int(m.group(1)) if m else None


def split_group(name: str) -> str:
    """The group a split is pooled into in tables and choices: every out-of-fold protocol is "oof"."""
    return "oof" if oof_fold(name) is not None else name


def training_set(layout: DataLayout) -> ImageSet:
    """Every training image in the trainer's order (families in id order): the parent of the out-of-fold sets."""
    return _image_set("train", ImageTable.from_families(layout.train_families).paths, layout.root)


def oof_split(layout: DataLayout, n_folds: int, fold_seed: int, seed: int, k: int, train: ImageSet | None = None,
              resolve: Callable[[Path], Path] | None = None) -> SplitData | None:
    """oof{k}: the protocol drawn from fold k's held-out families that have two members with photos, located in the
    training set (`train`, built when not given); None (warned) when no family qualifies. The trainer draws the same
    one to evaluate its fold model, and embeds its images for the scorer (`kinret.train.trainer`)."""
    root, resolve = layout.root, resolve or _resolver()
    train = train or training_set(layout)
    held = [f for f in layout.fold_families(n_folds, fold_seed, k)[1] if sum(1 for m in f.members if m.images) >= 2]
    if not held:
        log.warning("fold %d has no family with two members: no out-of-fold split for it", k)
        return None
    split = build_protocol(held, layout.train, seed=seed, name=f"oof{k}")[0]
    own = _own_images(f"oof{k}", split, root)
    position = {resolve(p): i for i, p in enumerate(train.paths)}
    own = replace(own, parent=train, rows=tuple(position[resolve(p)] for p in own.paths))
    return _locate(f"oof{k}", split, own, split, resolve)


def build_splits(layout: DataLayout, n_folds: int, fold_seed: int = 0, seed: int = 0) -> dict[str, SplitData]:
    """oof0..oof{n_folds-1} (when DATA/train exists), val (when DATA/val exists) and test, in that order.

    `n_folds` 0 means the trainer's default (fewer on a folder with fewer families). The folds are the trainer's
    (`DataLayout.fold_families`) and the train image set is the trainer's table (families in id order), so a fold
    model is only ever scored on families it never saw."""
    root, resolve = layout.root, _resolver()
    out: dict[str, SplitData] = {}
    if layout.train is not None and n_folds == 0:  # no fold models to respect: the trainer's default, or fewer
        n_folds = min(TrainConfig.n_folds, len(layout.train_families))
    if layout.train is not None and n_folds > 1:
        train = training_set(layout)
        for k in range(n_folds):
            found = oof_split(layout, n_folds, fold_seed, seed, k, train, resolve)
            if found is not None:
                out[f"oof{k}"] = found
    val = layout.val_split(seed)
    if val is not None:
        out["val"] = _locate("val", val, _own_images("val", val, root), val, resolve)
    test = layout.test_split
    out["test"] = _locate("test", test, _own_images("test", test, root), layout.test_labels, resolve)
    return out
