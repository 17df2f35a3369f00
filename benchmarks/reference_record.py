"""Write the kit's reference record (`src/kinret/submission/reference_record.json`) from a default run: what its
stages recorded in ``runs/throughput.json`` (seconds, units of work, bytes written), with the run's date, cores, load
and command from ``submissions/synthetic/run.json``. The dry run scales it by image counts until a machine has a
record of its own, and names where it comes from.

    python make_submission.py                                    # the default run, from a fresh folder
    python benchmarks/reference_record.py --run .                # print
    python benchmarks/reference_record.py --run . --write        # replace the kit's reference
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kinret.io import write_text_atomic
from kinret.submission.estimate import RECORD_FILE, REFERENCE


def reference(run_dir: Path) -> dict:
    record = json.loads((run_dir / "runs" / RECORD_FILE).read_text())
    run = json.loads((run_dir / "submissions" / "synthetic" / "run.json").read_text())
    load = run.get("load_average") or [None]
    about = {"what": f"the default run (`python {' '.join(run['command'])}` from a fresh folder)",
             "date": run["date"][:10], "cores": run["cores"], "load": load[0], "seconds": run["seconds"]}
    return {"about": about, "stages": record["stages"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the folder the default run ran in")
    p.add_argument("--write", action="store_true", help=f"replace {REFERENCE}")
    args = p.parse_args(argv)
    text = json.dumps(reference(args.run), indent=1, sort_keys=True) + "\n"
    if args.write:
        write_text_atomic(REFERENCE, text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
