"""predictions.csv and its zip: format, validation, atomic writes, and the evaluator's command line."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import REPO

from kinret.data.lists import GalleryRow, ProbeRow, write_gallery_list, write_probe_list
from kinret.errors import KinretInputError
from kinret.evaluate import main as evaluate_main
from kinret.scoring.ranking import rank_gallery
from kinret.submission.predictions import read_predictions, write_predictions


def test_round_trip_integers_zip_root_no_leftovers(tmp_path):
    ranking = rank_gallery(np.random.default_rng(0).normal(size=(4, 12)))
    write_predictions(ranking, tmp_path / "predictions.csv", tmp_path / "sub.zip")
    text = (tmp_path / "predictions.csv").read_text()
    assert "." not in text and "e" not in text and text.count("\n") == 4
    assert text.splitlines()[0] == ",".join(map(str, ranking[0]))
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert zf.namelist() == ["predictions.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "sub.zip"]
    np.testing.assert_array_equal(read_predictions(tmp_path / "sub.zip", 4, 12), ranking)
    # a rerun replaces, never appends
    write_predictions(ranking[::-1].copy(), tmp_path / "predictions.csv")
    np.testing.assert_array_equal(read_predictions(tmp_path / "predictions.csv", 4, 12), ranking[::-1])


def test_multi_digit_and_organisers_large_gallery(tmp_path):
    # the organisers' table prints 31,787 gallery faces: the writer/reader must handle it as well as 3,897
    ranking = np.stack([np.random.default_rng(i).permutation(31787) for i in range(3)])
    write_predictions(ranking, tmp_path / "p.csv")
    np.testing.assert_array_equal(read_predictions(tmp_path / "p.csv", 3, 31787), ranking)


def test_invalid_ranking_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="row 1 .* not a permutation"):
        write_predictions(np.array([[0, 1, 2], [0, 0, 2]]), tmp_path / "p.csv")
    with pytest.raises(ValueError, match="integer"):
        write_predictions(np.array([[0.0, 1.0]]), tmp_path / "p.csv")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("text", "line", "message"), [
    ("a,b,c\n0,1,2\n", 1, "header"),
    ("0,1,2\n0,1.0,2\n", 2, "non-integer cell: '1.0'"),
    ("0,1,2\n0,2,2\n", 2, "not a permutation"),
    ("0,1,2\n0,1\n", 2, "not a permutation"),
    ("0,1,2\n3.0e+00,1,2\n", 2, "non-integer"),
])
def test_bad_predictions_name_the_first_bad_row(tmp_path, text, line, message):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(KinretInputError, match=message) as info:
        read_predictions(tmp_path / "p.csv", 2, 3)
    assert info.value.line == line


def test_wrong_row_count(tmp_path):
    (tmp_path / "p.csv").write_text("0,1,2\n")
    with pytest.raises(KinretInputError, match="1 rows, expected one per probe \\(2\\)"):
        read_predictions(tmp_path / "p.csv", 2, 3)


@pytest.fixture
def truth(tmp_path):
    write_probe_list([ProbeRow("F0001/MID1", "F0001"), ProbeRow("F0002/MID2", "F0002")], tmp_path / "probe_list.csv")
    write_gallery_list([GalleryRow("F0002", "MID1", "F0002/MID1/a.jpg"),
                        GalleryRow("F0001", "MID2", "F0001/MID2/b.jpg"),
                        GalleryRow("F0003", "MID1", "F0003/MID1/c.jpg")], tmp_path / "gallery_list.csv")
    return tmp_path


def test_evaluate_cli_json(truth, capsys):
    (truth / "p.csv").write_text("1,0,2\n2,0,1\n")
    args = ["--predictions", str(truth / "p.csv"), "--probes", str(truth / "probe_list.csv"),
            "--gallery", str(truth / "gallery_list.csv"), "--json"]
    assert evaluate_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mAP"] == pytest.approx((1 + 1 / 2) / 2) and out["rank@1"] == pytest.approx(1 / 2)
    assert out["average"] == pytest.approx(((1 + 1 / 2) / 2 + 1) / 2)
    assert (out["ap"], out["n_probes"], out["n_gallery"]) == ("standard", 2, 3)
    assert evaluate_main(args + ["--ap", "trapezoid"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] == pytest.approx((1 + (0 / 1 + 1 / 2) / 2) / 2)


def test_evaluate_cli_exit_code_2_as_a_process(truth):
    (truth / "p.csv").write_text("1,0,2\n2,2,1\n")
    proc = subprocess.run([sys.executable, "-m", "kinret.evaluate", "--predictions", str(truth / "p.csv"),
                           "--probes", str(truth / "probe_list.csv"), "--gallery", str(truth / "gallery_list.csv")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "p.csv, line 2" in proc.stderr and "not a permutation" in proc.stderr
    (truth / "p.csv").write_text("1,0,2\n2,0,1\n")
    proc = subprocess.run([sys.executable, "-m", "kinret.evaluate", "--predictions", str(truth / "p.csv"),
                           "--probes", str(truth / "probe_list.csv"), "--gallery", str(truth / "gallery_list.csv")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "Average = (mAP + Rank@5) / 2" in proc.stdout and "standard AP" in proc.stdout


def test_evaluate_cli_malformed_list(truth, capsys):
    (truth / "p.csv").write_text("1,0,2\n2,0,1\n")
    (truth / "gallery_list.csv").write_text(",fid,mid,labels,ref\n0,F0002,MID1,2,F0002/MID1/a.jpg\n"
                                            "0,F0001,MID2,1,F0001/MID2/b.jpg\n")
    assert evaluate_main(["--predictions", str(truth / "p.csv"), "--probes", str(truth / "probe_list.csv"),
                          "--gallery", str(truth / "gallery_list.csv")]) == 2
    assert "gallery_list.csv, line 3: duplicate index 0" in capsys.readouterr().err


def test_token_encoder_matches_digit_encoder():
    from kinret.submission.predictions import _encode_digits, _encode_rows

    rng = np.random.default_rng(7)
    for n in (1, 9, 10, 11, 1001, 123457):
        ranking = np.stack([rng.permutation(n) for _ in range(2)])
        assert _encode_rows(ranking) == _encode_digits(ranking)
        assert _encode_rows(ranking.astype(np.int32)) == _encode_digits(ranking)
