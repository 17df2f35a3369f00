"""Experiment configs: frozen defaults, typed overrides checked against the fields, experiment files and grids."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, apply_overrides, config_from_dict
from kinret.train.experiments import EXPERIMENTS_DIR, expand, load_experiment


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(TrainConfig(), ["lr=0.5", "epochs=3", "augment=false", "head_widths=64,32", "loss=focal"])
    assert (cfg.lr, cfg.epochs, cfg.augment, cfg.head_widths, cfg.loss) == (0.5, 3, False, (64, 32), "focal")
    assert TrainConfig().lr == 1e-2  # the shared default is never mutated
    with pytest.raises(ValueError, match="no such config field"):
        apply_overrides(TrainConfig(), ["lrr=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(TrainConfig(), ["epochs=two"])
    with pytest.raises(ValueError, match="expected a boolean"):
        apply_overrides(TrainConfig(), ["augment=maybe"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(TrainConfig(), ["epochs"])
    with pytest.raises(ValueError, match="mode="):
        apply_overrides(TrainConfig(), ["mode=both"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


def test_config_round_trips_through_json():
    cfg = apply_overrides(TrainConfig(), ["head_widths=8,4", "freeze=stem,layer1"])
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("path", sorted(EXPERIMENTS_DIR.glob("[!_]*.py")), ids=lambda p: p.stem)
def test_every_shipped_experiment_loads_and_expands(path):
    cfg, grid = load_experiment(path.stem)
    assert cfg.name == path.stem
    jobs = expand(cfg, grid)
    assert jobs and len({(c.name, f) for c, f, _ in jobs}) == len(jobs)  # every run has its own folder


def test_experiment_files_by_path_and_errors(tmp_path):
    good = tmp_path / "mine.py"
    good.write_text("from dataclasses import replace\nfrom kinret.models.config import TrainConfig\n"
                    "cfg = replace(TrainConfig(), epochs=2)\nGRID = {'loss': ['bce', 'focal'], 'fold': [0]}\n")
    cfg, grid = load_experiment(str(good))
    assert (cfg.name, cfg.epochs) == ("mine", 2)
    jobs = expand(cfg, grid)
    assert [(c.name, c.loss, f) for c, f, _ in jobs] == [("mine/bce", "bce", 0), ("mine/focal", "focal", 0)]
    single = tmp_path / "single.py"  # no GRID: the grid trains the folders `kinret.train -C single` writes
    single.write_text("from kinret.models.config import TrainConfig\ncfg = TrainConfig(n_folds=2)\n")
    cfg, grid = load_experiment(str(single))
    assert [(c.run_dir(f), sets) for c, f, sets in expand(cfg, grid)] == [(cfg.run_dir(0), ()), (cfg.run_dir(1), ())]
    (tmp_path / "nocfg.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="must define `cfg"):
        load_experiment(str(tmp_path / "nocfg.py"))
    (tmp_path / "badgrid.py").write_text("from kinret.models.config import TrainConfig\ncfg = TrainConfig()\n"
                                         "GRID = {'colour': ['red']}\n")
    with pytest.raises(ValueError, match="'colour' is not a config field"):
        load_experiment(str(tmp_path / "badgrid.py"))
    with pytest.raises(KinretInputError, match="known: .*tiny"):
        load_experiment("no_such_experiment")


@pytest.mark.parametrize("item", ["input_size=-5", "embed_dim=-1", "head_widths=16,0", "dropout=1.5", "flip_p=-0.1",
                                  "focal_alpha=2", "momentum=1.5", "min_lr_ratio=3", "pairs_per_epoch=0",
                                  "images_per_family=0", "n_folds=1", "eval_pairs=0", "eval_batch_size=0",
                                  "threads=-2", "lr=0", "lr=nan", "weight_decay=-1", "warmup_epochs=-1", "gem_p=0",
                                  "scale=0", "temperature=0", "margin=-0.5", "focal_gamma=-1", "color_jitter=-0.2",
                                  "affine_degrees=-5", "affine_translate=1.5", "affine_scale=-0.1",
                                  "backbone_lr_mult=-1", "batch_size=1", "epochs=0", "name=", "name=a/../b"])
def test_bad_field_values_are_refused_naming_the_field(item):
    key, _, value = item.partition("=")
    with pytest.raises(KinretInputError) as err:
        apply_overrides(TrainConfig(), [item])
    assert err.value.path is None and f"{key}=" in str(err.value)


def test_edge_values_are_accepted():
    cfg = apply_overrides(TrainConfig(), ["input_size=0", "embed_dim=0", "dropout=0", "flip_p=1", "focal_alpha=0",
                                          "momentum=0", "min_lr_ratio=1", "warmup_epochs=0", "seed=-3",
                                          "fold_seed=-1", "threads=0", "backbone_lr_mult=0",
                                          "affine_degrees=0", "color_jitter=0", "n_folds=2", "weight_decay=0",
                                          "eval_pairs=1"])
    assert cfg.input_size == 0 and cfg.seed == -3
