"""What a `make_submission.py` run leaves beside its submission besides the files themselves: ``run.json`` (the
command, the machine's cores and load, the data, each split's size, the choice, every stage's wall time), read back
by `benchmarks/readme_figures.py` to write the README's figures; and the earlier zips of the kit, set aside so that
only the current one is in the out folder.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kinret.io import write_text_atomic
from kinret.readback import read_record

RUN_FILE = "run.json"
OLD_ZIPS = "old"  # where earlier zips of the kit go, inside the out folder
KIT_ZIP = re.compile(r"^(best|blend)_.+\.zip$")  # how the kit names a zip after its choice


def process_seconds() -> float | None:
    """Seconds since this process started (Python start-up and imports included), from /proc; None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError):
        return None


def run_record(argv: Sequence[str], data: dict, splits: dict[str, tuple[int, int]], choice: str, zip_path: Path,
               seconds: float, stages: Sequence[tuple[str, float]]) -> dict:
    """The facts of one run: when and where it ran, on what data, the splits' (probes, gallery faces), what it chose,
    its wall time (`seconds` in the stages' function, `process_seconds` from the start of the process) and each
    stage's wall time, in order."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": ["make_submission.py", *argv],
            "python": sys.version.split()[0], "cores": os.cpu_count(),
            "load_average": None if load is None else [round(x, 2) for x in load], "data": data,
            "splits": {name: {"probes": p, "gallery": n} for name, (p, n) in splits.items()}, "choice": choice,
            "zip": zip_path.name, "seconds": round(seconds, 2),
            "process_seconds": None if (ps := process_seconds()) is None else round(ps, 2),
            "stages": [[name, round(s, 2)] for name, s in stages]}


def write_run_record(out: Path, record: dict) -> Path:
    return write_text_atomic(Path(out) / RUN_FILE, json.dumps(record, indent=1) + "\n")


def read_run_record(out: Path) -> dict:
    """The last run's record in `out` (empty when there is none or it cannot be read)."""
    return read_record(Path(out) / RUN_FILE, "written again at the end of this run")


def set_aside_old_zips(out: Path, current: Path) -> list[Path]:
    """Move the kit's earlier zips out of `out` into `out/old/` (named after an earlier choice, or the zip the last
    run recorded), so that the folder holds one zip to upload: `current`. Returns where they went."""
    out = Path(out)
    earlier = {read_run_record(out).get("zip")} | {p.name for p in out.glob("*.zip") if KIT_ZIP.match(p.name)}
    moved = []
    for name in sorted(n for n in earlier if isinstance(n, str) and n and n != Path(current).name):
        if (out / name).is_file():
            (out / OLD_ZIPS).mkdir(exist_ok=True)
            os.replace(out / name, out / OLD_ZIPS / name)
            moved.append(out / OLD_ZIPS / name)
    return moved
