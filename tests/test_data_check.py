"""`python -m kinret.data check DATA`: counts what a data folder holds, names what is missing and every problem that
would stop a run (with the file and line), and exits 2 when the folder is not usable."""

from __future__ import annotations

import shutil

import pytest

from kinret.data.check import check, main


@pytest.fixture
def data(tiny_data, tmp_path):
    return shutil.copytree(tiny_data, tmp_path / "data")


def test_a_complete_folder_is_counted_and_usable(data, capsys):
    assert main(["check", str(data)]) == 0
    out = capsys.readouterr().out
    assert "DATA/train: 12 families, " in out and "mid.csv in 12" in out
    assert "DATA/val (its probe_list.csv/gallery_list.csv): 4 probes (" in out
    assert "DATA/test: 4 probes (" in out and ", unlabelled" in out
    assert "DATA/test_truth: family labels of 4 probes and " in out and "4 families" in out
    assert "missing" not in out and out.rstrip().endswith(f"usable: python make_submission.py --data-root {data}")


def test_missing_optional_parts_are_listed_without_failing(data):
    shutil.rmtree(data / "val")
    shutil.rmtree(data / "test_truth")
    (data / "test" / "probe.txt").unlink()
    report = check(data)
    assert not report.errors
    assert any(m.startswith("DATA/val") for m in report.missing)
    assert any(m.startswith("DATA/test_truth") for m in report.missing)
    assert any(m.startswith("DATA/test/probe.txt") for m in report.missing)


def test_a_list_naming_a_missing_image_is_an_error_with_its_line(data, capsys):
    (data / "test" / "gallery" / "gallery_faces" / "face2.jpg").unlink()
    assert main(["check", str(data)]) == 2
    out = capsys.readouterr().out
    assert "ERROR" in out and "gallery.txt" in out and "line 3" in out and "face2.jpg" in out
    assert "1 problem(s) stop a run" in out


def test_no_test_folder_stops_and_truth_rows_must_match(data):
    (data / "test_truth" / "gallery_list.csv").write_text(
        "\n".join((data / "test_truth" / "gallery_list.csv").read_text().splitlines()[:-1]) + "\n")
    errors = check(data).errors
    assert len(errors) == 1 and "gallery_list.csv" in errors[0] and "rows but the test split has" in errors[0]
    shutil.rmtree(data / "test")
    assert any("does not exist: a submission needs DATA/test" in e for e in check(data).errors)


def test_decode_finds_a_corrupt_image(data):
    victim = next((data / "train").rglob("*.jpg"))
    victim.write_bytes(b"not a jpeg")
    assert not check(data).errors  # listing alone does not open images
    report = check(data, decode=True)
    assert len(report.errors) == 1 and victim.name in report.errors[0]
    assert any(line.startswith("decoded ") for line in report.found)
