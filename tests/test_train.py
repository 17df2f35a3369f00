"""The trainer end to end on tiny synthetic data: outputs, refusal to overwrite, resume after a kill, DDP against
one process, head-only feature caching and the grid runner."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_experiment

from kinret.errors import KinretInputError
from kinret.features import frozen
from kinret.train import cli as train
from kinret.train import grid
from kinret.train.experiments import experiment_runs


def run(exp, data, out, *extra) -> int:
    return train.main(["-C", str(exp), "--quiet", "--set", f"data_root={data}", "--set", f"out_root={out}", *extra])


def weights(out, name, fold=0):
    return torch.load(out / name / f"fold{fold}" / "checkpoint.pt", weights_only=False)["model"]


def test_tiny_run_writes_its_outputs(tmp_path, tiny_data):
    exp = write_experiment(tmp_path / "e2e.py")
    assert run(exp, tiny_data, tmp_path / "runs") == 0
    run_dir = tmp_path / "runs" / "e2e" / "fold0"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.json", "data.json", "embeddings",
                                                        "state.json", "summary.csv"]
    assert [p.name.split("_")[0] for p in (run_dir / "embeddings").iterdir()] == ["oof0"]  # kept for the scorer
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # epoch 0: the held-out scores before any step
    for r in rows:  # every column is a real number: the held-out protocol and pairs exist for fold 0
        assert all(0 <= float(r[k]) <= 1 for k in ("pair_auc_cos", "pair_auc_fc", "mAP", "rank5", "average"))
        assert r["epoch"] == "0" or float(r["train_loss"]) > 0 and float(r["images_per_s"]) > 0
    assert rows[0]["train_loss"] == "nan"
    assert json.loads((run_dir / "config.json").read_text())["backbone"] == "test_resnet"
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True
    before = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    assert run(exp, tiny_data, tmp_path / "runs") == 0  # finished: nothing retrained
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == before
    assert run(exp, tiny_data, tmp_path / "runs", "--set", "lr=0.2") == 2  # another config: refused
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == before
    assert run(exp, tiny_data, tmp_path / "runs", "--set", "lr=0.2", "--restart") == 0


def test_finished_checkpoint_drops_the_optimizer_and_still_resumes(tmp_path, tiny_data):
    exp = write_experiment(tmp_path / "fin.py", epochs=1)
    assert run(exp, tiny_data, tmp_path / "runs") == 0
    run_dir = tmp_path / "runs" / "fin" / "fold0"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["optimizer"] is None and ckpt["epoch"] == 1  # a finished run is never resumed: no moments kept
    (run_dir / "state.json").unlink()  # killed after the last checkpoint's rename, before its state was written
    assert run(exp, tiny_data, tmp_path / "runs", "--resume") == 0
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True
    assert all(torch.equal(ckpt["model"][k], v) for k, v in weights(tmp_path / "runs", "fin").items())


def test_same_seed_same_weights_and_fold_minus_one_uses_val(tmp_path, tiny_data, monkeypatch, capsys):
    exp = write_experiment(tmp_path / "rep.py", epochs=1)
    assert run(exp, tiny_data, tmp_path / "a") == 0 and run(exp, tiny_data, tmp_path / "b") == 0
    wa, wb = weights(tmp_path / "a", "rep"), weights(tmp_path / "b", "rep")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert run(exp, tiny_data, tmp_path / "a", "--set", "seed=1") == 0  # another seed: its own folder, other weights
    w1 = torch.load(tmp_path / "a" / "rep" / "fold0_seed1" / "checkpoint.pt", weights_only=False)["model"]
    assert not all(torch.equal(wa[k], w1[k]) for k in wa)
    monkeypatch.chdir(tiny_data.parent)  # a relative data root, as users pass it
    assert run(exp, tiny_data.name, tmp_path / "a", "--fold", "-1") == 0
    row = json.loads((tmp_path / "a" / "rep" / "fold-1" / "state.json").read_text())["last"]
    assert 0 <= row["average"] <= 1  # scored on the val split's own lists
    assert run(exp, tiny_data, tmp_path / "a", "--fold", "5") == 2
    assert train.main(["-C", str(exp), "--set", "lr=0.3", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "* lr = 0.3" in shown and "  momentum = 0.9" in shown and "* backbone = 'test_resnet'" in shown
    assert train.main(["-C", "no_such_experiment", "--quiet"]) == 2
    assert train.main(["-C", str(exp), "--quiet", "--set", "epochs=many"]) == 2


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_data):
    exp = write_experiment(tmp_path / "kill.py", epochs=3, pairs_per_epoch=768, eval_pairs=20)
    out = tmp_path / "runs"
    assert run(exp, tiny_data, out, "--set", "name=whole") == 0
    cmd = [sys.executable, "-m", "kinret.train", "-C", str(exp), "--quiet", "--set", f"data_root={tiny_data}",
           "--set", f"out_root={out}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "KINRET_NO_PROGRESS": "1"})
    state = out / "kill" / "fold0" / "state.json"
    deadline = time.monotonic() + 120
    while not state.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # well inside epoch 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed: make its epochs longer"
    saved = json.loads(state.read_text())
    assert saved["epoch"] < 3 and not saved["finished"]
    assert run(exp, tiny_data, out) == 2  # an unfinished run needs --resume (or --restart)
    assert run(exp, tiny_data, out, "--resume") == 0
    whole, resumed = weights(out, "whole"), weights(out, "kill")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows = list(csv.DictReader((out / "kill" / "fold0" / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tiny_data):
    exp = write_experiment(tmp_path / "ddp.py", mode="head", neck="residual", dropout=0.0, epochs=2)
    out = tmp_path / "runs"
    assert run(exp, tiny_data, out, "--set", "name=single") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kinret.train", "-C",
           str(exp), "--quiet", "--set", f"data_root={tiny_data}", "--set", f"out_root={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KINRET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    single, ddp = weights(out, "single"), weights(out, "ddp")
    diff = max((single[k] - ddp[k]).abs().max().item() for k in single)
    print(f"largest weight difference, 2-process DDP (gloo) vs one process: {diff:.2e}")
    assert diff < 1e-5
    assert any((single[k] != 0).any() for k in single if k.startswith("neck"))  # the neck did move


def test_head_only_features_are_computed_once(tmp_path, tiny_data, monkeypatch):
    out = tmp_path / "runs"
    exp = write_experiment(tmp_path / "head.py", mode="head", pool="gem")
    assert run(exp, tiny_data, out) == 0
    (folder,) = (out / "_cache").glob("frozen_*")
    assert {"ids.npy", "avg.npy", "max.npy", "gem.npy"} <= {p.name for p in folder.iterdir()}
    assert __import__("numpy").load(folder / "gem.npy").shape[0] == 2

    def forbidden(*args, **kwargs):
        raise AssertionError("features recomputed although cached")

    monkeypatch.setattr(frozen, "forward_pooled", forbidden)
    for loss, neck in (("focal", "none"), ("supcon", "residual")):  # other losses/folds reuse the same features
        assert run(exp, tiny_data, out, "--set", f"name=h_{loss}", "--set", f"loss={loss}", "--set",
                   f"neck={neck}", "--fold", "1") == 0
    assert run(exp, tiny_data, out, "--set", "name=h_bad", "--set", "loss=supcon") == 2  # nothing to train


def test_grid_trains_every_variant_once(tmp_path, tiny_data, capsys):
    exp = tmp_path / "g.py"
    exp.write_text("from dataclasses import replace\nfrom kinret.train.experiments import load_experiment\n"
                   f"cfg = replace(load_experiment('tiny')[0], name='g', mode='head', epochs=1, "
                   f"data_root={str(tiny_data)!r}, out_root={str(tmp_path / 'runs')!r})\n"
                   "GRID = {'loss': ['bce', 'focal'], 'combination': ['comb1', 'comb2'], 'fold': [0, 1]}\n")
    assert grid.main(["-C", str(exp), "--quiet"]) == 0
    table = (tmp_path / "runs" / "g" / "grid_summary.csv").read_text().splitlines()
    assert len(table) == 1 + 8 and table[1].startswith("g/bce-comb1,0,1,")
    assert sorted(p.name for p in (tmp_path / "runs" / "g").iterdir()) == [
        "bce-comb1", "bce-comb2", "focal-comb1", "focal-comb2", "grid_summary.csv"]
    capsys.readouterr()
    assert grid.main(["-C", str(exp), "--dry-run"]) == 0
    assert "8 runs: 8 finished, 0 to train" in capsys.readouterr().out
    assert grid.main(["-C", str(exp), "--set", "lr=0.3", "--dry-run"]) == 2  # folders of another config
    assert grid.main(["-C", str(exp), "--folds", "1", "--dry-run"]) == 0
    assert "4 runs: 4 finished, 0 to train" in capsys.readouterr().out
    assert grid.main(["-C", str(exp), "--folds", "7", "--dry-run"]) == 2  # no such fold


def test_grid_by_default_trains_heads_in_workers_and_networks_here(tmp_path, tiny_data, monkeypatch):
    out = tmp_path / "runs"
    heads = experiment_runs(str(write_experiment(tmp_path / "h.py", mode="head", epochs=1)), tiny_data, out)[1]
    e2e = experiment_runs(str(write_experiment(tmp_path / "e.py", epochs=1)), tiny_data, out)[1]
    runs = [heads[0], e2e[0], heads[1]]
    cores = os.cpu_count()
    assert grid.plan_text(runs, None) == (f"head-only {grid.default_jobs()} at a time, end to end "
                                         f"one at a time with {cores} core(s)")
    assert grid.plan_text(runs, 3) == "3 at a time" and grid.plan_text(e2e[:1], 0).startswith("one at a time")
    here, real = [], grid.train_in_process

    def spy(cfg, fold, quiet, verbose):
        here.append((cfg["name"], fold, cfg["threads"]))
        return real(cfg, fold, quiet, verbose)

    monkeypatch.setattr(grid, "train_in_process", spy)  # this process only: the workers import their own
    assert grid.train_grid(runs, None, quiet=True) == {0: 0, 1: 0, 2: 0}
    assert here == [("e", 0, os.cpu_count())]  # the network here with every core; both heads in the workers
    assert len(list((out / "_cache").glob("frozen_*"))) == 1  # built once, before the workers started
    assert all(json.loads((r.run_dir / "state.json").read_text())["finished"] for r in runs)
    for _ in range(600):  # idle, a worker ends by itself (grid.WORKER_IDLE_SECONDS) instead of holding its memory
        workers = [p for p in Path("/proc").glob("[0-9]*") if _worker_of(p, os.getpid())]
        if not workers:
            break
        time.sleep(0.1)
    assert not workers


def _worker_of(proc: Path, parent: int) -> bool:
    """Whether /proc entry `proc` is a joblib worker process of `parent` (not one of its resource trackers)."""
    try:
        stat, cmdline = (proc / "stat").read_text(), (proc / "cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return False
    return int(stat[stat.rindex(")") + 2:].split()[1]) == parent and b"LokyProcess" in cmdline


def test_large_end_to_end_runs_train_the_odd_one_here_then_the_rest_in_workers(tmp_path, tiny_data, monkeypatch):
    out = tmp_path / "runs"
    e2e = experiment_runs(str(write_experiment(tmp_path / "e.py", epochs=2, n_folds=3)), tiny_data, out)[1]
    heads = experiment_runs(str(write_experiment(tmp_path / "h.py", mode="head", epochs=1)), tiny_data, out)[1]
    seen = grid.epoch_images(e2e[0])
    assert seen > 0 and seen % 2 == 0  # the fold's training images, twice (two epochs)
    workers = grid.default_jobs()
    def slots(runs, jobs):
        return [(s.positions, s.processes) for s in grid.schedule(runs, jobs)]

    assert slots(e2e, None) == [([0, 1, 2], 1)]  # small: one at a time here
    monkeypatch.setattr(grid, "LARGE_RUN_IMAGES", seen)
    if workers < 2:
        pytest.skip("one core: every run trains here")
    assert slots(e2e, None) == [([0], 1), ([1, 2], 2)]
    assert slots(e2e[:2], None) == [([0, 1], 2)]
    assert slots(heads + e2e, None) == [([0, 1], 2), ([2], 1), ([3, 4], 2)]
    assert slots(e2e, 3) == [([0, 1, 2], 3)]
    cores = os.cpu_count()
    assert grid.plan_text(e2e, None) == f"1 alone with {cores} core(s), then 2 at a time"
    assert grid.plan_text(heads + e2e, None) == (f"head-only 2 at a time, end to end 1 alone with {cores} core(s), "
                                                 "then 2 at a time")
    trained = []
    monkeypatch.setattr(grid, "_train_rest", lambda rest, n, *a: trained.append(([r.fold for r in rest], n))
                        or dict.fromkeys(range(len(rest)), 0))
    assert grid.train_grid(e2e, None, quiet=True) == {0: 0, 1: 0, 2: 0}
    assert trained == [([0], 1), ([1, 2], 2)]


def test_checkpoints_rebuild_the_trained_model(tmp_path, tiny_data):
    from kinret.features.feeds import load_model

    out = tmp_path / "runs"
    for name, extra in (("e", []), ("h", ["--set", "mode=head", "--set", "neck=residual"])):
        exp = write_experiment(tmp_path / f"{name}.py", epochs=1)
        assert run(exp, tiny_data, out, *extra) == 0
        model, cfg, data_cfg = load_model(out / name / "fold0")
        assert cfg.name == name and data_cfg["input_size"] == (3, 32, 32)
        trained = weights(out, name)
        state = model.state_dict()
        assert all(torch.equal(trained[k], state[k]) for k in trained)
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, model.embed_dim)
    torch.save({**torch.load(out / "h" / "fold0" / "checkpoint.pt", weights_only=False), "backbone_digest": "0" * 16},
               out / "h" / "fold0" / "checkpoint.pt")
    with pytest.raises(ValueError, match="other weights"):
        load_model(out / "h" / "fold0")
    with pytest.raises(KinretInputError, match="train this run first"):
        load_model(out / "nothing" / "fold0")


def test_equal_checkpoints_are_equal_bytes(tmp_path):
    """A checkpoint's bytes follow its contents, not the temporary name it was written under (a rewritten checkpoint
    with the same weights keeps the key of the embeddings cached from it)."""
    from kinret.train.checkpointing import load_checkpoint, save_checkpoint

    ckpt = {"model": {"w": torch.arange(4.0)}, "epoch": 1, "step": 2, "rows": [], "config": {}, "fold": 0,
            "data_config": {}}
    for name in ("a", "b"):
        save_checkpoint(tmp_path / name, ckpt)
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == (tmp_path / "b" / "checkpoint.pt").read_bytes()
    assert torch.equal(load_checkpoint(tmp_path / "a")["model"]["w"], ckpt["model"]["w"])
