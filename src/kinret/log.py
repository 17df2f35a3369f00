"""One logging set-up for every entry point, and tqdm bars that stay quiet off a terminal or when asked."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in notebooks

T = TypeVar("T")
_QUIET = False


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Configure the root logger once for a command-line run; `quiet` also silences progress bars."""
    global _QUIET
    _QUIET = quiet
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap a long loop in a tqdm bar, shown on a terminal or in a notebook, unless quiet or `KINRET_NO_PROGRESS`
    is set (no bar in a log file or CI output)."""
    shown = sys.stderr.isatty() or "ipykernel" in sys.modules
    disable = _QUIET or bool(os.environ.get("KINRET_NO_PROGRESS")) or not shown
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False)
