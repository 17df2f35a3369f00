"""Paired bootstrap of the Average over probes: is one variant's score really above another's, or within the noise of
~190 probes? Pure numpy.

The Average is linear in per-probe terms: Average = (mAP + Rank@5) / 2 = mean over probes of u_i with
u_i = (AP_i + hit5_i) / 2, hit5_i = 1 when probe i's first relative is in the top 5. A resample draws probes with
replacement; both variants are scored on the same draw (paired), so the difference of Average on resample b is
sum_i c_bi (u_ai - u_bi) / n, c_bi = how often probe i was drawn. All B resamples are one (B, n) count matrix times
the (n, V) matrix of differences. The interval is the percentile interval of the B differences.

Strata: on the out-of-fold protocols every probe belongs to one fold's protocol (its own gallery, its own size). The
pooled out-of-fold Average is a mean over a fixed number of probes from each fold, so resamples are drawn within
each fold (each fold keeps its probe count): the resampling then follows how the probes were sampled, and variation
between folds' galleries, which is not noise of the comparison, is not mixed in. With one stratum (val, test) it is
the plain bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

N_BOOT = 2000
LEVEL = 0.95


def average_terms(ap: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per-probe u_i = (AP_i + hit5_i) / 2, hit5_i = [first_i < 5] (`first` NaN: no relative, never a hit); the mean
    of u over probes is the Average (mAP + Rank@5) / 2."""
    first = np.asarray(first, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        hit5 = np.nan_to_num(first, nan=np.inf) < 5
    return (np.asarray(ap, dtype=np.float64) + hit5) / 2.0


def resample_counts(strata: Sequence, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) counts: entry (b, i) = how often probe i is drawn in resample b. Draws are made within each stratum
    (each keeps its size): one generator `np.random.default_rng(seed)`, strata in sorted order, for a stratum of
    n_s probes (in their order of appearance) `rng.integers(0, n_s, size=(n_boot, n_s))` positions."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(strata)), dtype=np.float64)
    offsets = np.arange(n_boot)[:, None]
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        n_s = len(members)
        draws = rng.integers(0, n_s, size=(n_boot, n_s))
        counts[:, members] = np.bincount((offsets * n_s + draws).ravel(), minlength=n_boot * n_s).reshape(n_boot, n_s)
    return counts


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The (lower, upper) percentile interval of `samples` along axis 0: quantiles (1 - level)/2 and (1 + level)/2
    (numpy's default linear interpolation)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def paired_differences(terms: np.ndarray, reference: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B, V) differences of Average, variant minus reference, on each resample: counts (B, n) @ (terms (n, V) -
    reference (n, 1)) / n. `terms` may be one (n,) column."""
    terms = np.asarray(terms, dtype=np.float64)
    diff = (terms if terms.ndim == 2 else terms[:, None]) - np.asarray(reference, dtype=np.float64)[:, None]
    return counts @ diff / counts.shape[1]


def paired_intervals(terms: np.ndarray, reference: np.ndarray, strata: Sequence, n_boot: int = N_BOOT,
                     seed: int = 0, level: float = LEVEL) -> pd.DataFrame:
    """For each column of `terms` (n probes x V variants, per-probe u) against `reference` (n,): the observed
    difference of Average (`delta`) and its paired-bootstrap percentile interval (`lo`, `hi`), one row per column."""
    terms = np.asarray(terms, dtype=np.float64)
    terms = terms if terms.ndim == 2 else terms[:, None]
    if terms.shape[0] != len(reference) or len(strata) != len(reference):
        raise ValueError(f"{terms.shape[0]} probe terms, {len(reference)} reference terms and {len(strata)} strata "
                         "must be equal in number")
    if terms.shape[0] == 0:
        raise ValueError("no probes to resample")
    lo, hi = percentile_interval(paired_differences(terms, reference, resample_counts(strata, n_boot, seed)), level)
    delta = terms.mean(axis=0) - np.mean(reference)
    return pd.DataFrame({"delta": delta, "lo": lo, "hi": hi})


def interval_of(a: pd.DataFrame, b: pd.DataFrame, strata: Sequence, n_boot: int = N_BOOT, seed: int = 0,
                level: float = LEVEL) -> dict[str, float]:
    """Average of per-probe results `a` minus that of `b` (the same probes, the same order; columns `ap`, `first`),
    with its paired-bootstrap interval: {"delta", "lo", "hi"}."""
    if len(a) != len(b):
        raise ValueError(f"paired results need the same probes: {len(a)} against {len(b)} rows")
    row = paired_intervals(average_terms(a["ap"], a["first"]), average_terms(b["ap"], b["first"]), strata, n_boot,
                           seed, level).iloc[0]
    return {k: float(row[k]) for k in ("delta", "lo", "hi")}


def excludes_zero(interval: dict[str, float]) -> bool:
    """True when the interval lies wholly above zero (a gain beyond the noise)."""
    return bool(interval["lo"] > 0)


def describe(interval: dict[str, float]) -> str:
    """"+0.012 [-0.010, +0.034]"."""
    return f"{interval['delta']:+.3f} [{interval['lo']:+.3f}, {interval['hi']:+.3f}]"
