"""Image decoding with PIL to RGB, with errors that name the bad file."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kinret.errors import KinretInputError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully to an RGB image; a missing, empty, truncated or non-image file raises KinretInputError,
    and so does a decompression bomb (a header claiming more pixels than PIL's limit, refused before decoding)."""
    path = Path(path)
    if not path.is_file():
        raise KinretInputError(path, "image file is missing")
    if path.stat().st_size == 0:
        raise KinretInputError(path, "image file is empty")
    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte now: a truncated file fails here, not later in a worker
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise KinretInputError(path, f"cannot decode image ({exc.__class__.__name__}: {exc})") from exc


def load_images(paths: Sequence[Path], size: int | None = None, skip_bad: bool = False
                ) -> tuple[list[np.ndarray | None], list[Path]]:
    """Decode many images as uint8 HxWx3 arrays (resized to `size` when given).

    With `skip_bad`, a bad file yields None in its slot and is listed in the second return value (and logged);
    otherwise the first bad file raises.
    """
    arrays: list[np.ndarray | None] = []
    bad: list[Path] = []
    for p in paths:
        try:
            img = load_image(p)
        except KinretInputError as exc:
            if not skip_bad:
                raise
            log.warning("skipping bad image: %s", exc)
            bad.append(Path(p))
            arrays.append(None)
            continue
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.uint8))
    if bad:
        log.warning("skipped %d bad image(s) of %d", len(bad), len(paths))
    return arrays, bad
