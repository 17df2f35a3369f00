"""One commit point per epoch: a run killed between any two of an epoch's writes (checkpoint, summary, state) is not
reported finished before it is resumed, and resumed it ends finished with the weights and summary of an
uninterrupted run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import write_experiment

from kinret.models.config import apply_overrides
from kinret.train import checkpointing, grid
from kinret.train import cli as train
from kinret.train.experiments import load_experiment
from kinret.train.runs import run_status

WRITES = ("save_checkpoint", "write_summary", "write_state")
TIMING = ["images_per_s", "seconds"]  # measured, so never equal between two runs


class Killed(BaseException):
    """Stands for a kill: nothing in the kit catches it."""


def kill_after(monkeypatch, n: int) -> None:
    """Make the n-th write of a run (counting checkpoint, summary and state writes) the last one."""
    count = [0]
    for name in WRITES:
        real = getattr(checkpointing, name)

        def write(*args, _real=real, **kwargs):
            _real(*args, **kwargs)
            count[0] += 1
            if count[0] == n:
                raise Killed

        monkeypatch.setattr(checkpointing, name, write)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("whole")
    exp = write_experiment(out / "c.py", epochs=2)
    assert train.main(["-C", str(exp), "--quiet", "--set", f"data_root={tiny_data}", "--set", f"out_root={out}"]) == 0
    run_dir = out / "c" / "fold0"
    return exp, torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"], pd.read_csv(run_dir / "summary.csv")


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 4, 5])  # 3 writes an epoch: after its checkpoint, after its summary
def test_a_kill_between_the_writes_of_an_epoch_resumes_to_the_same_run(n, whole, tmp_path, tiny_data, monkeypatch,
                                                                        capsys):
    exp, weights, summary = whole
    out = tmp_path / "runs"
    sets = ["--set", f"data_root={tiny_data}", "--set", f"out_root={out}"]
    with monkeypatch.context() as m:
        kill_after(m, n)
        with pytest.raises(Killed):
            train.main(["-C", str(exp), "--quiet", *sets])
    cfg = apply_overrides(load_experiment(str(exp))[0], [f"data_root={tiny_data}", f"out_root={out}"])
    assert run_status(cfg, 0)[0] == "partial"  # not finished until the derived files agree with the checkpoint
    capsys.readouterr()
    assert grid.main(["-C", str(exp), "--quiet", "--folds", "0", *sets]) == 0  # what make_submission.py runs
    assert run_status(cfg, 0) == ("finished", "")
    run_dir = cfg.run_dir(0)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["epoch"] == 2
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    got = pd.read_csv(run_dir / "summary.csv")
    pd.testing.assert_frame_equal(got.drop(columns=TIMING), summary.drop(columns=TIMING))
    assert state["last"]["average"] == got["average"].iloc[-1]
