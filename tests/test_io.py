"""Atomic writes: all or nothing, with the permissions a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from kinret.io import DIR_MODE, FILE_MODE, atomic_dir, atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "out.txt", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_outputs_get_the_umask_modes_not_owner_only(tmp_path):
    f = write_text_atomic(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "inside.txt").write_text("y")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(f).st_mode) == FILE_MODE == 0o666 & ~mask  # mkstemp alone gives 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == DIR_MODE == 0o777 & ~mask
