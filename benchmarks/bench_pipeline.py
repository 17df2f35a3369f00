"""The whole default pipeline at a given size, cold: `make_submission.py` timed stage by stage, from empty caches.

Two sizes, side by side when run together:

- `default`: the embedded default exactly as a newcomer runs it (`python make_submission.py` in a fresh folder,
  the synthetic dataset generated on the way); target 2 minutes on 2 idle cores (issue 19), a warm rerun 15 s;
- `real`: a synthetic set of the real competition's size in the FIW layout (570 training families with about
  15,800 faces; 190 val families; 190 test probes with about 1,000 probe faces and 4,000 gallery faces), generated
  first (not timed as part of the pipeline), then `make_submission.py --data-root` on it with the default recipe;
  target 20 minutes on 2 idle cores.

Each size runs in its own scratch folder (`--workdir`, default a temporary folder, removed unless `--keep`), as a
fresh process with output to a file, the way `nohup` runs it. The stage lines that make_submission prints
(`[hh:mm:ss] stage ...` / `... done in ...`) are parsed into a table: each stage's wall time and the total, then a
warm rerun's total. Nothing is asserted; the targets are printed as met or MISSED.

    python benchmarks/bench_pipeline.py                      # both sizes (about 25 minutes on 2 cores)
    python benchmarks/bench_pipeline.py --sizes default      # the default only
    python benchmarks/bench_pipeline.py --sizes real --scale 0.1   # a tenth of the real size (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"default": 120.0, "real": 1200.0}
STAGE_END = re.compile(r"^\[\d\d:\d\d:\d\d\] (.+) done in (.+)$")
# the real competition: 571 train families, 15,845 faces (27.7 per family); test 190 probes, ~5.3 faces per probe
REAL = {"n_train": 570, "n_val": 190, "n_test": 190, "min_members": 3, "max_members": 9, "min_images": 2,
        "max_images": 7}


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def run_logged(cmd: list[str], cwd: Path, log_file: Path) -> tuple[int, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        code = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return code, time.perf_counter() - t0


def stage_rows(log_file: Path) -> list[tuple[str, float]]:
    rows = []
    for line in log_file.read_text().splitlines():
        m = STAGE_END.match(line)
        if m:
            rows.append((m.group(1), seconds(m.group(2))))
    return rows


def make_real_data(work: Path, scale: float) -> tuple[Path, float]:
    sizes = {k: max(4, round(v * scale)) if k.startswith("n_") else v for k, v in REAL.items()}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kinret.synth", "--root", str(work / "data"), "--no-report", *args],
                   check=True, cwd=work, env={**os.environ, "KINRET_NO_PROGRESS": "1"})
    return work / "data", time.perf_counter() - t0


def bench(size: str, work: Path, scale: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "make_submission.py")]
    generated = 0.0
    if size == "real":
        data, generated = make_real_data(work, scale)
        cmd += ["--data-root", str(data)]
    code, cold = run_logged(cmd, work, work / "cold.log")
    if code != 0:
        print((work / "cold.log").read_text()[-3000:])
        raise SystemExit(f"{size}: make_submission.py failed (exit {code}); log in {work / 'cold.log'}")
    _, warm = run_logged(cmd, work, work / "warm.log")
    return {"stages": stage_rows(work / "cold.log"), "cold": cold, "warm": warm, "generated": generated}


def report(size: str, scale: float, result: dict) -> None:
    label = size if size == "default" or scale == 1 else f"real x{scale:g}"
    print(f"\n{label}: make_submission.py from cold caches")
    if result["generated"]:
        print(f"  (dataset generated first in {result['generated']:.0f} s, not counted)")
    for name, secs in result["stages"]:
        print(f"  {name:<32} {secs:8.1f} s")
    target = TARGETS[size] * (scale if size == "real" else 1)
    verdict = "met" if result["cold"] <= target else "MISSED"
    print(f"  {'total (process wall time)':<32} {result['cold']:8.1f} s   target {target:.0f} s: {verdict}")
    if size == "default":
        print(f"  {'warm rerun':<32} {result['warm']:8.1f} s   target 15 s: "
              f"{'met' if result['warm'] <= 15 else 'MISSED'}")
    else:
        print(f"  {'warm rerun':<32} {result['warm']:8.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=("default", "real"), default=["default", "real"])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the real size (families) to generate")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, data, runs)")
    args = p.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="kinret_bench_pipeline_"))
    print(f"{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f} at the start; scratch {root}")
    try:
        for size in args.sizes:
            report(size, args.scale, bench(size, root / size, args.scale))
    finally:
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
