"""Training data: pair and family sampling, what each loss kind draws for an epoch and how it slices a batch over DDP
processes (checked against the samplers called directly), every loss through the trainer's objective, batched
augmentation (seeded, DDP-sliceable), the lr schedule and the decoded-pixel cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image

from kinret.data.fiw import read_fiw
from kinret.data.pixels import ImageTable, decode_pixels, gather
from kinret.features.augment import augment
from kinret.features.feeds import CachedFeatures
from kinret.models.config import TrainConfig, apply_overrides
from kinret.models.losses import LOSSES, TrainingSet, build_loss, family_batches, random_batches, sample_pairs
from kinret.models.networks import KinNet
from kinret.train.trainer import Objective, lr_factor


@pytest.fixture
def table():
    # 4 families: members per family 3, 2, 1, 2; images per member 2
    family = np.repeat([0, 0, 0, 1, 1, 2, 3, 3], 2)
    member = np.repeat(np.arange(8), 2)
    return family, member


def test_pairs_are_kin_and_non_kin(table):
    family, member = table
    rows = np.arange(len(family))
    a, b, y = sample_pairs(family, member, rows, 200, np.random.default_rng(0))
    assert len(a) == 400 and y.sum() == 200
    kin = y == 1
    assert (family[a[kin]] == family[b[kin]]).all() and (member[a[kin]] != member[b[kin]]).all()
    assert (family[a[~kin]] != family[b[~kin]]).all()
    assert not np.isin(family[a[kin]], [2]).any()  # a one-member family has no kin pair
    again = sample_pairs(family, member, rows, 200, np.random.default_rng(0))
    assert all(np.array_equal(u, v) for u, v in zip((a, b, y), again, strict=True))
    sub = np.flatnonzero(family != 1)  # a fold's training rows: pairs stay inside them
    a, b, _ = sample_pairs(family, member, sub, 50, np.random.default_rng(1))
    assert np.isin(a, sub).all() and np.isin(b, sub).all()
    with pytest.raises(ValueError, match="two members"):
        sample_pairs(family, member, np.flatnonzero(family == 2), 5, np.random.default_rng(0))


def test_family_batches(table):
    family, _ = table
    batches = family_batches(family, np.arange(len(family)), 8, 2, np.random.default_rng(0))
    assert len(batches) == 2 and all(len(b) == 8 for b in batches)
    for b in batches:
        fams, counts = np.unique(family[b], return_counts=True)
        assert (counts % 2 == 0).all()  # families come with `per_family` images each


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def training_set(family: np.ndarray, member: np.ndarray) -> TrainingSet:
    rows = np.flatnonzero(family != 1)  # family 1 held out; the others are training families 0, 1, 2
    label = np.array([-1 if f == 1 else {0: 0, 2: 1, 3: 2}[f] for f in family])
    return TrainingSet(family, member, rows, label)


def small_config(*overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), ["batch_size=4", "pairs_per_epoch=9", "images_per_family=2",
                                           "head_widths=8", "neck=residual", *overrides])


def test_each_kind_draws_the_batches_of_its_sampler(table):
    family, member = table
    data = training_set(family, member)
    for name in ("bce", "focal"):  # pairs: 9 kin + 9 non-kin pairs, cut into 4 full batches of 4 pairs
        got = build_loss(small_config(f"loss={name}"), 8, 3).epoch_batches(data, small_config(), rng(3))
        a, b, y = sample_pairs(family, member, data.rows, 9, rng(3))
        assert len(got) == 4
        for i, (rows, target) in enumerate(got):
            assert np.array_equal(rows, np.concatenate([a[4 * i:4 * i + 4], b[4 * i:4 * i + 4]]))
            assert np.array_equal(target, y[4 * i:4 * i + 4])
    for name in ("cosface", "supcon"):
        loss = build_loss(small_config(f"loss={name}"), 8, 3)
        for batching, want in (("families", family_batches(family, data.rows, 4, 2, rng(3))),
                               ("random", random_batches(data.rows, 4, rng(3)))):
            got = loss.epoch_batches(data, small_config(f"batching={batching}"), rng(3))
            assert len(got) == len(want) == 3, batching
            for (rows, target), expected in zip(got, want, strict=True):
                assert np.array_equal(rows, expected)
                assert np.array_equal(target, data.label[expected]) and (target >= 0).all()


def test_each_kind_slices_a_batch_as_one_block_or_two(table):
    family, member = table
    data = training_set(family, member)
    for name, world in (("bce", 2), ("bce", 3), ("cosface", 2), ("cosface", 3)):
        loss = build_loss(small_config(f"loss={name}", "batch_size=6"), 8, 3)
        rows, target = loss.epoch_batches(data, small_config("batch_size=6"), rng(0))[0]
        n, per = len(target), len(target) // world
        for rank in range(world):
            sl = slice(rank * per, (rank + 1) * per)
            local = loss.local_batch((rows, target), rank, world)
            if name == "bce":  # the first images, then the second images, of the same pairs
                want_rows = np.concatenate([rows[:n][sl], rows[n:][sl]])
                want_pos = np.concatenate([np.arange(n)[sl], n + np.arange(n)[sl]])
            else:
                want_rows, want_pos = rows[sl], np.arange(n)[sl]
            assert np.array_equal(local.rows, want_rows) and np.array_equal(local.positions, want_pos)
            assert np.array_equal(local.target, target[sl]) and local.total == len(rows)
            assert [len(block) for block in local.blocks] == [per] * (2 if name == "bce" else 1)


def test_every_loss_trains_through_the_objective_on_each_process(table):
    family, member = table
    data = training_set(family, member)
    features = torch.randn(len(family), 6, generator=torch.Generator().manual_seed(0))
    for name in LOSSES:
        cfg = small_config(f"loss={name}", "batch_size=8")  # each process: 4 pairs, or 2 families x 2 images
        torch.manual_seed(0)
        model = KinNet(None, 6, cfg)
        feed = CachedFeatures(cfg, torch.device("cpu"), Path("unused"))  # the model runs on pooled features
        objective = Objective(model, build_loss(cfg, model.embed_dim, 3), feed)
        batch = objective.loss.epoch_batches(data, cfg, rng(1))[0]
        for rank in range(2):
            local = objective.loss.local_batch(batch, rank, 2)
            model.zero_grad()
            out = objective(features[local.rows], torch.as_tensor(local.target))
            out.backward()
            assert out.ndim == 0 and torch.isfinite(out), name
            assert model.neck.linear.weight.grad is not None and model.neck.linear.weight.grad.abs().sum() > 0, name


def test_augment_is_seeded_and_sliceable():
    cfg = TrainConfig()
    x = torch.rand(6, 3, 16, 16)
    one = augment(x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(one, augment(x, cfg, torch.Generator().manual_seed(5)))
    assert not torch.allclose(one, augment(x, cfg, torch.Generator().manual_seed(6)))
    # a DDP process augments rows 2..4 of the global batch exactly as one process does
    part = augment(x[2:4], cfg, torch.Generator().manual_seed(5), offset=2, total=6)
    assert torch.allclose(part, one[2:4], atol=1e-6)
    assert one.min() >= 0 and one.max() <= 1


def test_lr_schedule():
    f = [lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.01, abs=1e-3)


def test_pixel_cache_is_keyed_by_the_files(tmp_path, fiw_root):
    table = ImageTable.from_families(read_fiw(fiw_root))
    cache = tmp_path / "cache"
    first = decode_pixels(table.paths, 8, cache)
    assert first.shape == (len(table), 8, 8, 3) and len(list(cache.glob("*.npy"))) == 1
    assert np.array_equal(decode_pixels(table.paths, 8, cache), first)
    write_image(table.paths[0], seed=999, size=20)  # a replaced image is never served from the old cache
    assert not np.array_equal(decode_pixels(table.paths, 8, cache)[0], first[0])
    assert len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob(".*tmp*"))


def test_gather_equals_fancy_indexing(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 2, 2, 3), dtype=np.uint8)
    np.save(tmp_path / "p.npy", pixels)
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")
    rows = np.array([7, 2, 2, 19, 0, 7])
    assert np.array_equal(gather(mapped, rows), pixels[rows])
