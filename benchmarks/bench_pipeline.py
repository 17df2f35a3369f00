"""The whole default pipeline at a given size, cold: `make_submission.py` timed stage by stage, from empty caches,
with its peak memory, the disk it leaves, and the longest stretch without a line of output.

Three sizes, one after the other when run together:

- `default`: the embedded default exactly as a newcomer runs it (`python make_submission.py` in a fresh folder,
  the synthetic dataset generated on the way); target 90 s on 2 idle cores (issue 29), a warm rerun 5 s;
- `real`: a synthetic set of the real competition's size in the FIW layout (570 training families with about
  15,800 faces; 190 val families; 190 test probes with about 1,000 probe faces and 4,000 gallery faces), generated
  first (not timed as part of the pipeline), then `make_submission.py --data-root` on it with the default recipe;
  target: every stage after the features together within 1.0x the feature stage;
- `scale`: ten times the test split (`python -m kinret.synth --n-train 120 --n-val 0 --n-test 1900`: 1,900 probes,
  about 40,000 gallery faces), generated first, then `make_submission.py --data-root`; targets: peak memory 6 GB,
  at most 4 GB left on disk, no stretch over 60 s without a line, score and choose within 0.6x the feature stage.

Each size runs in its own scratch folder (`--workdir`, default a temporary folder, removed unless `--keep`), as a
fresh process with output to a file, the way `nohup` runs it; a generated dataset already in that folder is reused
(only runs/, ensemble/ and submissions/ are cleared), so a second benchmark on one `--workdir` skips the generation.
`--kit DIR` runs another checkout's `make_submission.py` (its `src/` first on PYTHONPATH), e.g. the main branch, for
a before/after table with the same script. Measured for each cold run:

- the stage lines that make_submission prints (`[hh:mm:ss] stage ...` / `... done in ...`), as a table;
- peak memory: the largest resident set of any one process of the run (its `os.wait4` record, the children it
  waited for included: what `/usr/bin/time -v` reports) and the largest sum over the run's process tree, sampled
  every 0.5 s from /proc;
- disk left: the bytes under runs/, ensemble/ and submissions/ after the run (the data folder not counted);
  memory and disk in GB of 10^9 bytes;
- the longest silence: the longest time between two lines of output (each line timed as it arrives), and the line
  it followed.

Nothing is asserted; the targets are printed as met or MISSED.

    python benchmarks/bench_pipeline.py                      # the default and the real size (about 25 minutes)
    python benchmarks/bench_pipeline.py --sizes default      # the default only
    python benchmarks/bench_pipeline.py --sizes real --scale 0.1   # a tenth of the real size (a smoke run)
    python benchmarks/bench_pipeline.py --sizes scale --workdir ../bps --keep   # ten times the test split
    python benchmarks/bench_pipeline.py --sizes scale --workdir ../bps --keep --kit ../main   # the same, before
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_END = re.compile(r"^\[\d\d:\d\d:\d\d\] (.+) done in (.+)$")
STAGE_START = re.compile(r"^\[\d\d:\d\d:\d\d\] ([^:]+?)(?::.*)?$")
# the real competition: 571 train families, 15,845 faces (27.7 per family); test 190 probes, ~5.3 faces per probe
REAL = {"n_train": 570, "n_val": 190, "n_test": 190, "min_members": 3, "max_members": 9, "min_images": 2,
        "max_images": 7}
SCALE = {"n_train": 120, "n_val": 0, "n_test": 1900}  # ten times the test split (issue 29)
SILENCE, PEAK_GB, DISK_GB, SCORE_SHARE, AFTER_SHARE = 60.0, 6.0, 4.0, 0.6, 1.0
OUTPUTS = ("runs", "ensemble", "submissions")


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def tree_rss(root: int) -> int:
    """Bytes resident in process `root` and every process below it (from /proc; 0 once it is gone)."""
    parent, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parent[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    members, frontier = {root}, [root]
    while frontier:
        below = [p for p, pp in parent.items() if pp in frontier and p not in members]
        members.update(below)
        frontier = below
    return sum(rss.get(p, 0) for p in members)


def run_logged(cmd: list[str], cwd: Path, log_file: Path, env: dict, stop_above: float = 0.0) -> dict:
    """Run `cmd`, its output to `log_file` line by line: exit code, wall time, the largest gap between lines (and
    the line before it), the largest one-process RSS (its `os.wait4` record), the largest sampled tree RSS, and
    each stage's: (name, seconds, the largest tree RSS sampled while it ran). With `stop_above` (bytes), the run is
    ended (SIGTERM to its process group) once its tree holds more: a guard for a machine others share."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    samples: list[tuple[float, int]] = []
    done, stopped = threading.Event(), []

    def sample() -> None:
        while not done.wait(0.5):
            samples.append((time.perf_counter(), tree_rss(proc.pid)))
            if stop_above and samples[-1][1] > stop_above and not stopped:
                stopped.append(samples[-1][1])
                os.killpg(proc.pid, signal.SIGTERM)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    last, gap, after = t0, 0.0, "(the start)"
    where, lines = after, []
    with open(log_file, "w") as f:
        for raw in proc.stdout:
            now = time.perf_counter()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if now - last > gap:
                gap, where = now - last, after
            last, after = now, line
            lines.append((now, line))
            f.write(line + "\n")
            f.flush()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own record: its largest process, waited children included
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    end = time.perf_counter()
    if end - last > gap:
        gap, where = end - last, after
    return {"code": proc.returncode, "seconds": end - t0, "silence": gap, "silence_after": where,
            "peak_process": usage.ru_maxrss * 1024, "peak_tree": max((r for _, r in samples), default=0),
            "stages": stage_rows(lines, samples), "stopped": stopped[0] if stopped else 0}


def stage_rows(lines: list[tuple[float, str]], samples: list[tuple[float, int]]) -> list[tuple[str, float, int]]:
    """(stage, seconds as printed, the largest tree RSS sampled between its start line and its end line)."""
    rows, started = [], {}
    for when, line in lines:
        m = STAGE_END.match(line)
        if m:
            t = started.pop(m.group(1), when)
            rows.append((m.group(1), seconds(m.group(2)), max((r for at, r in samples if t <= at <= when), default=0)))
        elif (m := STAGE_START.match(line)) and not line.endswith(" done"):
            started[m.group(1)] = when
    return rows


def make_data(work: Path, sizes: dict, scale: float, env: dict) -> tuple[Path, float]:
    sizes = {k: max(4, round(v * scale)) if k.startswith("n_") and v else v for k, v in sizes.items()}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kinret.synth", "--root", str(work / "data"), "--no-report", *args],
                   check=True, cwd=work, env={**env, "KINRET_NO_PROGRESS": "1"})
    return work / "data", time.perf_counter() - t0


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


def bench(size: str, work: Path, scale: float, kit: Path, stop_above: float = 0.0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # cold: only a generated dataset is reused
        shutil.rmtree(work / name, ignore_errors=True)
    if size == "default":
        shutil.rmtree(work / "data", ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(kit / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, str(kit / "make_submission.py")]
    generated = 0.0
    if size != "default":
        data, generated = make_data(work, REAL if size == "real" else SCALE, scale, env)
        cmd += ["--data-root", str(data)]
    load = os.getloadavg()[0]
    cold = run_logged(cmd, work, work / "cold.log", env, stop_above)
    if cold["stopped"]:
        return {"stages": cold["stages"], "cold": cold, "warm": None, "generated": generated,
                "disk": {name: folder_bytes(work / name) for name in OUTPUTS}, "load": (load, os.getloadavg()[0])}
    if cold["code"] != 0:
        print((work / "cold.log").read_text()[-3000:])
        raise SystemExit(f"{size}: make_submission.py failed (exit {cold['code']}); log in {work / 'cold.log'}")
    disk = {name: folder_bytes(work / name) for name in OUTPUTS}
    warm = run_logged(cmd, work, work / "warm.log", env)
    return {"stages": cold["stages"], "cold": cold, "warm": warm, "generated": generated,
            "disk": disk, "load": (load, os.getloadavg()[0])}


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(size: str, scale: float, kit: Path, result: dict) -> None:
    label = size if scale == 1 or size == "default" else f"{size} x{scale:g}"
    print(f"\n{label}: {kit / 'make_submission.py'} from cold caches (load average {result['load'][0]:.1f} at the "
          f"start, {result['load'][1]:.1f} at the end)")
    if result["generated"]:
        print(f"  (dataset generated first in {result['generated']:.0f} s, not counted)")
    stages = {name: secs for name, secs, _ in result["stages"]}
    print(f"  {'stage':<32} {'seconds':>10}   peak memory (the process tree, sampled)")
    for name, secs, rss in result["stages"]:
        print(f"  {name:<32} {secs:8.1f} s   {rss / 1e9:.2f} GB")
    cold, warm = result["cold"], result["warm"]
    if cold["stopped"]:
        print(f"  STOPPED after {cold['seconds']:.0f} s: its processes held {cold['stopped'] / 1e9:.2f} GB "
              "(--stop-above); the stages above finished")
    else:
        print(f"  {'total (process wall time)':<32} {cold['seconds']:8.1f} s" + (
            f"   target 90 s: {verdict(cold['seconds'] <= 90)}" if size == "default" else ""))
        print(f"  {'warm rerun':<32} {warm['seconds']:8.1f} s" + (
            f"   target 5 s: {verdict(warm['seconds'] <= 5)}" if size == "default" else ""))
    features = stages.get("features")
    after = sum(s for n, s in stages.items() if n not in ("data", "features"))
    if features:
        score = stages.get("score and choose", 0.0)
        print(f"  score and choose / features       {score / features:8.2f} x" + (
            f"   target {SCORE_SHARE:g}: {verdict(score <= SCORE_SHARE * features)}" if size == "scale" else ""))
        print(f"  every stage after the features    {after / features:8.2f} x   ({after:.0f} s)" + (
            f"   target {AFTER_SHARE:g}: {verdict(after <= AFTER_SHARE * features)}" if size == "real" else ""))
    one = cold["peak_process"]
    print(f"  peak memory: one process {one / 1e9:.2f} GB, the process tree {cold['peak_tree'] / 1e9:.2f} GB"
          + (f"   target {PEAK_GB:g} GB: {verdict(max(one, cold['peak_tree']) <= PEAK_GB * 1e9)}"
             if size == "scale" else ""))
    disk = result["disk"]
    print(f"  disk left: {sum(disk.values()) / 1e9:.2f} GB ("
          + ", ".join(f"{n}/ {b / 1e9:.2f}" for n, b in disk.items()) + ")"
          + (f"   target {DISK_GB:g} GB: {verdict(sum(disk.values()) <= DISK_GB * 1e9)}" if size == "scale" else ""))
    print(f"  longest silence: {cold['silence']:.0f} s, after {cold['silence_after'][:100]!r}   "
          f"target {SILENCE:.0f} s: {verdict(cold['silence'] <= SILENCE)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=("default", "real", "scale"), default=["default", "real"])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the real or ten-times size to generate")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, data, runs)")
    p.add_argument("--kit", type=Path, default=REPO, help="the checkout whose make_submission.py runs")
    p.add_argument("--stop-above", type=float, default=0.0, metavar="GB",
                   help="end a run whose processes hold more than this (a machine shared with others); 0: never")
    args = p.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="kinret_bench_pipeline_"))
    kit = args.kit.resolve()
    print(f"{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f} at the start; scratch {root}; kit {kit}")
    try:
        for size in args.sizes:
            report(size, args.scale, kit, bench(size, root / size, args.scale, kit, args.stop_above * 1e9))
    finally:
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
