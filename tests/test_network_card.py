"""A warm run builds no network: once a frozen network was built here its card is recorded, and the next process
names its frozen pass (and reads the pass's outputs) from the card alone; the network is built again when something
is computed, when what it is built from changes, and, with one warning, when its record is damaged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import write_image

from kinret.features import sources
from kinret.features.image_set import ImageSet
from kinret.features.network import recorded_card, source_id
from kinret.models.config import TrainConfig

CFG = replace(TrainConfig(), backbone="test_resnet", input_size=32, threads=1, flip_views=False)


def test_a_second_process_names_and_reads_the_pass_from_the_card(tmp_path, monkeypatch, caplog):
    paths = tuple(write_image(tmp_path / "img" / f"{i}.png", i, size=32) for i in range(4))
    images = ImageSet("s", paths, tuple(p.name for p in paths))
    cache = tmp_path / "cache"
    first = sources.BackboneSource(CFG, cache)
    want, key = first.embeddings(images), first.key(images)
    card = recorded_card(CFG, cache)
    assert card is not None and card.digest == first.features.digest and not card.graph and not card.native

    def forbidden(*args, **kwargs):
        raise AssertionError("the network was built")

    with monkeypatch.context() as m:  # a new process: nothing built yet
        m.setattr(sources, "shared_backbone", forbidden)
        second = sources.BackboneSource(CFG, cache)
        assert second.key(images) == key
        got = second.embeddings(images)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    other = paths[:3]  # something to compute: the network is built then
    assert sources.BackboneSource(CFG, cache).embeddings(ImageSet("t", other, other))["avg"].shape[0] == 3
    assert source_id(replace(CFG, seed=1)) != source_id(CFG) and source_id(replace(CFG, input_size=48)) != source_id(
        CFG)
    assert source_id(replace(CFG, pretrained=True)) is None  # hub weights: only building tells
    (record,) = (cache / "networks").glob("*.json")
    record.write_text("{not json")
    assert recorded_card(CFG, cache) is None
    assert "damaged" in caplog.text and str(record) in caplog.text
    assert sources.BackboneSource(CFG, cache).key(images) == key  # built again, and recorded again
    assert recorded_card(CFG, cache) == card


@pytest.mark.parametrize("weights", ["model.pth"])
def test_a_weights_file_names_its_network_by_its_content(tmp_path, weights):
    path = tmp_path / weights
    path.write_bytes(b"one")
    cfg = replace(CFG, weights=str(path))
    before = source_id(cfg)
    path.write_bytes(b"two")
    assert source_id(cfg) != before and source_id(replace(cfg, weights=str(tmp_path / "gone.pth"))) is None
