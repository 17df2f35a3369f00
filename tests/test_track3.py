"""Codalab layout reading, the protocol builder and the Codalab-style copy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, make_fiw, write_image
from PIL import Image

from kinret.data.fiw import read_fiw
from kinret.data.lists import write_index_list
from kinret.data.track3 import build_protocol, read_codalab, read_labelled, write_codalab, write_labelled
from kinret.errors import KinretInputError


def make_codalab(root, n_probes=12, n_gallery=11):
    for i in range(n_probes):
        for k in range(1 + i % 3):
            write_image(root / "probes" / "probe_subjects" / f"s{i}" / f"{k}.jpg", 100 * i + k)
    for j in range(n_gallery):
        write_image(root / "gallery" / "gallery_faces" / f"face{j}.jpg", 9000 + j)
    return root


def test_codalab_order_comes_from_numbers_not_directory_order(tmp_path):
    split = read_codalab(make_codalab(tmp_path))
    assert [p.images[0].parent.name for p in split.probes] == [f"s{i}" for i in range(12)]
    assert [g.path.name for g in split.gallery] == [f"face{j}.jpg" for j in range(11)]
    assert not split.labelled and len(split.probes[2].images) == 3


def test_codalab_order_comes_from_index_lists_when_present(tmp_path):
    root = make_codalab(tmp_path, 3, 3)
    (root / "probe.txt").write_bytes(b"0 ./probes/probe_subjects/s2\r\n1 ./probes/probe_subjects/s0\r\n"
                                     b"2 ./probes/probe_subjects/s1")
    (root / "gallery.txt").write_text("2 ./gallery/gallery_faces/face0.jpg\n0 ./gallery/gallery_faces/face1.jpg\n"
                                      "1 ./gallery/gallery_faces/face2.jpg")
    split = read_codalab(root)
    assert [p.images[0].parent.name for p in split.probes] == ["s2", "s0", "s1"]
    assert [g.path.name for g in split.gallery] == ["face1.jpg", "face2.jpg", "face0.jpg"]


def test_codalab_gap_and_missing_entries_are_named(tmp_path):
    root = make_codalab(tmp_path, 3, 3)
    (root / "gallery" / "gallery_faces" / "face1.jpg").unlink()
    with pytest.raises(KinretInputError, match="face1 is missing"):
        read_codalab(root)
    (root / "gallery.txt").write_text("0 ./gallery/gallery_faces/face0.jpg\n1 ./gallery/gallery_faces/face1.jpg")
    with pytest.raises(KinretInputError, match="face1.jpg' does not exist") as info:
        read_codalab(root)
    assert info.value.line == 2


def write_lists(root, n_probes, n_gallery):
    """The organisers' index lists for a `make_codalab` folder (CRLF, no trailing newline)."""
    write_index_list([f"./probes/probe_subjects/s{i}" for i in range(n_probes)], root / "probe.txt")
    write_index_list([f"./gallery/gallery_faces/face{j}.jpg" for j in range(n_gallery)], root / "gallery.txt")
    return root


def drop_last_line(path):
    path.write_bytes(path.read_bytes().rsplit(b"\r\n", 1)[0])


def test_truncated_gallery_list_names_the_unlisted_image_and_where_the_list_ends(tmp_path):
    root = write_lists(make_codalab(tmp_path, 3, 5), 3, 5)
    assert len(read_codalab(root).gallery) == 5
    drop_last_line(root / "gallery.txt")  # face4.jpg stays on disk: a submission would be one column short
    with pytest.raises(KinretInputError) as info:
        read_codalab(root)
    assert str(info.value) == (f"{root / 'gallery.txt'}, line 4: the list ends here with 4 entries, but "
                               "gallery/gallery_faces holds 5 images; not listed: face4.jpg; to fix it, restore "
                               "the missing line(s) (the next one is likely '4 ./gallery/gallery_faces/face4.jpg') or "
                               "delete gallery.txt to order the images by the numbers in their names (face0.jpg, "
                               "face1.jpg, ...)")
    assert info.value.line == 4 and info.value.path == str(root / "gallery.txt")


def test_truncated_probe_list_names_the_unlisted_probe_folder(tmp_path):
    root = write_lists(make_codalab(tmp_path, 3, 5), 3, 5)
    drop_last_line(root / "probe.txt")
    with pytest.raises(KinretInputError) as info:
        read_codalab(root)
    assert str(info.value) == (f"{root / 'probe.txt'}, line 2: the list ends here with 2 entries, but "
                               "probes/probe_subjects holds 3 probe folders; not listed: s2; to fix it, restore "
                               "the missing line(s) (the next one is likely '2 ./probes/probe_subjects/s2') or delete "
                               "probe.txt to order the probe folders by the numbers in their names (s0, s1, ...)")


def test_unlisted_images_are_named_first_few_in_natural_order(tmp_path):
    root = make_codalab(tmp_path, 2, 12)
    write_lists(root, 2, 3)
    with pytest.raises(KinretInputError, match=r"line 3: the list ends here with 3 entries, but gallery/gallery_faces "
                                               r"holds 12 images; not listed: face3.jpg, face4.jpg, face5.jpg, "
                                               r"face6.jpg, face7.jpg and 4 more; to fix it, restore the missing "
                                               r"line\(s\) \(the next one is likely "
                                               r"'3 ./gallery/gallery_faces/face3.jpg'\)"):
        read_codalab(root)


def test_list_as_long_as_the_folder_can_still_leave_an_image_unlisted(tmp_path):
    root = write_lists(make_codalab(tmp_path, 2, 3), 2, 3)
    write_image(root / "elsewhere" / "x.jpg", 1)
    write_index_list(["./gallery/gallery_faces/face0.jpg", "./elsewhere/x.jpg", "./gallery/gallery_faces/face2.jpg"],
                     root / "gallery.txt")
    with pytest.raises(KinretInputError) as info:
        read_codalab(root)
    assert str(info.value) == f"{root / 'gallery.txt'}: gallery/gallery_faces holds 1 image the list does not name: " \
                              "face1.jpg; to fix it, restore the organisers' gallery.txt or delete gallery.txt to " \
                              "order the images by the numbers in their names (face0.jpg, face1.jpg, ...)"


def test_list_naming_one_image_twice_is_refused_at_the_second_line(tmp_path):
    root = write_lists(make_codalab(tmp_path, 2, 3), 2, 3)
    write_index_list(["./gallery/gallery_faces/face0.jpg", "./gallery/gallery_faces/face1.jpg",
                      "gallery/gallery_faces/face0.jpg"], root / "gallery.txt")
    with pytest.raises(KinretInputError, match="names 'gallery/gallery_faces/face0.jpg' again \\(line 1 names "
                                               "it too\\)") as info:
        read_codalab(root)
    assert info.value.line == 3


def test_nul_byte_in_a_listed_path_is_an_input_error(tmp_path):
    # os.path.realpath raises ValueError ("embedded null byte") on such a path: it must never get that far
    root = write_lists(make_codalab(tmp_path, 2, 3), 2, 3)
    (root / "gallery.txt").write_bytes(b"0 ./gallery/gallery_faces/face0.jpg\r\n1 ./gallery/gallery_faces/face1\0.jpg")
    with pytest.raises(KinretInputError, match="holds a NUL byte") as info:
        read_codalab(root)
    assert info.value.line == 2


def test_cross_check_ignores_hidden_and_non_image_files(tmp_path):
    root = write_lists(make_codalab(tmp_path, 2, 3), 2, 3)
    for name in (".DS_Store", "._face0.jpg", "notes.txt"):
        (root / "gallery" / "gallery_faces" / name).write_bytes(b"x")
    (root / "probes" / "probe_subjects" / ".ipynb_checkpoints").mkdir()
    (root / "probes" / "probe_subjects" / "readme.txt").write_text("x")
    split = read_codalab(root)
    assert (len(split.probes), len(split.gallery)) == (2, 3)


def test_gallery_listed_row_line_is_the_file_line_not_the_index(tmp_path):
    root = write_lists(make_codalab(tmp_path, 2, 3), 2, 3)
    (root / "gallery.txt").write_text("index,path\n1,./gallery/gallery_faces/face1.jpg\n"
                                      "0,./gallery/gallery_faces/nope.jpg\n2,./gallery/gallery_faces/face2.jpg\n")
    with pytest.raises(KinretInputError, match="nope.jpg' does not exist") as info:
        read_codalab(root)
    assert info.value.line == 3  # index 0 sits on line 3 of this CSV list (line 1 is its header)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared fixtures not present")
def test_real_organiser_lists_cross_check_against_their_folders(tmp_path):
    # the real lists name every s{i} and face{j}: reading them against a full folder must keep working
    root = tmp_path / "test"
    for i in range(190):
        (root / "probes" / "probe_subjects" / f"s{i}").mkdir(parents=True)
        (root / "probes" / "probe_subjects" / f"s{i}" / "0.jpg").write_bytes(b"")
    (root / "gallery" / "gallery_faces").mkdir(parents=True)
    for j in range(3897):
        (root / "gallery" / "gallery_faces" / f"face{j}.jpg").write_bytes(b"")
    for name in ("probe.txt", "gallery.txt"):
        (root / name).write_bytes((FIXTURES / name).read_bytes())
    split = read_codalab(root)
    assert (len(split.probes), len(split.gallery)) == (190, 3897)
    assert split.gallery[3896].path.name == "face3896.jpg"
    drop_last_line(root / "gallery.txt")
    with pytest.raises(KinretInputError) as info:
        read_codalab(root)
    assert str(info.value).endswith("gallery.txt, line 3896: the list ends here with 3896 entries, but "
                                    "gallery/gallery_faces holds 3897 images; not listed: face3896.jpg; to fix it, "
                                    "restore the missing line(s) (the next one is likely '3896 "
                                    "./gallery/gallery_faces/face3896.jpg') or delete gallery.txt to order the images "
                                    "by the numbers in their names (face0.jpg, face1.jpg, ...)")


def test_protocol_one_probe_per_family_gallery_is_the_rest(fiw_root):
    fams = read_fiw(fiw_root)
    split, skipped = build_protocol(fams, fiw_root, seed=0)
    assert skipped == 1  # F0003 has a single member
    assert sorted(p.fid for p in split.probes) == ["F0001", "F0002", "F0010"]
    by_fid = {f.fid: f for f in fams}
    for p in split.probes:
        fam = by_fid[p.fid]
        others = {img for m in fam.members if f"{fam.fid}/{m.mid}" != p.ref for img in m.images}
        assert {g.path for g in split.gallery if g.fid == p.fid} == others
        assert not set(p.images) & others
    assert len(split.gallery) == sum(f.n_images for f in fams if f.fid != "F0003") - sum(len(p.images)
                                                                                          for p in split.probes)
    again, _ = build_protocol(fams, fiw_root, seed=0)
    assert again == split
    refs = {build_protocol(fams, fiw_root, seed=s)[0].probes[0].ref for s in range(20)}
    assert len(refs) > 1  # the probe member really is drawn by the seed


def test_labelled_and_codalab_copies_read_back(fiw_root, tmp_path):
    split, _ = build_protocol(read_fiw(fiw_root), fiw_root, seed=1, name="val")
    write_labelled(split, fiw_root)
    back = read_labelled(fiw_root / "probe_list.csv", fiw_root / "gallery_list.csv", fiw_root, name="val")
    assert [p.images for p in back.probes] == [p.images for p in split.probes]
    assert [g.path for g in back.gallery] == [g.path.resolve() for g in split.gallery]
    assert back.probe_fids.tolist() == split.probe_fids.tolist()

    write_codalab(split, tmp_path / "test", tmp_path / "truth")
    test = read_codalab(tmp_path / "test")
    truth = read_labelled(tmp_path / "truth" / "probe_list.csv", tmp_path / "truth" / "gallery_list.csv", None)
    assert not test.labelled and len(test.gallery) == len(split.gallery) == len(truth.gallery)
    assert [len(p.images) for p in test.probes] == [len(p.images) for p in split.probes]
    assert truth.gallery_fids.tolist() == split.gallery_fids.tolist()
    src = np.asarray(Image.open(split.gallery[4].path))
    dst = np.asarray(Image.open(test.gallery[4].path))
    assert np.array_equal(src, dst)  # face4.jpg is gallery row 4, byte for byte
    assert not list((tmp_path / "test").rglob("*.csv"))  # no labels inside the unlabelled copy
    with pytest.raises(ValueError, match="must not lie inside"):
        write_codalab(split, tmp_path / "t2", tmp_path / "t2" / "truth")


def test_probe_folder_without_images_is_named(tmp_path):
    root = make_codalab(tmp_path, 2, 2)
    for f in (root / "probes" / "probe_subjects" / "s1").iterdir():
        f.unlink()
    with pytest.raises(KinretInputError, match="s1: probe folder holds no images"):
        read_codalab(root)


def test_fixture_family_layout_helper(tmp_path):
    # guards the conftest helper itself: member folders and image counts as asked
    root = make_fiw(tmp_path, {"F0001": [2, 1]})
    assert sorted(p.name for p in (root / "F0001").iterdir()) == ["MID1", "MID2"]


def test_protocol_command_writes_lists_copy_and_folds(fiw_root, tmp_path, capsys):
    from kinret.protocol import main

    out, copy = tmp_path / "proto", tmp_path / "codalab"
    assert main(["--fiw", str(fiw_root), "--out", str(out), "--codalab", str(copy), "--folds", "2"]) == 0
    assert "1 single-member family skipped" in capsys.readouterr().out
    split = read_labelled(out / "probe_list.csv", out / "gallery_list.csv", fiw_root)
    assert len(read_codalab(copy).gallery) == len(split.gallery)
    folds = (out / "folds.csv").read_text().splitlines()
    assert folds[0] == "fid,fold" and len(folds) == 5
    assert main(["--fiw", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "FIW data folder does not exist" in capsys.readouterr().err
