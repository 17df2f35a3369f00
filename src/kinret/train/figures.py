"""Figures of training runs: learning curves from their `summary.csv`, and kin against non-kin scores as histograms
and ROC curves (notebook 2, and the submission report's histogram)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kinret.errors import KinretInputError
from kinret.metrics import roc_auc, roc_curve
from kinret.plots import DPI, KIN, NON_KIN
from kinret.readback import read_table
from kinret.train.checkpointing import SUMMARY_FIELDS, derived_state


def read_summary(path: str | Path) -> dict[str, np.ndarray]:
    """A run's `summary.csv` as columns of floats (NaN where a value is "nan"); a damaged one is written again from
    the run's checkpoint beside it (`derived_state`, one warning)."""
    path = Path(path)
    if not path.is_file():
        raise KinretInputError(path, "does not exist: train the run first")
    if (path.parent / "checkpoint.pt").is_file():
        derived_state(path.parent)
    frame = read_table(path, SUMMARY_FIELDS, numeric=True)
    if frame.empty:
        raise KinretInputError(path, "has no epoch rows")
    return {key: frame[key].to_numpy(dtype=float) for key in frame.columns}


def learning_curves(summaries: Mapping[str, str | Path]) -> Figure:
    """Train loss, held-out pair AUC and held-out Track-3 scores per epoch, one line per run."""
    fig = Figure(figsize=(11, 3.2), dpi=DPI, layout="constrained")
    ax_loss, ax_auc, ax_t3 = fig.subplots(1, 3)
    for label, path in summaries.items():
        s = read_summary(path)
        ep = s["epoch"]
        ax_loss.plot(ep, s["train_loss"], marker="o", label=label)
        ax_auc.plot(ep, s["pair_auc_cos"], marker="o", label=f"{label} cosine")
        if np.isfinite(s["pair_auc_fc"]).any():
            ax_auc.plot(ep, s["pair_auc_fc"], marker="s", ls="--", label=f"{label} FC head")
        ax_t3.plot(ep, s["average"], marker="o", label=f"{label} Average")
        ax_t3.plot(ep, s["mAP"], marker=".", ls=":", label=f"{label} mAP")
    ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":")
    for ax, title in ((ax_loss, "train loss"), (ax_auc, "held-out pair AUC"), (ax_t3, "held-out Track-3 scores")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return fig


def score_histogram(kin: np.ndarray, non_kin: np.ndarray, title: str = "", ax=None, bins: int = 50,
                    xlabel: str = "score") -> Figure:
    """Overlaid, density-normalised histograms of kin and non-kin scores, their AUC above, `xlabel` under them."""
    fig = None
    if ax is None:
        fig = Figure(figsize=(5.5, 3.4), dpi=DPI, layout="constrained")
        ax = fig.subplots()
    kin, non_kin = np.asarray(kin, np.float64).ravel(), np.asarray(non_kin, np.float64).ravel()
    both = np.concatenate([kin, non_kin])
    both = both[np.isfinite(both)]
    edges = np.linspace(both.min(), both.max(), bins + 1) if len(both) and both.min() < both.max() else bins
    auc = roc_auc(np.concatenate([kin, non_kin]), np.r_[np.ones(len(kin)), np.zeros(len(non_kin))])
    for values, colour, name in ((non_kin, NON_KIN, "non-kin"), (kin, KIN, "kin")):
        if len(values):  # a one-family protocol has no non-kin pair: nothing to draw, AUC undefined
            ax.hist(values, bins=edges, density=True, alpha=0.55, color=colour, label=f"{name} ({len(values):,})")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("density")
    ax.set_title(f"{title}{chr(10) if title else ''}kin vs non-kin AUC {auc:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    return fig if fig is not None else ax.figure


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """ROC curves of label -> (scores, labels), the AUC in each legend entry."""
    fig = Figure(figsize=(4.2, 4.0), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for label, (scores, labels) in curves.items():
        fpr, tpr = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{label}: AUC {roc_auc(scores, labels):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance: 0.5")
    ax.set_xlabel("false positive rate (non-kin pairs)")
    ax.set_ylabel("true positive rate (kin pairs)")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    return fig
