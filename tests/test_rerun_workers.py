"""Training workers end with the main process: after `kill -9` of a grid running --jobs 2, its joblib workers (about
1 GiB each on real data) are gone within seconds instead of training on for minutes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def children() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    parent_of = children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parent_of.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_workers_die_with_a_killed_grid(tmp_path, tiny_data):
    exp = tmp_path / "w.py"
    exp.write_text("from dataclasses import replace\nfrom kinret.train.experiments import load_experiment\n"
                   "cfg = replace(load_experiment('tiny')[0], name='w', epochs=500, pairs_per_epoch=512)\n")
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "kinret.grid", "-C", str(exp), "--jobs", "2", "--quiet", "--set",
           f"data_root={tiny_data}", "--set", f"out_root={out}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "KINRET_NO_PROGRESS": "1"}, stdout=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if all((out / "w" / f"fold{k}" / "config.json").is_file() for k in (0, 1)):
                break  # both runs are training, each in a worker
            time.sleep(0.2)
        assert proc.poll() is None, "the grid ended before it could be killed"
        workers = descendants(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and workers & set(children()):
            time.sleep(0.2)
        alive = workers & set(children())
        assert not alive, f"{len(alive)} worker(s) outlived the killed grid"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers & set(children()):  # only the processes this test started
            os.kill(pid, signal.SIGKILL)
