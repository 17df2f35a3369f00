"""Atomic writes: all or nothing, with the permissions a plain write would give; output folders proven writable
before a run; temporaries of a killed write cleaned up."""

from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest

from kinret.errors import KinretInputError
from kinret.io import (
    DIR_MODE,
    FILE_MODE,
    atomic_dir,
    atomic_path,
    check_writable,
    remove_stale_temporaries,
    write_text_atomic,
)


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


def test_check_writable_creates_nothing_and_names_an_unwritable_folder(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # proven creatable, not created
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(KinretInputError, match="a_file/sub: output folder cannot be written"):
        check_writable(tmp_path / "a_file" / "sub")
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (the file case above was checked)")
    try:  # immutable: refused to root too, where permission bits are not
        with pytest.raises(KinretInputError, match="locked: output folder cannot be written"):
            check_writable(locked)
        with pytest.raises(KinretInputError, match="locked/sub"):
            check_writable(locked / "sub")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_stale_temporaries_of_a_killed_write_are_removed_and_fresh_ones_kept(tmp_path):
    old_file = tmp_path / "runs" / "x" / ".checkpoint.pt.ab12cd.tmp.pt"
    old_dir = tmp_path / ".synthetic.8wr02ju9.tmp"
    keep = [tmp_path / "runs" / "x" / "checkpoint.pt", tmp_path / "runs" / "x" / "a.tmp",
            tmp_path / "runs" / "x" / ".hidden_but_not_ours"]
    for p in (old_file, *keep):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (old_dir / "val").mkdir(parents=True)
    past = time.time() - 60
    for p in (old_file, old_dir, *keep):
        os.utime(p, (past, past))
    fresh = tmp_path / "runs" / ".state.json.ef34.tmp"  # a write in flight, started after the run
    fresh.write_text("y")
    removed = remove_stale_temporaries([tmp_path, tmp_path / "missing"], before=time.time() - 30)
    assert sorted(removed) == sorted([old_file, old_dir])
    assert not old_file.exists() and not old_dir.exists() and fresh.exists() and all(p.exists() for p in keep)
