"""When the machine fails a run: a full disk is one line naming the folder, what the write needed and what is free,
exit code 3 (and a run that will not fit is warned about before it starts); a decompression bomb is an unreadable
image (exit 2, the file named); Ctrl-C stops the workers, says what is kept and exits 130. Never a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from kinret.io import DiskFullError, atomic_path
from kinret.submission.make import main

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 456256 vs 456152"


def fast(data: Path, work: Path, *extra: str) -> list[str]:
    """A training-free run (raw pixels only: seconds) writing under `work`."""
    return ["--data-root", str(data), "--experiments", "--runs", str(work / "runs"), "--ensemble-dir",
            str(work / "ens"), "--out", str(work / "sub"), *extra]


def one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# ---- a full disk -----------------------------------------------------------------------------------------------------
def test_a_write_that_fills_the_disk_names_the_folder_what_it_wrote_and_what_is_free(tmp_path):
    target = tmp_path / "runs" / "tiny" / "fold0" / "checkpoint.pt"
    with pytest.raises(DiskFullError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x" * 3000)
            raise RuntimeError(TORCH_SHORT_WRITE)  # what torch.save raises when the disk fills under it
    text = str(info.value)
    assert text.startswith(f"{target.parent}: the disk is full: writing checkpoint.pt needs more than the 2.9 KB")
    assert " free there" in text and "run the same command again" in text
    assert not list(target.parent.iterdir())  # no temporary left behind
    with pytest.raises(RuntimeError, match="another failure"):  # other errors keep their traceback
        with atomic_path(target):
            raise RuntimeError("another failure")


def test_a_full_disk_stops_make_submission_with_one_line_and_exit_3(tiny_data, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)  # the first score matrix
    assert main(fast(tiny_data, tmp_path, "--quiet")) == 3
    err = one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'ens' / 'scores'}/" in err and ": the disk is full: writing " in err and " free there" in err


def test_a_full_disk_while_training_stops_the_grid_with_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    def short_write(obj, f, *args, **kwargs):  # the checkpoint is saved through an open file
        f.write(b"x" * 1000) if hasattr(f, "write") else Path(f).write_bytes(b"x" * 1000)
        raise RuntimeError(TORCH_SHORT_WRITE)

    monkeypatch.setattr(torch, "save", short_write)
    argv = fast(tiny_data, tmp_path, "--quiet", "--jobs", "1")
    argv[argv.index("--experiments") + 1:argv.index("--experiments") + 1] = ["tiny"]
    assert main(argv) == 3
    err = one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'runs' / 'tiny' / 'fold0'}: the disk is full: writing checkpoint.pt needs more than" in err


def test_a_real_full_disk_from_a_small_tmpfs(tiny_data, tmp_path):
    """The trainer on a 1 MB tmpfs: torch.save fills it (needs root and mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the monkeypatched writers above cover the message)")
    try:
        proc = subprocess.run([sys.executable, "-m", "kinret.train", "-C", "tiny", "--fold", "0", "--quiet", "--set",
                               f"data_root={tiny_data}", "--set", f"out_root={disk / 'runs'}"],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    err = one_line(proc.stderr)
    assert f"{disk / 'runs'}" in err and ": the disk is full: writing " in err and " free there" in err


def test_the_dry_run_and_the_start_of_a_run_warn_when_the_disk_is_short(tiny_data, tmp_path, monkeypatch, capsys):
    import kinret.submission.disk as disk

    monkeypatch.setattr(disk, "free_bytes", lambda folder: 1000)
    assert main(fast(tiny_data, tmp_path, "--dry-run")) == 0
    captured = capsys.readouterr()
    line = next(ln for ln in captured.out.splitlines() if ln.startswith("disk: about"))
    assert f"{tmp_path / 'ens'}/" in line and "1000 B free there: not enough, the run will stop" in line
    assert "not enough" in captured.err  # the warning
    assert main(fast(tiny_data, tmp_path, "--quiet")) == 0  # the start of a run warns, and the run goes on
    assert captured.err.count("not enough") == 1 and "not enough" in capsys.readouterr().err


# ---- a decompression bomb --------------------------------------------------------------------------------------------
def bomb(path: Path) -> Path:
    """A valid small JPEG whose frame header claims 30000 x 30000 pixels."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(raw))
    return path


def test_a_decompression_bomb_is_an_unreadable_image_named_with_exit_2(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    face = bomb(data / "test" / "gallery" / "gallery_faces" / "face3.jpg")
    assert main(fast(data, tmp_path, "--quiet")) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{face}: cannot decode image (DecompressionBombError: " in err


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------------
def _ours(mark: str) -> list[int]:
    """The processes still running with `mark` in their environment."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def _terminal_sigint() -> None:
    """SIGINT as a terminal leaves it: a suite started in the background by a shell without job control (`cmd &`
    in a script, nohup) inherits it ignored, and so would the run, which Ctrl-C could then not stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_training_stops_the_workers_says_what_is_kept_and_exits_130(tiny_data, tmp_path):
    """SIGINT to make_submission.py and its two grid workers while they train, as Ctrl-C in a terminal sends it to
    the whole process group (the main process alone, kill -INT, takes the same path)."""
    mark = f"KINRET_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", mark.split("=")[0]: mark.split("=")[1]}
    argv = fast(tiny_data, tmp_path, "--jobs", "2")
    argv[argv.index("--experiments") + 1:argv.index("--experiments") + 1] = ["tiny"]
    proc = subprocess.Popen([sys.executable, str(REPO / "make_submission.py"), *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_terminal_sigint)
    t0 = time.monotonic()
    while not list((tmp_path / "runs").rglob("config.json")):  # a worker has started its run
        assert proc.poll() is None, proc.communicate()[1][-2000:]  # a run that ended before training fails here
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    print(f"interrupted {time.monotonic() - t0:.1f} s after the start")
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "interrupted: every finished file is kept" in lines[0] and "run the same command again" in lines[0]
    time.sleep(0.5)
    assert _ours(mark) == []  # no worker left behind
