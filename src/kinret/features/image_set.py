"""The images one split needs, as the embedding sources and the feeds take them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from kinret.data.pixels import file_list_digest


@dataclass(frozen=True)
class ImageSet:
    """The images one split needs ("oof0", "val", "test", ...). `ids` are the paths relative to the data root, as
    external files name images. An out-of-fold set is `rows` of its `parent`, every training image in the
    trainer's order, so a frozen network's outputs come from the one pass the trainer reads."""

    label: str
    paths: tuple[Path, ...]
    ids: tuple[str, ...]
    parent: ImageSet | None = None
    rows: tuple[int, ...] = ()

    @cached_property
    def digest(self) -> str:
        return file_list_digest(self.paths)

    @property
    def root(self) -> ImageSet:
        """The set whose images a frozen pass runs over: the parent of an out-of-fold set, else the set itself."""
        return self.parent or self

    def of_root(self, array: np.ndarray) -> np.ndarray:
        """This set's rows of a (V, N, ...) array over `root`'s images."""
        return array if self.parent is None else array[:, list(self.rows)]
