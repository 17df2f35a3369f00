"""Blending score matrices: per-probe normalisation (so variants on different scales can be summed) and the weighted
sum. Pure numpy (ranks from `kinret.metrics.ranks`); the weights come from `kinret.ensemble.selection`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kinret.metrics import ranks

NORMALISATIONS = ("z", "rank")


def normalise(scores: np.ndarray, how: str, block: int = 1 << 20) -> np.ndarray:
    """Per-probe (row) normalisation before blending: "z" = (s - row mean) / row std; "rank" = the face's place in
    the row's ascending order divided by N - 1 (ties share the lower place), so the best face gets 1. Each row on its
    own, so it runs on blocks of about `block` scores (the same numbers as on the whole matrix, a fraction of the
    float64 memory)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r}; choose one of {NORMALISATIONS}")
    scores = np.asarray(scores)
    out = np.empty(scores.shape, dtype=np.float32)
    rows = max(1, block // max(scores.shape[1], 1))
    for a in range(0, scores.shape[0], rows):
        out[a:a + rows] = _normalise(np.asarray(scores[a:a + rows], dtype=np.float64), how)
    return out


def _normalise(s: np.ndarray, how: str) -> np.ndarray:
    if how == "z":
        std = s.std(axis=1, keepdims=True)
        return ((s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)).astype(np.float32)
    places = ranks(s, "min") - 1  # ties share the lower place
    return (places / max(s.shape[1] - 1, 1)).astype(np.float32)


def blend(matrices: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of already-normalised score matrices."""
    out = np.zeros_like(matrices[0], dtype=np.float32)
    for m, w in zip(matrices, weights, strict=True):
        if w:
            out += np.float32(w) * m
    return out
