"""Fault injection: a small make_submission.py run is killed (SIGKILL) at one atomic write of each kind — the
trainer's pixel cache, a checkpoint, a run's state, a feature chunk, a score matrix, the selection, the CSV, the zip —
then run again; the rerun must finish and write a predictions.csv equal, byte for byte, to an uninterrupted run's. A
kill right after a write leaves a new file and nothing after it; a kill inside a write leaves its temporary behind.

Every run is a forked child of one driver process (tests/fault_driver.py) that imported the kit once: the
uninterrupted reference, then each case's killed run and its rerun, each in its own folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO
from fault_driver import KINDS, case_name, first_write, is_kind

CASES = [(k, False) for k in KINDS] + [("checkpoint", True), ("state", True)]


@pytest.fixture(scope="module")
def driven(small_data, tmp_path_factory):
    """Run the driver once for every case, on the small set; (its results, the folder holding each run's)."""
    root = tmp_path_factory.mktemp("faults")
    plan = {"data": str(small_data), "root": str(root), "results": str(root / "results.json"), "cases": CASES,
            "argv": ["--experiments", "tiny", "--jobs", "1", "--quiet"]}
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "KINRET_EMBED_CHUNK": "16"}  # small chunks: a cache has several
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fault_driver.py"), str(root / "plan.json")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    reference = root / "uninterrupted"
    assert results["uninterrupted"]["code"] == 0, (reference / "output.log").read_text()[-3000:]
    return results, root


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "inside"), CASES, ids=lambda v: v if isinstance(v, str) else
                         ("inside" if v else "after"))
def test_a_kill_at_any_write_then_a_rerun_gives_the_same_submission(driven, kind, inside):
    results, root = driven
    case, work = results[case_name(kind, inside)], root / case_name(kind, inside)
    log = (work / "output.log").read_text()[-3000:]
    k = case["kill_at"]
    assert is_kind(results["uninterrupted"]["writes"][k - 1], kind)
    assert case["killed"] == -signal.SIGKILL, f"not killed at write {k} ({kind}): {log}"
    assert case["done"] == (k - 1 if inside else k)
    assert case["rerun"] == 0, log
    want = (root / "uninterrupted" / "sub" / "predictions.csv").read_bytes()
    assert (work / "sub" / "predictions.csv").read_bytes() == want
    leftovers = list(work.rglob(".*.tmp*"))
    assert not leftovers, f"temporaries left behind: {leftovers[:3]}"
    selection = json.loads((work / "sub" / "selection.json").read_text())
    assert (work / "sub" / f"{selection['name']}.zip").is_file()


def test_the_driver_finds_each_kind_in_a_write_log():
    writes = ["r/_cache/pixels_32px_0a.npy", "r/tiny/fold0/config.json", "r/_cache/x.parts/0.npz",
              "r/tiny/fold0/checkpoint.pt", "e/scores/v/oof0.ids.npz", "e/scores/v/oof0.npy"]
    assert [first_write(writes, k) for k in ("pixel cache", "feature chunk", "checkpoint", "score matrix")] == [
        1, 3, 4, 6]
    with pytest.raises(AssertionError, match="no zip write"):
        first_write(writes, "zip")
    assert case_name("feature chunk", True) == "feature_chunk_inside"
