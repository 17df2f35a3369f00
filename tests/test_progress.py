"""Progress is visible in every mode: plain lines with an ETA off a terminal, stage lines with sizes and times, the
main process never silenced by its workers' flags, and --quiet meaning warnings and the final summary."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, write_experiment

from kinret import log as klog


def test_plain_progress_reports_count_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setattr(klog, "_on_screen", lambda: False)
    monkeypatch.setenv("KINRET_PROGRESS_SECONDS", "0")
    monkeypatch.delenv("KINRET_NO_PROGRESS", raising=False)
    klog.setup_logging(verbose=True)  # the start line is debug level: stages announce themselves
    assert list(klog.progress(range(5), desc="work", unit="img")) == list(range(5))
    lines = [line.split("kinret.progress: ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines[0] == "work: 5 img to do"
    assert any(line.startswith("work: 3/5 img, ") and "img/s, ETA" in line for line in lines), lines
    assert lines[-1].startswith("work: 5 img done in ")


def test_quiet_and_no_progress_return_the_loop_untouched(monkeypatch):
    monkeypatch.setattr(klog, "_on_screen", lambda: False)
    klog.setup_logging(quiet=True)
    items = [1, 2]
    assert klog.progress(items, desc="x") is items
    klog.setup_logging()
    monkeypatch.setenv("KINRET_NO_PROGRESS", "1")
    assert klog.progress(items, desc="x") is items


def test_stage_prints_start_with_size_and_end_with_time(capsys):
    klog.setup_logging()
    klog.stage_times(reset=True)
    with klog.stage("features", "12 images"):
        pass
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("] features: 12 images") and out[1].endswith("] features done in 0 s")
    assert [name for name, _ in klog.stage_times()] == ["features"]


def test_minutes_reads_like_a_person():
    assert [klog.minutes(s) for s in (5, 89, 150, 7200)] == ["5 s", "89 s", "2.5 min", "2.0 h"]


def test_make_submission_to_a_file_shows_every_stage_and_progress(small_data, tmp_path):
    """Output to a file (not a terminal), two grid workers: each stage's start line, progress lines with an ETA from
    the main process while the workers train quietly, and the closing line with the stage times."""
    exp = write_experiment(tmp_path / "progress_exp.py", epochs=1)
    log_file = tmp_path / "run.log"
    env = {**os.environ, "KINRET_PROGRESS_SECONDS": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("KINRET_NO_PROGRESS", None)
    with open(log_file, "w") as f:
        proc = subprocess.run([sys.executable, str(REPO / "make_submission.py"), "--data-root", str(small_data),
                               "--experiments", str(exp), "--runs", str(tmp_path / "runs"), "--ensemble-dir",
                               str(tmp_path / "ens"), "--out", str(tmp_path / "out"), "--jobs", "2"],
                              stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, timeout=600)
    text = log_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    for start in ("] train progress_exp: 2 of 2 runs to train, 2 at a time", "] score and choose: ",
                  "] submission and report"):
        assert start in text, (start, text[-3000:])
    assert "grid (2 processes): 1/2 run, " in text and "ETA" in text, text[-3000:]
    assert "raw pixels: " in text  # a progress line from inside a stage
    last = [line for line in text.splitlines() if line.startswith("done in ")]
    assert last and "train progress_exp" in last[0] and "score and choose" in last[0]
    assert "disk: " in text


def test_quiet_run_keeps_warnings_and_the_final_summary(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "make_submission.py"), "--data-root", str(tiny_data),
                           "--experiments", "--runs", str(tmp_path / "runs"), "--ensemble-dir", str(tmp_path / "ens"),
                           "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "KINRET_PROGRESS_SECONDS": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "] score and choose" not in proc.stdout and " INFO " not in proc.stderr
    assert "submitted: " in proc.stdout and "why: " in proc.stdout and "done in " in proc.stdout
