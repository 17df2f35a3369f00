"""Run the notebooks top to bottom, headless, in order (each may use what the one before built).

    python notebooks/execute.py              # run all, save their outputs in place (what is committed)
    python notebooks/execute.py --check      # run all without saving; fail on an error or an oversized plot
    python notebooks/execute.py --check --small --workdir DIR   # what the test suite runs: small data, small model

The working folder is the repository root (the notebooks' default); `KINRET_WORKDIR` / `--workdir` runs them
elsewhere, as the test suite does. `--small` sets the environment variables of `SMALL`, which the notebooks'
first cells read: `KINRET_SYNTH` (SynthConfig fields as JSON: a smaller synthetic set) and
`KINRET_NOTEBOOK_EXPERIMENT` (the experiment notebooks 2 and 3 train and score instead of `quick`). The committed
outputs are always a run without `--small`. Needs the dev requirements (nbclient, nbformat, ipykernel).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
PLOT_LIMIT = 200 * 1024  # bytes per image output
SMALL = {  # the notebooks on 20 small synthetic families with a seconds-long experiment (see quick_tiny.py)
    "KINRET_SYNTH": json.dumps({"seed": 3, "n_train": 12, "n_val": 4, "n_test": 4, "size": 48}),
    "KINRET_NOTEBOOK_EXPERIMENT": "quick_tiny",
}


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def image_sizes(nb: nbformat.NotebookNode) -> list[int]:
    """Decoded byte sizes of every image output."""
    return [len(base64.b64decode(data)) for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) for mime, data in out.get("data", {}).items()
            if mime.startswith("image/")]


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """These environment variables set for the block (the kernel inherits them), the previous values restored."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(path: Path, workdir: Path | None = None, timeout: int = 900, env: Mapping[str, str] | None = None
            ) -> tuple[nbformat.NotebookNode, float]:
    """Execute `path` in a fresh kernel (this interpreter's), with KINRET_WORKDIR set when `workdir` is given and
    the variables of `env` (e.g. `SMALL`) set; returns the notebook with its outputs and the seconds it took. A
    failing cell raises (nbclient's CellExecutionError names the cell and the traceback)."""
    nb = nbformat.read(path, as_version=4)
    values = {**(env or {}), **({"KINRET_WORKDIR": str(workdir)} if workdir is not None else {})}
    os.environ.setdefault("KINRET_NO_PROGRESS", "1")
    with environment(values):
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        return nb, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="do not save the outputs")
    p.add_argument("--workdir", type=Path, default=None, help="run in this folder instead of the repository root")
    p.add_argument("--small", action="store_true",
                   help="small data and the quick_tiny experiment, as the test suite runs them (with --check)")
    p.add_argument("names", nargs="*", help="only these notebooks (file names)")
    args = p.parse_args(argv)
    if args.small and not args.check:
        p.error("--small runs are never saved: add --check")
    for path in notebooks():
        if args.names and path.name not in args.names:
            continue
        nb, seconds = execute(path, args.workdir, env=SMALL if args.small else None)
        big = [s for s in image_sizes(nb) if s > PLOT_LIMIT]
        print(f"{path.name}: {seconds:.0f} s, {len(image_sizes(nb))} plots, largest "
              f"{max(image_sizes(nb), default=0) / 1024:.0f} KiB")
        if big:
            print(f"{path.name}: {len(big)} plot(s) over {PLOT_LIMIT // 1024} KiB", file=sys.stderr)
            return 1
        if not args.check:
            tmp = path.with_name(f".{path.name}.tmp")
            nbformat.write(nb, tmp)
            os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
