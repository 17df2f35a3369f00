"""Index lists and labelled lists: the real organiser lists, both text forms, and every malformed case."""

from __future__ import annotations

import pytest
from conftest import FIXTURES

from kinret.data.lists import (
    GalleryRow,
    ProbeRow,
    read_gallery_list,
    read_index_list,
    read_probe_list,
    write_gallery_list,
    write_index_list,
    write_probe_list,
)
from kinret.errors import KinretInputError


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="the real Track-3 index lists are not in the repo: they are read "
                    "from ../shared/fixtures/rfiw_test_index beside the checkout (see README, Set-up)")
def test_real_organiser_lists_parse():
    raw = (FIXTURES / "probe.txt").read_bytes()
    assert b"\r\n" in raw and not raw.endswith(b"\n")  # the file really is CRLF without a trailing newline
    probes = read_index_list(FIXTURES / "probe.txt")
    gallery = read_index_list(FIXTURES / "gallery.txt")
    assert len(probes) == 190 and len(gallery) == 3897
    assert probes[0] == "./probes/probe_subjects/s0" and probes[189] == "./probes/probe_subjects/s189"
    assert gallery[3896] == "./gallery/gallery_faces/face3896.jpg"


def test_index_list_orders_by_index_and_accepts_csv(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"1 b.jpg\r\n0 a.jpg")
    assert read_index_list(tmp_path / "a.txt") == ["a.jpg", "b.jpg"]
    (tmp_path / "a.csv").write_text("index,path\n0,x/a.jpg\n1,x/b.jpg\n")
    assert read_index_list(tmp_path / "a.csv") == ["x/a.jpg", "x/b.jpg"]


def test_index_list_round_trip_in_organiser_form(tmp_path):
    write_index_list(["p/s0", "p/s1"], tmp_path / "probe.txt")
    assert (tmp_path / "probe.txt").read_bytes() == b"0 p/s0\r\n1 p/s1"
    assert read_index_list(tmp_path / "probe.txt") == ["p/s0", "p/s1"]


@pytest.mark.parametrize(("text", "line", "message"), [
    ("0 a.jpg\n0 b.jpg", 2, "duplicate index 0"),
    ("0 a.jpg\n2 b.jpg", 2, "index 1 is missing: line 2 jumps from index 0 to 2"),
    ("0 a.jpg\n1 b.jpg\n3 c.jpg\n4 d.jpg", 3, "index 2 is missing: line 3 jumps from index 1 to 3"),
    ("0 a.jpg\n1 b.jpg\n\n3 c.jpg\n4 d.jpg", 4, "index 2 is missing: line 4 jumps from index 1 to 3"),
    ("1 a.jpg\n2 b.jpg", 1, "index 0 is missing: the list starts at index 1"),
    ("3 c.jpg\n0 a.jpg\n1 b.jpg\n4 d.jpg", 1,
     r"index 2 is missing: the next index after 1 \(line 3\) is 3"),
    ("0 a.jpg\n-1 b.jpg", 2, "index -1 is negative"),
    ("0 a.jpg\nx b.jpg", 2, "not an integer"),
    ("0 a.jpg\n--1 b.jpg", 2, "not an integer"),
    ("0 a.jpg\n\u00b2 b.jpg", 2, "not an integer"),  # str.isdigit() says yes, int() says no
    # int() itself refuses more than 4300 digits
    ("0 a.jpg\n" + "9" * 5000 + " b.jpg", 2, r"index 9{20}\.\.\. \(5000 digits\) is too large"),
    ("0 a.jpg\n1", 2, "expected 'index path'"),
])
def test_malformed_index_list_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "gallery.txt"
    path.write_text(text)
    with pytest.raises(KinretInputError, match=message) as info:
        read_index_list(path)
    assert info.value.line == line and str(path) in str(info.value)


def test_index_list_gap_is_reported_where_it_is_not_at_the_end(tmp_path):
    # 0,1,3,...,99: the gap is at line 3, not at the last line with an index "outside 0..98"
    path = tmp_path / "gallery.txt"
    path.write_text("\n".join(f"{i} face{i}.jpg" for i in range(100) if i != 2))
    with pytest.raises(KinretInputError) as info:
        read_index_list(path)
    assert str(info.value) == f"{path}, line 3: index 2 is missing: line 3 jumps from index 1 to 3"


def test_index_list_that_is_not_text_is_an_input_error(tmp_path):
    (tmp_path / "probe.txt").write_bytes(b"0 a\n1 b\xff\xfe\n")
    with pytest.raises(KinretInputError, match="not UTF-8 text") as info:
        read_index_list(tmp_path / "probe.txt")
    assert info.value.line == 2


def test_missing_list_file_is_named(tmp_path):
    with pytest.raises(KinretInputError, match="missing"):
        read_index_list(tmp_path / "nope.txt")


def test_labelled_lists_round_trip(tmp_path):
    probes = [ProbeRow("F0754/MID3", "F0754", "F0754/MID3"), ProbeRow("F0001/MID1", "F0001", "F0001/MID1")]
    gallery = [GalleryRow("F0775", "MID3", "F0775/MID3/P08183_face2.jpg", "775")]
    write_probe_list(probes, tmp_path / "probe_list.csv")
    write_gallery_list(gallery, tmp_path / "gallery_list.csv")
    assert (tmp_path / "probe_list.csv").read_text().splitlines()[0] == ",ref,fid,feat_path"
    assert (tmp_path / "gallery_list.csv").read_text().splitlines()[0] == ",fid,mid,labels,ref"
    assert read_probe_list(tmp_path / "probe_list.csv") == probes
    assert read_gallery_list(tmp_path / "gallery_list.csv") == gallery


def test_original_column_is_accepted(tmp_path):
    (tmp_path / "g.csv").write_text(",fid,mid,labels,original\n1,F0002,MID1,2,F0002/MID1/b.jpg\n"
                                    "0,F0001,MID2,1,F0001/MID2/a.jpg\n")
    rows = read_gallery_list(tmp_path / "g.csv")
    assert [r.ref for r in rows] == ["F0001/MID2/a.jpg", "F0002/MID1/b.jpg"]


@pytest.mark.parametrize(("body", "line", "message"), [
    ("0,F0001/MID1,F0001,x\n0,F0002/MID1,F0002,x\n", 3, "duplicate index"),
    ("0,F0001/MID1,X12,x\n", 2, "unknown family id"),
    ("0,F0001/MID1,F0002,x\n", 2, "does not belong to family F0002"),
    ("0,F0001/MID1,F0001\n", 2, "row has 3 cells"),
])
def test_malformed_labelled_list_names_row(tmp_path, body, line, message):
    path = tmp_path / "probe_list.csv"
    path.write_text(",ref,fid,feat_path\n" + body)
    with pytest.raises(KinretInputError, match=message) as info:
        read_probe_list(path)
    assert info.value.line == line


def test_labelled_list_without_path_column(tmp_path):
    (tmp_path / "p.csv").write_text(",fid,feat_path\n0,F0001,x\n")
    with pytest.raises(KinretInputError, match="'ref'"):
        read_probe_list(tmp_path / "p.csv")
