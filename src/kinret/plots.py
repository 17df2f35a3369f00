"""Figures as PNG: every figure of the kit is a `matplotlib.figure.Figure` built without pyplot, so the same function
draws inline in a notebook and into a PNG from a headless run (no global backend is touched). Photo grids are
palette-encoded when their plain PNG is large, so a notebook's stored outputs stay small; the colours the figures
share are named here."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from kinret.io import atomic_path

KIN, NON_KIN = "#1b9e77", "#d95f02"  # colour-blind safe pair, used for kin / relatives and non-kin throughout
DPI = 90
PNG_BUDGET = 120 * 1024  # PNGs over this are palette-encoded (the notebooks' limit is 200 KiB a plot)


def png_bytes(fig: Figure, budget: int = PNG_BUDGET) -> bytes:
    """`fig` as PNG; one over `budget` bytes (a grid of photos) is re-encoded with a 256-colour palette."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    if len(data) > budget:
        img = Image.open(io.BytesIO(data)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        img.save(buf, format="png", optimize=True)
        data = min(data, buf.getvalue(), key=len)
    return data


class PNG(bytes):
    """PNG bytes that a notebook displays as the image (photo grids inline far larger as matplotlib's own PNG)."""

    def _repr_png_(self) -> bytes:
        return bytes(self)

    def __repr__(self) -> str:  # the text a notebook stores beside the image, not the bytes themselves
        return f"<PNG image, {len(self) / 1024:.0f} KiB>"


def png(fig: Figure) -> PNG:
    """`fig` as a compact PNG for display: `png(family_montage(family))`."""
    return PNG(png_bytes(fig))


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render `fig` to PNG in memory (see `png_bytes`), then write it atomically."""
    data = png_bytes(fig)
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(data)
    return Path(path)
