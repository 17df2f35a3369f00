"""Codalab layout reading, the protocol builder and the Codalab-style copy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_fiw, write_image
from PIL import Image

from kinret.data.fiw import read_fiw
from kinret.data.split import build_protocol, read_codalab, read_labelled, write_codalab, write_labelled
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
