"""The training-free baseline feature: a small thumbnail of each image, centred and scaled to unit norm.

It maps a list of image paths to an (n, D) float32 matrix plus a boolean mask of the rows that could be computed
(False only for unreadable files when `skip_bad` is on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kinret.data.images import load_images
from kinret.log import progress


@dataclass(frozen=True)
class RawPixels:
    """A downsampled RGB thumbnail, each image centred and scaled to unit norm: cosine then equals the Pearson
    correlation of two thumbnails. The baseline every learned feature has to beat."""

    size: int = 32
    batch: int = 256

    @property
    def dim(self) -> int:
        return self.size * self.size * 3

    def __call__(self, paths: Sequence[Path], skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
        feats = np.zeros((len(paths), self.dim), dtype=np.float32)
        ok = np.ones(len(paths), dtype=bool)
        for start in progress(range(0, len(paths), self.batch), desc="raw pixels", unit="batch",
                              total=-(-len(paths) // self.batch)):
            arrays, _ = load_images(paths[start:start + self.batch], size=self.size, skip_bad=skip_bad)
            for k, arr in enumerate(arrays):
                if arr is None:
                    ok[start + k] = False
                    continue
                x = arr.astype(np.float32).ravel()
                x -= x.mean()
                feats[start + k] = x / max(float(np.linalg.norm(x)), 1e-6)
        return feats, ok
