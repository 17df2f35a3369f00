"""Fault injection: a small make_submission.py run is killed (SIGKILL) at one atomic write of each kind — a
checkpoint, a run's state, a feature chunk, a score matrix, the selection, the CSV, the zip — then run again; the
rerun must finish and write a predictions.csv equal, byte for byte, to an uninterrupted run's. A kill right after
a write leaves a new file and nothing after it; a kill inside a write leaves its temporary behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# runs make_submission.py with kinret.io.atomic_path wrapped: every completed write is logged, and the process kills
# itself at write number KILL_AT (after its rename, or before it with KILL_INSIDE=1)
DRIVER = r"""
import contextlib, os, signal, sys
import kinret.io as kio

original = kio.atomic_path
kill_at, inside, log = int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_INSIDE") == "1", os.environ["WRITES"]
count = [0]

@contextlib.contextmanager
def atomic_path(target, suffix=""):
    with original(target, suffix) as tmp:
        yield tmp
        if inside and count[0] + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the temporary is written, the rename never happens
    count[0] += 1
    with open(log, "a") as f:
        f.write(f"{target}\n")
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

kio.atomic_path = atomic_path  # before any other kinret module imports it
from kinret.submission.make import main
sys.exit(main(sys.argv[1:]))
"""

KINDS = {  # a write of each kind, by the end of its target's path
    "checkpoint": "checkpoint.pt",
    "state": "state.json",
    "feature chunk": ".npz",  # the first chunk of a cache under *.parts/
    "score matrix": ".npy",
    "selection": "selection.json",
    "CSV": "predictions.csv",
    "zip": ".zip",
}


def _run(data: Path, work: Path, kill_at: int = 0, inside: bool = False) -> subprocess.CompletedProcess:
    argv = ["--data-root", str(data), "--experiments", "tiny", "--runs", str(work / "runs"), "--ensemble-dir",
            str(work / "ens"), "--out", str(work / "sub"), "--jobs", "1", "--quiet"]
    env = {**os.environ, "KILL_AT": str(kill_at), "KILL_INSIDE": "1" if inside else "0",
           "WRITES": str(work / "writes.log"), "KINRET_EMBED_CHUNK": "16"}  # small chunks: a cache has several
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", DRIVER, *argv], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(tiny_data, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    writes = (work / "writes.log").read_text().splitlines()
    return (work / "sub" / "predictions.csv").read_bytes(), writes


def _first(writes: list[str], kind: str) -> int:
    ending = KINDS[kind]
    for i, target in enumerate(writes, start=1):
        if target.endswith(ending) and (kind != "feature chunk" or ".parts/" in target):
            return i
    raise AssertionError(f"the uninterrupted run made no {kind} write")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "inside"), [(k, False) for k in KINDS] + [("checkpoint", True), ("state", True)],
                         ids=lambda v: v if isinstance(v, str) else ("inside" if v else "after"))
def test_a_kill_at_any_write_then_a_rerun_gives_the_same_submission(reference, tiny_data, tmp_path, kind, inside):
    want, writes = reference
    k = _first(writes, kind)
    killed = _run(tiny_data, tmp_path, kill_at=k, inside=inside)
    assert killed.returncode == -signal.SIGKILL, f"not killed at write {k} ({kind}): {killed.stderr[-2000:]}"
    done = (tmp_path / "writes.log").read_text().splitlines() if (tmp_path / "writes.log").exists() else []
    assert len(done) == (k - 1 if inside else k)
    (tmp_path / "writes.log").unlink(missing_ok=True)
    rerun = _run(tiny_data, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (tmp_path / "sub" / "predictions.csv").read_bytes() == want
    leftovers = [p for p in tmp_path.rglob(".*.tmp*")]
    assert not leftovers, f"temporaries left behind: {leftovers[:3]}"
    selection = json.loads((tmp_path / "sub" / "selection.json").read_text())
    assert (tmp_path / "sub" / f"{selection['name']}.zip").is_file()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)  # several GB of runs add up over the cases
