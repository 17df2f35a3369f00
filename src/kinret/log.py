"""One logging set-up for every entry point; progress that is visible in every mode; stage timing.

Progress: a tqdm bar with its ETA on a terminal or in a notebook; when output goes to a file or a pipe (``nohup``,
CI), a plain line with the count, the rate and the ETA once a loop has run a few seconds and then at least once a
minute (``KINRET_PROGRESS_SECONDS``), even while one slow item runs, so a long run is never silent. ``--quiet``
(warnings and the final summary) and ``KINRET_NO_PROGRESS`` turn both off.
Stages: `stage("features", "9,948 images")` prints a start line with its size and an end line with its wall time,
and `stage_times()` gives them all for a closing line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in notebooks

T = TypeVar("T")
_QUIET = False
_STAGES: list[tuple[str, float]] = []
log = logging.getLogger("kinret.progress")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Configure the root logger once for a command-line run; `quiet` also silences progress and stage lines."""
    global _QUIET
    _QUIET = quiet
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # in a log file, printed lines keep their place among logged ones
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)


def _on_screen() -> bool:
    return sys.stderr.isatty() or _in_notebook()


def _in_notebook() -> bool:
    """Whether this process is a notebook's kernel (not merely one that imported ipykernel, as a test run may)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def minutes(seconds: float) -> str:
    """12 s, 3.4 min or 2.1 h: a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


FIRST_LINE = 5.0  # seconds: a loop still running this long shows its first line then, not a whole period later


class PlainProgress:
    """The file/pipe form of a progress bar: a line with the ETA once the loop has run `FIRST_LINE` seconds (or
    `every`, if shorter), then at least every `every` seconds, from a watcher thread while one slow item runs; and an
    end line with the wall time when the loop took longer than `every`. A short loop stays silent. Only the outermost
    loop is watched: a loop inside it (one chunk's batches) reports as it goes, as before."""

    _depth = 0  # plain-progress loops running now, nested

    def __init__(self, iterable: Iterable[T], desc: str, total: int | None, unit: str, every: float):
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.done, self.last = 0, 0.0

    def line(self, done: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        if self.total and done and rate > 0:
            text += f", {rate:.2f}" if rate < 10 else f", {rate:,.0f}"
            text += f" {self.unit}/s, ETA {minutes((self.total - done) / rate)}"
        return text

    def _report(self, start: float) -> None:
        now = time.monotonic()
        self.last = now
        log.info("%s", self.line(self.done, now - start))

    def _watch(self, start: float, stop: threading.Event) -> None:
        """Report when the loop has run `FIRST_LINE` s without a line, then before `every` s pass without one (a
        check every `every` / 12 s: a line at most `every` s after the last)."""
        if not stop.wait(min(FIRST_LINE, self.every)) and self.last == start:
            self._report(start)
        tick = max(self.every / 12, 0.05)
        while not stop.wait(tick):
            if time.monotonic() - self.last >= self.every - tick:
                self._report(start)

    def __iter__(self) -> Iterator[T]:
        start = self.last = time.monotonic()
        # the start line is for --verbose: stages announce themselves, and a short inner loop would repeat it per batch
        log.debug("%s: %s %s to do", self.desc, self.total if self.total is not None else "?", self.unit)
        stop = threading.Event()
        if PlainProgress._depth == 0 and self.every > 0:
            threading.Thread(target=self._watch, args=(start, stop), name="progress", daemon=True).start()
        PlainProgress._depth += 1
        try:
            for item in self.iterable:
                yield item
                self.done += 1
                if time.monotonic() - self.last >= self.every:
                    self._report(start)
        finally:
            stop.set()
            PlainProgress._depth -= 1
        if time.monotonic() - start >= self.every:
            log.info("%s: %d %s done in %s", self.desc, self.done, self.unit, minutes(time.monotonic() - start))


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap a long loop: a tqdm bar (with ETA) on a terminal or in a notebook, plain progress lines about once a
    minute in a log file or pipe; nothing when quiet or `KINRET_NO_PROGRESS` is set."""
    if _QUIET or os.environ.get("KINRET_NO_PROGRESS"):
        return iterable
    if _on_screen():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)
    return PlainProgress(iterable, desc, total, unit, float(os.environ.get("KINRET_PROGRESS_SECONDS", 60)))


@contextmanager
def stage(name: str, size: str = "") -> Iterator[None]:
    """Announce a stage with its size, then its wall time when it ends (also recorded for `stage_times`)."""
    t0 = time.perf_counter()
    if not _QUIET:
        print(f"[{time.strftime('%H:%M:%S')}] {name}" + (f": {size}" if size else ""), flush=True)
    yield
    took = time.perf_counter() - t0
    _STAGES.append((name, took))
    if not _QUIET:
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {minutes(took)}", flush=True)


def stage_times(reset: bool = False) -> list[tuple[str, float]]:
    """(stage, seconds) of every stage since the last reset, in order."""
    out = list(_STAGES)
    if reset:
        _STAGES.clear()
    return out
