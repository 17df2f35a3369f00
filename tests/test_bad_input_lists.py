"""Any list file at all: a bad probe, gallery or index list is one KinretInputError naming the file and line (exit
code 2 from the evaluator), never a UnicodeDecodeError, csv.Error or ValueError traceback."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mutate

from kinret.data.lists import (
    GalleryRow,
    ProbeRow,
    read_index_list,
    read_probe_list,
    write_gallery_list,
    write_index_list,
    write_probe_list,
)
from kinret.errors import KinretInputError
from kinret.evaluate import main as evaluate_main

HEADER = b",ref,fid,feat_path\n"
ROW0 = b"0,F0001/MID1,F0001,x\n"

BAD_PROBE_LISTS = {
    # name: (file bytes, message, line)
    "binary row": (HEADER + ROW0 + b"1,F0002/MID2,F0002,\xff\xfe\n", "not UTF-8 text (byte 0xff)", 3),
    "binary row, CR line ends": (HEADER.replace(b"\n", b"\r") + ROW0.replace(b"\n", b"\r") + b"1,F0002/MID2,\xff\r",
                                 "not UTF-8 text (byte 0xff)", 3),
    "random bytes": (b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)), "not UTF-8 text (byte 0x89)", 1),
    "NUL byte": (HEADER + ROW0 + b"1,F0002/MID2\0,F0002,x\n", "holds a NUL byte: not a text list", 3),
    "field past csv's limit": (HEADER + b"0,F0001/MID1,F0001," + b"x" * 200_000 + b"\n",
                               "not a readable CSV (field larger than field limit (131072))", 2),
    "missing index": (HEADER + ROW0 + b"2,F0002/MID2,F0002,x\n", "index 1 is missing: line 3 jumps from index 0 to 2",
                      3),
    "25-digit index": (HEADER + ROW0 + b"1234567890123456789012345,F0002/MID2,F0002,x\n",
                       "index 12345678901234567890... (25 digits) is too large", 3),
    "5000-digit index": (HEADER + ROW0 + b"9" * 5000 + b",F0002/MID2,F0002,x\n",
                         "index 99999999999999999999... (5000 digits) is too large", 3),
    "empty file": (b"", "list is empty", 1),
}


@pytest.fixture
def truth(tmp_path):
    write_probe_list([ProbeRow("F0001/MID1", "F0001"), ProbeRow("F0002/MID2", "F0002")], tmp_path / "probe_list.csv")
    write_gallery_list([GalleryRow("F0002", "MID1", "F0002/MID1/a.jpg"),
                        GalleryRow("F0001", "MID2", "F0001/MID2/b.jpg")], tmp_path / "gallery_list.csv")
    (tmp_path / "p.csv").write_text("1,0\n0,1\n")
    return tmp_path


@pytest.mark.parametrize("kind", BAD_PROBE_LISTS)
def test_evaluate_exits_2_on_any_bad_probe_list(truth, capsys, kind):
    data, message, line = BAD_PROBE_LISTS[kind]
    (truth / "probe_list.csv").write_bytes(data)
    code = evaluate_main(["--predictions", str(truth / "p.csv"), "--probes", str(truth / "probe_list.csv"),
                          "--gallery", str(truth / "gallery_list.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{truth / 'probe_list.csv'}, line {line}: {message}" in err


@pytest.mark.parametrize("kind", BAD_PROBE_LISTS)
def test_read_probe_list_names_the_line_of_any_bad_file(tmp_path, kind):
    data, message, line = BAD_PROBE_LISTS[kind]
    (tmp_path / "probe_list.csv").write_bytes(data)
    with pytest.raises(KinretInputError) as info:
        read_probe_list(tmp_path / "probe_list.csv")
    assert info.value.line == line and message in str(info.value)


def test_line_numbers_follow_the_file_after_a_quoted_multi_line_cell(tmp_path):
    # csv rows are not file lines: a quoted cell may span two, and the errors must quote the editor's line
    (tmp_path / "probe_list.csv").write_text(',ref,fid,feat_path\n0,F0001/MID1,F0001,"a\nb"\n1,F0002/MID2,X,x\n')
    with pytest.raises(KinretInputError, match="unknown family id 'X'") as info:
        read_probe_list(tmp_path / "probe_list.csv")
    assert info.value.line == 4


def test_form_feed_does_not_shift_line_numbers(tmp_path):
    # str.splitlines() would split "a\x0cb" in two, and every later line number would be one off
    (tmp_path / "gallery.txt").write_text("0 a\x0cb.jpg\n1 c.jpg\n3 d.jpg")
    with pytest.raises(KinretInputError, match="index 2 is missing") as info:
        read_index_list(tmp_path / "gallery.txt")
    assert info.value.line == 3


@pytest.mark.parametrize("reader", [read_index_list, read_probe_list])
def test_mutated_lists_never_crash(tmp_path, reader):
    # seeded fuzzing: flipped, dropped and inserted bytes; a reader either returns rows or raises KinretInputError
    if reader is read_index_list:
        write_index_list([f"./gallery/gallery_faces/face{j}.jpg" for j in range(12)], tmp_path / "list")
    else:
        write_probe_list([ProbeRow(f"F{i:04d}/MID1", f"F{i:04d}", "x") for i in range(1, 13)], tmp_path / "list")
    raw = (tmp_path / "list").read_bytes()
    rng = np.random.default_rng(5)
    for _ in range(400):
        (tmp_path / "m").write_bytes(mutate(raw, rng, 30))
        try:
            reader(tmp_path / "m")
        except KinretInputError:
            pass
