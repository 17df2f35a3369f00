"""A run's thread count is fixed when it starts: resumed through the grid, which would give it another count (its
cores shared by --jobs), it ends with the weights of an uninterrupted run, tensor for tensor."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_experiment

from kinret.train import cli as train
from kinret.train import grid
from kinret.train import trainer as trainer_module


class Killed(BaseException):
    """Stands for a kill: nothing in the kit catches it."""


@pytest.mark.slow
def test_a_run_resumed_by_the_grid_keeps_its_thread_count(tmp_path, tiny_data, monkeypatch):
    exp = write_experiment(tmp_path / "t.py", epochs=2, eval_pairs=20, threads=2)
    out = tmp_path / "runs"
    sets = ["--set", f"data_root={tiny_data}", "--set", f"out_root={out}"]
    assert train.main(["-C", str(exp), "--quiet", "--set", "name=whole", *sets]) == 0
    real = trainer_module.save_run

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(trainer_module, "save_run", save_then_die)
    with pytest.raises(Killed):  # epoch 1 of 2 trained with 2 threads, then killed
        train.main(["-C", str(exp), "--quiet", *sets])
    monkeypatch.setattr(trainer_module, "save_run", real)
    monkeypatch.setattr(grid.os, "cpu_count", lambda: 1)  # the grid alone on one core gives it one thread
    assert grid.main(["-C", str(exp), "--quiet", "--folds", "0", *sets]) == 0
    run_dir = out / "t" / "fold0"
    assert json.loads((run_dir / "state.json").read_text())["finished"]
    whole = torch.load(out / "whole" / "fold0" / "checkpoint.pt", weights_only=False)["model"]
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"{len(differ)} of {len(whole)} tensors differ, e.g. {differ[:3]}"
    assert json.loads((run_dir / "config.json").read_text())["threads"] == 2
