"""The walking skeleton end to end: make_submission.py on synthetic data, on a real-style folder without labels,
and on bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from kinret.data.synth import SynthConfig, generate
from kinret.data.track3 import read_labelled
from kinret.submission import make as submit
from kinret.submission.predictions import read_predictions


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "synthetic", SynthConfig(seed=3, n_train=3, n_val=3, n_test=6))


def fast(root, out, *extra):
    """Training-free variants only (raw pixels), so these checks take seconds."""
    work = out.parent / f"{out.name}_work"
    return ["--data-root", str(root), "--out", str(out), "--experiments", "--runs", str(work / "runs"),
            "--ensemble-dir", str(work / "ens"), *extra]


def test_run_on_labelled_folder_scores_both_ap_variants(synth_root, tmp_path, capsys):
    assert submit.main(fast(synth_root, tmp_path / "out", "--quiet")) == 0
    tmp_path = tmp_path / "out"
    out = capsys.readouterr().out
    assert "local test score, standard AP" in out and "local test score, trapezoid AP" in out
    assert "why: " in out and "chance" in out and "mAP (trapezoid AP)" in out
    assert "| variant |" not in out  # the full table goes to the file, not the terminal
    truth = read_labelled(synth_root / "test_truth" / "probe_list.csv", synth_root / "test_truth" / "gallery_list.csv",
                          None)
    zip_path = tmp_path / "best_raw_pixels_cos-pixels-meanemb.zip"
    ranking = read_predictions(zip_path, len(truth.probes), len(truth.gallery))
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
    assert submit.main(fast(data, tmp_path / "out", "--zip-name", "submission.zip")) == 0
    out = capsys.readouterr().out
    assert "local test score skipped" in out and (tmp_path / "out" / "submission.zip").is_file()


def test_bad_gallery_image_is_named_and_nothing_is_written(synth_root, tmp_path, capsys):
    import shutil
    data = tmp_path / "bad"
    shutil.copytree(synth_root / "test", data / "test")
    (data / "test" / "gallery" / "gallery_faces" / "face3.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert submit.main(fast(data, tmp_path / "out", "--quiet")) == 2
    assert "face3.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "make_submission.py", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    for opt in ("--data-root", "--out", "--zip-name", "--experiments", "--runs", "--ensemble-dir", "--variants",
                "--no-raw-pixels", "--choose", "--normalise", "--max-steps", "--top-n", "--jobs", "--dry-run",
                "--data-seed", "--protocol-seed", "--regenerate", "--quiet", "--verbose"):
        assert opt in proc.stdout
    assert "(default: z)" in proc.stdout and "(default: 0)" in proc.stdout  # defaults shown


def test_default_dry_run_in_a_fresh_folder_lists_the_stages(tmp_path):
    """`python make_submission.py --dry-run` with no data yet: says what the default run would build."""
    proc = subprocess.run([sys.executable, str(REPO / "make_submission.py"), "--dry-run"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "generate the synthetic dataset" in proc.stdout and not (tmp_path / "data").exists()


def test_an_unwritable_output_folder_stops_the_run_before_any_work(synth_root, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "out").write_text("a file where the submission folder should be")
    assert submit.main(fast(synth_root, out / "sub", "--quiet")) == 2
    assert "out/sub: output folder cannot be written" in capsys.readouterr().err
    assert not (tmp_path / "out_work").exists() and not (tmp_path / "sub_work").exists()  # nothing was scored
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (the file case above was checked)")
    try:  # an immutable folder refuses root too
        assert submit.main(fast(synth_root, locked, "--quiet")) == 2
        assert "locked: output folder cannot be written" in capsys.readouterr().err
        assert not (tmp_path / "locked_work" / "ens" / "scores").exists()
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
