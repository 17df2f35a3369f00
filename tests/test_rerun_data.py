"""A run is identified by its config and the content of its training data, not by the data root's path: families
moved in or faces replaced make a finished run retrain (an interrupted one starts again on the new data), while a
relative and an absolute path to the same data are the same run."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import write_experiment
from test_rerun_caches import swap_in

from kinret.models.config import apply_overrides
from kinret.train import cli as train
from kinret.train import grid
from kinret.train import trainer as trainer_module
from kinret.train.experiments import load_experiment
from kinret.train.runs import run_status


class Killed(BaseException):
    """Stands for a kill: nothing in the kit catches it."""


def data_with_held_back_families(tiny_data, tmp_path, n=4):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "train", data / "train")
    shutil.copytree(tiny_data / "val", data / "val")
    held = tmp_path / "held_back"
    held.mkdir()
    families = sorted((data / "train").iterdir())
    for fam in families[len(families) - n:]:
        shutil.move(fam, held / fam.name)
    return data, held


def move_in(held, data):
    for fam in sorted(held.iterdir()):
        shutil.move(fam, data / "train" / fam.name)


def config(exp, data, out, *sets):
    return apply_overrides(load_experiment(str(exp))[0], [f"data_root={data}", f"out_root={out}", *sets])


def test_families_moved_in_make_a_finished_run_retrain(tmp_path, tiny_data, capsys, monkeypatch):
    data, held = data_with_held_back_families(tiny_data, tmp_path)
    out = tmp_path / "runs"
    exp = write_experiment(tmp_path / "d.py", epochs=1)
    argv = ["-C", str(exp), "--quiet", "--folds", "0", "--set", f"data_root={data}", "--set", f"out_root={out}"]
    assert grid.main(argv) == 0
    cfg = config(exp, data, out)
    ckpt = cfg.run_dir(0) / "checkpoint.pt"
    assert run_status(cfg, 0)[0] == "finished"
    trained_on = torch.load(ckpt, weights_only=False)["train_families"]

    monkeypatch.chdir(tmp_path)  # a relative path to the same data is the same run, not another config
    assert run_status(config(exp, "data", "runs"), 0) == ("finished", "")
    state, detail = run_status(config(exp, "data", "runs", "lr=0.3"), 0)
    assert state == "conflict" and "make_submission.py" in detail and "--runs" in detail and "lr" in detail

    move_in(held, data)
    state, detail = run_status(cfg, 0)
    assert state == "stale" and "4 families added" in detail, detail
    capsys.readouterr()
    assert grid.main([*argv, "--dry-run"]) == 0
    assert "1 runs: 0 finished, 1 to train" in capsys.readouterr().out
    assert grid.main(argv) == 0  # retrained on the new data
    assert run_status(cfg, 0)[0] == "finished"
    assert torch.load(ckpt, weights_only=False)["train_families"] > trained_on


def test_a_face_replaced_in_place_makes_a_finished_run_retrain(tmp_path, tiny_data):
    data, _ = data_with_held_back_families(tiny_data, tmp_path, n=0)
    out = tmp_path / "runs"
    exp = write_experiment(tmp_path / "r.py", epochs=1)
    sets = ["--set", f"data_root={data}", "--set", f"out_root={out}"]
    assert train.main(["-C", str(exp), "--quiet", *sets]) == 0
    cfg = config(exp, data, out)
    ckpt = cfg.run_dir(0) / "checkpoint.pt"
    first = ckpt.stat().st_mtime_ns
    images = sorted((data / "train").rglob("*.jpg"), key=lambda p: p.stat().st_size)
    swap_in(images[-1], images[0])
    state, detail = run_status(cfg, 0)
    assert state == "stale" and "1 image changed" in detail, detail
    assert train.main(["-C", str(exp), "--quiet", *sets]) == 0  # no flag needed: the run is built again
    assert ckpt.stat().st_mtime_ns != first and run_status(cfg, 0)[0] == "finished"


@pytest.mark.slow
def test_an_interrupted_run_is_not_resumed_on_changed_data(tmp_path, tiny_data, monkeypatch):
    data, held = data_with_held_back_families(tiny_data, tmp_path)
    out = tmp_path / "runs"
    exp = write_experiment(tmp_path / "k.py", epochs=2)
    sets = ["--set", f"data_root={data}", "--set", f"out_root={out}"]
    real = trainer_module.save_run

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(trainer_module, "save_run", save_then_die)
    with pytest.raises(Killed):
        train.main(["-C", str(exp), "--quiet", *sets])
    monkeypatch.setattr(trainer_module, "save_run", real)
    move_in(held, data)
    assert run_status(config(exp, data, out), 0)[0] == "stale"
    assert train.main(["-C", str(exp), "--quiet", "--resume", *sets]) == 0
    assert train.main(["-C", str(exp), "--quiet", "--set", "name=fresh", *sets]) == 0
    resumed = torch.load(out / "k" / "fold0" / "checkpoint.pt", weights_only=False)
    fresh = torch.load(out / "fresh" / "fold0" / "checkpoint.pt", weights_only=False)
    assert resumed["train_families"] == fresh["train_families"]
    assert all(torch.equal(fresh["model"][k], resumed["model"][k]) for k in fresh["model"])
