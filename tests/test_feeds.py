"""What a run consumes is a registered feed: each config shape has exactly one, a feed derived from another
overrides it for the configs it serves (a fourth way of consuming images is one class and one registry line), two
unrelated feeds serving one config are refused, and no module outside the feeds reads a config's mode."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO

from kinret.errors import KinretInputError
from kinret.features import feeds
from kinret.features.feeds import FEEDS, CachedFeatures, CachedPrefix, Pixels, feed_class
from kinret.models.config import TrainConfig

BASE = TrainConfig()


def test_every_config_shape_has_its_one_feed():
    assert feed_class(replace(BASE, mode="head", neck="residual")) is CachedFeatures
    assert feed_class(replace(BASE, mode="head", cache_prefix=True)) is CachedFeatures  # the prefix is an e2e word
    assert feed_class(replace(BASE, mode="e2e", cache_prefix=True)) is CachedPrefix
    assert feed_class(replace(BASE, mode="e2e")) is Pixels
    assert set(FEEDS) == {"features", "prefix", "pixels"}
    assert not CachedFeatures.trains_backbone and CachedPrefix.trains_backbone and Pixels.trains_backbone
    sface = replace(BASE, backbone="sface", pool="native", freeze_units=24, cache_prefix=True)
    assert [c.name for c in CachedPrefix.cuts(sface)] == ["cut24-float16"]
    assert [c.name for c in CachedPrefix.cuts(replace(sface, grey_p=0.5))] == ["cut24-float16", "cut24-float16-grey"]
    assert CachedPrefix.zero_shot(sface) and not Pixels.zero_shot(sface) and CachedFeatures.zero_shot(sface)
    assert CachedFeatures.embeddings(sface) == ["emb"]
    assert CachedPrefix.embeddings(sface) == ["emb", "avg", "max", "gem"]  # native is the embedding itself


def test_a_derived_feed_overrides_its_parent_and_unrelated_ones_are_refused(monkeypatch):
    class Tail(CachedPrefix):  # e.g. a cached prefix at a second cut: one class ...
        name = "tail"

        @staticmethod
        def serves(cfg: TrainConfig) -> bool:
            return CachedPrefix.serves(cfg) and cfg.freeze_units == 27

    monkeypatch.setitem(FEEDS, Tail.name, Tail)  # ... and one registry line
    assert feed_class(replace(BASE, cache_prefix=True, freeze_units=27)) is Tail
    assert feed_class(replace(BASE, cache_prefix=True, freeze_units=24)) is CachedPrefix

    class Other(Pixels):
        name = "other"

        @staticmethod
        def serves(cfg: TrainConfig) -> bool:
            return cfg.mode == "e2e" and cfg.cache_prefix

    monkeypatch.setitem(FEEDS, Other.name, Other)
    with pytest.raises(KinretInputError, match="is served by prefix, tail, other"):
        feed_class(replace(BASE, cache_prefix=True, freeze_units=27))


def test_no_module_outside_the_feeds_reads_the_consumption_mode():
    src = REPO / "src" / "kinret"
    allowed = {src / "features" / "feeds.py", src / "models" / "config.py"}  # the feeds, and the config's own words
    reads = re.compile(r"\.mode\b|\.cache_prefix\b|\bhead_only\b")
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in sorted(src.rglob("*.py")) if p not in allowed
             for i, line in enumerate(p.read_text().splitlines(), start=1) if reads.search(line)]
    assert not found, "\n".join(found)
    assert Path(feeds.__file__).resolve() == (src / "features" / "feeds.py").resolve()
