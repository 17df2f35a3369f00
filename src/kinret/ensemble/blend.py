"""Blending score matrices: per-probe normalisation (so variants on different scales can be summed) and the weighted
sum. Pure numpy/scipy; the weights come from `kinret.ensemble.selection`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

NORMALISATIONS = ("z", "rank")


def normalise(scores: np.ndarray, how: str) -> np.ndarray:
    """Per-probe (row) normalisation before blending: "z" = (s - row mean) / row std; "rank" = the face's place in
    the row's ascending order divided by N - 1 (ties share the lower place), so the best face gets 1."""
    s = np.asarray(scores, dtype=np.float64)
    if how == "z":
        std = s.std(axis=1, keepdims=True)
        return ((s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)).astype(np.float32)
    if how == "rank":
        places = rankdata(s, method="min", axis=1) - 1  # ties share the lower place
        return (places / max(s.shape[1] - 1, 1)).astype(np.float32)
    raise ValueError(f"unknown normalisation {how!r}; choose one of {NORMALISATIONS}")


def blend(matrices: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of already-normalised score matrices."""
    out = np.zeros_like(matrices[0], dtype=np.float32)
    for m, w in zip(matrices, weights, strict=True):
        if w:
            out += np.float32(w) * m
    return out
