"""The walking skeleton end to end: make_submission.py on synthetic data, on a real-style folder without labels,
and on bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from kinret import submit
from kinret.split import read_labelled
from kinret.submission import read_predictions
from kinret.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "synthetic", SynthConfig(seed=3, n_train=3, n_val=3, n_test=6))


def test_run_on_labelled_folder_scores_both_ap_variants(synth_root, tmp_path, capsys):
    assert submit.main(["--data-root", str(synth_root), "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "local test score, standard AP" in out and "local test score, trapezoid AP" in out
    assert "val score" in out and "mAP (trapezoid AP)" in out
    truth = read_labelled(synth_root / "test_truth" / "probe_list.csv", synth_root / "test_truth" / "gallery_list.csv",
                          None)
    ranking = read_predictions(tmp_path / "submission.zip", len(truth.probes), len(truth.gallery))
    assert np.array_equal(ranking, read_predictions(tmp_path / "predictions.csv", *ranking.shape))
    # the local score printed is the evaluator's score of the file written
    from kinret.evaluate import main as evaluate_main
    evaluate_main(["--predictions", str(tmp_path / "predictions.csv"), "--probes",
                   str(synth_root / "test_truth" / "probe_list.csv"), "--gallery",
                   str(synth_root / "test_truth" / "gallery_list.csv")])
    table = capsys.readouterr().out.splitlines()[1:]
    assert "\n".join(table) in out


def test_run_without_truth_says_so(synth_root, tmp_path, capsys):
    data = tmp_path / "real"
    data.mkdir()
    (data / "test").symlink_to(synth_root / "test", target_is_directory=True)
    (data / "train").symlink_to(synth_root / "train", target_is_directory=True)
    assert submit.main(["--data-root", str(data), "--out", str(tmp_path / "out"), "--aggregation", "max"]) == 0
    out = capsys.readouterr().out
    assert "local test score skipped" in out and (tmp_path / "out" / "submission.zip").is_file()


def test_bad_gallery_image_is_named_or_skipped(synth_root, tmp_path, capsys):
    import shutil
    data = tmp_path / "bad"
    shutil.copytree(synth_root / "test", data / "test")
    (data / "test" / "gallery" / "gallery_faces" / "face3.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert submit.main(["--data-root", str(data), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert submit.main(["--data-root", str(data), "--out", str(tmp_path / "out"), "--skip-bad-images"]) == 0
    ranking = read_predictions(tmp_path / "out" / "predictions.csv", 6, len(list(
        (data / "test" / "gallery" / "gallery_faces").iterdir())))
    assert np.all(ranking[:, -1] == 3)  # the unreadable face ranks last for every probe


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "make_submission.py", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    for opt in ("--data-root", "--out", "--feature", "--aggregation", "--skip-bad-images", "--seed",
                "--regenerate", "--quiet"):
        assert opt in proc.stdout


@pytest.mark.slow
def test_default_run_as_the_readme_runs_it(tmp_path):
    """`python make_submission.py` with no arguments, in a fresh folder: generates the default synthetic data."""
    proc = subprocess.run([sys.executable, str(REPO / "make_submission.py"), "--quiet"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "local test score, standard AP" in proc.stdout
    assert (tmp_path / "submissions" / "submission.zip").is_file()


def test_truth_lists_that_do_not_match_the_test_split(synth_root, tmp_path, capsys):
    import shutil
    data = tmp_path / "mismatch"
    shutil.copytree(synth_root / "test", data / "test")
    shutil.copytree(synth_root / "test_truth", data / "test_truth")
    lines = (data / "test_truth" / "gallery_list.csv").read_text().splitlines()
    (data / "test_truth" / "gallery_list.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert submit.main(["--data-root", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "gallery_list.csv: has" in capsys.readouterr().err
