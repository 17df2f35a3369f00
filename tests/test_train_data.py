"""Training data: pair and family sampling, batched augmentation (seeded, DDP-sliceable), the lr schedule and the
decoded-pixel cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image

from kinret.data.fiw import read_fiw
from kinret.data.pixels import ImageTable, decode_pixels, gather
from kinret.models.config import TrainConfig
from kinret.train.sampling import augment, family_batches, sample_pairs
from kinret.train.trainer import lr_factor


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
