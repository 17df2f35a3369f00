"""Figures of a data folder: counts of families, members and photos, and one family's photos as a grid (notebook 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from kinret.data.fiw import Family
from kinret.data.images import load_image
from kinret.plots import DPI


def dataset_summary(families: Sequence[Family]) -> dict[str, float]:
    """Counts of a family list: families, members, images; members per family and images per member."""
    members = [len(f.members) for f in families]
    images = [len(m.images) for f in families for m in f.members]
    return {"families": len(families), "members": int(sum(members)), "images": int(sum(images)),
            "members_per_family_min": int(min(members)), "members_per_family_median": float(np.median(members)),
            "members_per_family_max": int(max(members)), "images_per_member_min": int(min(images)),
            "images_per_member_median": float(np.median(images)), "images_per_member_max": int(max(images))}


def counts_figure(families: Sequence[Family], title: str = "") -> Figure:
    """Histograms of members per family and images per member."""
    fig = Figure(figsize=(9, 3.2), dpi=DPI, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    members = [len(f.members) for f in families]
    images = [len(m.images) for f in families for m in f.members]
    for ax, values, label in ((ax1, members, "members per family"), (ax2, images, "images per member")):
        lo, hi = min(values), max(values)
        ax.hist(values, bins=np.arange(lo - 0.5, hi + 1.5), color="#7570b3", edgecolor="white")
        ax.set_xlabel(label)
        ax.set_ylabel("count")
    fig.suptitle(title or f"{len(families)} families, {sum(members)} members, {sum(images)} images")
    return fig


def thumbnail(path: Path, size: int) -> np.ndarray:
    return np.asarray(load_image(path).resize((size, size), Image.BILINEAR))


def family_montage(family: Family, per_member: int = 5, thumb: int = 64) -> Figure:
    """One row per member of `family`, up to `per_member` of its photos."""
    rows, cols = len(family.members), max(1, min(per_member, max(len(m.images) for m in family.members)))
    fig = Figure(figsize=(1.0 * cols + 0.8, 1.0 * rows + 0.4), dpi=DPI, layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for r, member in enumerate(family.members):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(member.images):
                ax.imshow(thumbnail(member.images[c], thumb))
            if c == 0:
                ax.set_ylabel(member.mid, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"family {family.fid}: {len(family.members)} members, {family.n_images} photos", fontsize=10)
    return fig
