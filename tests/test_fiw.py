"""FIW folders, mid.csv relation matrices and family-grouped folds."""

from __future__ import annotations

import pytest
from conftest import make_fiw

from kinret.data.fiw import family_folds, read_fiw, read_mid_csv
from kinret.errors import KinretInputError


def test_read_fiw_counts_and_natural_order(tmp_path):
    root = make_fiw(tmp_path, {"F0002": [1, 2], "F0010": [3], "F0001": [1]})
    (root / "F0002" / "MID10").mkdir()
    fams = read_fiw(root)
    assert [f.fid for f in fams] == ["F0001", "F0002", "F0010"]
    assert [m.mid for m in fams[1].members] == ["MID1", "MID2", "MID10"]
    assert [len(m.images) for m in fams[1].members] == [1, 2, 0]


def test_unknown_folder_is_named(tmp_path):
    root = make_fiw(tmp_path, {"F0001": [1]})
    (root / "family2").mkdir()
    with pytest.raises(KinretInputError, match="family2"):
        read_fiw(root)
    (root / "family2").rmdir()
    (root / "F0001" / "someone").mkdir()
    with pytest.raises(KinretInputError, match="MID<digits>"):
        read_fiw(root)


def test_mid_csv_parses_and_validates(tmp_path):
    path = tmp_path / "mid.csv"
    path.write_text("MID,1,2,3,Name,Gender\n1,0,4,4,ann,female\n2,1,0,2,bob,male\n3,1,2,0,cy,male\n")
    codes = read_mid_csv(path)
    assert codes.tolist() == [[0, 4, 4], [1, 0, 2], [1, 2, 0]]
    path.write_text("MID,1,2,Name,Gender\n1,0,4,ann,female\n2,1,x,bob,male\n")
    with pytest.raises(KinretInputError, match="'x'") as info:
        read_mid_csv(path)
    assert info.value.line == 3
    path.write_text("MID,1,2,Name,Gender\n1,0,4,ann,female\n")
    with pytest.raises(KinretInputError, match="expected 2 member rows"):
        read_mid_csv(path)


def test_folds_keep_families_whole_balanced_and_seeded(tmp_path):
    sizes = {f"F{i:04d}": [1 + i % 4, 2] for i in range(1, 23)}
    fams = read_fiw(make_fiw(tmp_path, sizes))
    folds = family_folds(fams, 5, seed=3)
    assert set(folds) == {f.fid for f in fams} and set(folds.values()) == set(range(5))
    load = [sum(f.n_images for f in fams if folds[f.fid] == k) for k in range(5)]
    assert max(load) - min(load) <= 4
    assert family_folds(fams, 5, seed=3) == folds
    assert family_folds(fams, 5, seed=4) != folds
    with pytest.raises(ValueError):
        family_folds(fams[:3], 5)
