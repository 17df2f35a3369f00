"""The dry run's estimate of each stage's wall time and disk space, from what runs recorded.

Every stage of `make_submission.py` that did work records its wall time, its units of work and the bytes it left on
disk in ``throughput.json`` (in the runs root: ``runs/``, or ``--runs``; one record for the machine, shared by every
data set). A stage to come is estimated as its units times the recorded seconds and bytes per unit:

- ``data``: synthetic images generated; bytes: the data folder;
- ``features:NETWORK`` (``+prefixK``: the pass also kept the output of the first K units for a fine-tune): image views
  through the frozen network; bytes: the ``_cache/`` it wrote;
- ``train:EXPERIMENT``: its runs (head-only), or runs x training images x epochs (end to end); bytes per run;
- ``embed``: the image embeddings the scoring stage computes and caches (raw pixels, each trained model's on its
  image sets; a frozen network's come from its features), most of that stage's time; bytes: those caches and the
  tables; ``score``: score-matrix cells (probes x gallery faces, summed over the matrices built), bytes only;
- ``submit``: the test split's cells; bytes: the submission, its zip and the report.

Until a record exists on this machine, the kit's reference record is used (`REFERENCE`: what the default run
recorded on the kit's 2-core build machine, its date, cores and load beside it), scaled the same way, and the line
says so. A network or experiment that neither holds is estimated from a record of the same kind of run (same mode)
and called a guess, or, for an end-to-end run's checkpoints, from its network's size (4 bytes a parameter); its time is
then not estimated at all: the first run measures it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kinret.io import human_bytes, write_text_atomic
from kinret.log import minutes
from kinret.readback import DamagedFile, read_json, rebuilt

log = logging.getLogger("kinret.submission")
RECORD_FILE = "throughput.json"
REFERENCE = Path(__file__).with_name("reference_record.json")
UNITS = {"data": "images", "features": "views", "train": "units", "score": "cells", "embed": "images",
         "submit": "cells"}


def _entries(found: object) -> dict[str, dict]:
    """The well-formed entries of a record: positive units, non-negative seconds and bytes."""
    stages = found.get("stages", {}) if isinstance(found, dict) else {}
    out = {}
    for key, e in stages.items() if isinstance(stages, dict) else ():
        if (isinstance(e, dict) and all(isinstance(e.get(k), (int, float)) for k in ("units", "seconds", "bytes"))
                and e["units"] > 0 and e["seconds"] >= 0 and e["bytes"] >= 0):
            out[key] = e
    return out


def read_record(folder: Path | None) -> dict[str, dict]:
    """The stages recorded in `folder`'s ``throughput.json`` (the reference's with None). A damaged record is named
    in one warning and removed (the next stage that does work writes it again): the estimate goes on without it."""
    path = REFERENCE if folder is None else Path(folder) / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        return _entries(read_json(path, dict))
    except DamagedFile as exc:
        rebuilt(exc, "estimating without it; removed, the next stage that does work writes it again")
        if folder is not None:
            path.unlink(missing_ok=True)
        return {}


def reference_about() -> dict:
    """Where the reference record comes from: date, command, cores, load."""
    try:
        return json.loads(REFERENCE.read_text()).get("about", {})
    except (OSError, ValueError):
        return {}


def record(folder: Path, key: str, units: float, seconds: float, nbytes: float, timed: bool = True,
           **about: object) -> None:
    """Remember what a stage (or one network or experiment in it) did: `units` of work in `seconds`, leaving `nbytes`
    on disk; `about` says what it was (runs, network, mode). Nothing when there was no work or, for `timed` work, it
    took under half a second (too short to time)."""
    if units <= 0 or (timed and seconds < 0.5):
        return
    path = Path(folder) / RECORD_FILE
    stages = read_record(folder)  # a damaged record: named once, removed, written anew below
    stages[key] = {"units": units, "seconds": round(seconds, 3), "bytes": max(0.0, float(nbytes)), **about}
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"stages": stages}, indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Work:
    """`units` of the work a record `key` measures (its first part is the stage), named `label`, its size in words
    `shown`; `runs` for training (its bytes are per run); `like`: what kind of run it is, to find a record of the same
    kind when its own key has none (e.g. ``{"mode": "e2e", "network": "sface"}``); `size`: bytes a run leaves when
    nothing is recorded (an end-to-end run's checkpoint from its network's size), and how that was found."""

    key: str
    units: float
    label: str = ""
    runs: int = 0
    like: Mapping[str, object] = field(default_factory=dict)
    size: tuple[float, str] | None = None
    shown: str = ""  # the units in words ("4,707 images", "3 runs x 5,120 image passes")
    timed: bool = True  # False: bytes only, its time is part of another piece of work's

    @property
    def stage(self) -> str:
        return self.key.partition(":")[0]


@dataclass(frozen=True)
class Estimate:
    """One piece of work's estimate: seconds (None: not estimated) and bytes, and where the figures come from."""

    work: Work
    seconds: float | None
    nbytes: float
    basis: str


def _per_unit(work: Work, entry: dict) -> tuple[float, float]:
    """(seconds, bytes) of `work` at `entry`'s rates; a training entry's bytes are per run."""
    seconds = work.units * entry["seconds"] / entry["units"]
    if work.stage == "train" and entry.get("runs"):
        return seconds, work.runs * entry["bytes"] / entry["runs"]
    return seconds, work.units * entry["bytes"] / entry["units"]


def _passes(work: Work) -> list[tuple[list[str], bool]]:
    """The kinds of record `work` may be estimated from when its own key has none, closest first: (the fields that
    must match its `like`, whether the record's time applies too)."""
    like = work.like
    found = [(list(like), True)] if like else []  # the same kind of run: its time and bytes
    if "network" in like and len(like) > 1:  # the same network otherwise: a feature pass takes about as long
        found.append((["network", "mode"] if "mode" in like else ["network"], work.stage == "features"))
    if like and like.get("mode") != "e2e":  # another network's head runs or features: bytes only (an end-to-end
        found.append((["mode"] if "mode" in like else [], False))  # run's checkpoints follow its own network)
    return found


def _alike(work: Work, records: Sequence[tuple[str, dict[str, dict]]]) -> tuple[str, str, dict, bool] | None:
    """(record name, key, entry, whether its time applies) of the closest record of the same stage (`_passes`)."""
    for fields, timed in _passes(work):
        for name, entries in records:
            for key, e in entries.items():
                if key.partition(":")[0] == work.stage and all(e.get(f) == work.like.get(f) for f in fields):
                    return name, key, e, timed
    return None


def estimate(work: Work, here: dict[str, dict], reference: dict[str, dict]) -> Estimate:
    """`work` at the rates recorded here, else the reference's, else the closest record of the same stage (a guess,
    `_passes`), else its `size` (bytes only)."""
    for name, entries in (("measured here", here), ("the kit's reference run", reference)):
        if work.key in entries:
            seconds, nbytes = _per_unit(work, entries[work.key])
            return Estimate(work, seconds if work.timed else 0.0, nbytes, name)
    found = _alike(work, [("measured here", here), ("the kit's reference run", reference)])
    if found is not None:
        name, key, entry, timed = found
        seconds, nbytes = _per_unit(work, entry)
        return Estimate(work, seconds if timed else None, nbytes,
                        f"a guess: not measured yet, taken from {key} ({name})")
    if work.size is not None:
        return Estimate(work, None, work.runs * work.size[0] if work.runs else work.size[0],
                        f"a guess: not measured yet; {work.size[1]}")
    return Estimate(work, None, 0.0, "not measured yet: the first run measures it")


def estimates(record_dir: Path, work: Iterable[Work]) -> list[Estimate]:
    here, reference = read_record(record_dir), read_record(None)
    return [estimate(w, here, reference) for w in work if w.units > 0]


def estimate_lines(found: Sequence[Estimate]) -> list[str]:
    """One line per piece of work: its units, the time and bytes estimated and where they come from; then the total
    (what is not estimated said, not counted)."""
    lines, total, unknown = [], 0.0, []
    for e in found:
        w = e.work
        size = w.shown or f"{w.units:,.0f} {UNITS[w.stage]}"
        if e.seconds is None and w.timed:
            unknown.append(w.label or w.key)
        elif e.seconds is not None:
            total += e.seconds
        took = "(its time above)" if not w.timed else "time unknown" if e.seconds is None else f"~{minutes(e.seconds)}"
        lines.append(f"estimate {w.label or w.key:<24} {size:>28}: {took}, {human_bytes(e.nbytes)} ({e.basis})")
    if not lines:
        return ["estimate: nothing to build"]
    rest = f" + {', '.join(unknown)} (not measured)" if unknown else ""
    lines.append(f"estimate total ~{minutes(total)}{rest}")
    about = reference_about()
    if about and any("reference run" in e.basis for e in found):
        lines.append(f"(the kit's reference run: {about.get('what', 'the default run')}, {about.get('cores')} CPU "
                     f"cores, load {about.get('load')}, {about.get('date')}; a run here records this machine's own)")
    return lines


def bytes_by_stage(found: Sequence[Estimate]) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in found:
        out[e.work.stage] = out.get(e.work.stage, 0.0) + e.nbytes
    return out


