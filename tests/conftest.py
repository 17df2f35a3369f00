"""Shared fixtures: tiny FIW-like folders of random images, written per test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINRET_NO_PROGRESS", "1")
REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "rfiw_test_index"


def write_image(path: Path, seed: int, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_fiw(root: Path, sizes: dict[str, list[int]], seed: int = 0) -> Path:
    """sizes: fid -> images per member, e.g. {"F0001": [2, 3], "F0002": [1]}."""
    k = seed * 10_000
    for fid, members in sizes.items():
        for m, n in enumerate(members, start=1):
            for i in range(n):
                k += 1
                write_image(root / fid / f"MID{m}" / f"P{k:05d}_face{i + 1}.jpg", k)
    return root


@pytest.fixture
def fiw_root(tmp_path: Path) -> Path:
    return make_fiw(tmp_path / "train", {"F0001": [2, 3, 1], "F0002": [2, 2], "F0003": [4], "F0010": [1, 1, 2, 1]})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic FIW dataset (12 train, 4 val, 4 test families at 48 px), generated once per session."""
    from kinret.data.synth import SynthConfig, generate

    return generate(tmp_path_factory.mktemp("tiny") / "synthetic",
                    SynthConfig(seed=3, n_train=12, n_val=4, n_test=4, size=48))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A smaller synthetic set (8 train, 2 val, 3 test families, 135 faces at 32 px) for whole runs repeated many
    times or through worker processes, generated once per session."""
    from kinret.data.synth import SynthConfig, generate

    return generate(tmp_path_factory.mktemp("small") / "synthetic",
                    SynthConfig(seed=3, n_train=8, n_val=2, n_test=3, size=32, max_members=5, max_images=3))


def write_experiment(path: Path, **fields) -> Path:
    """An experiment file deriving from the `tiny` experiment, with these fields replaced."""
    body = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    path.write_text("from dataclasses import replace\n\nfrom kinret.train.experiments import load_experiment\n\n"
                    f"cfg = replace(load_experiment('tiny')[0], name={path.stem!r}, {body})\n")
    return path


def mutate(raw: bytes, rng, max_cut: int = 30) -> bytes:
    """`raw` with 1-3 random byte edits: a byte overwritten, a run of up to `max_cut` bytes cut, or a few inserted."""
    data = bytearray(raw)
    for _ in range(int(rng.integers(1, 4))):
        at = int(rng.integers(len(data)))
        op = rng.integers(3)
        if op == 0:
            data[at] = int(rng.integers(256))
        elif op == 1:
            del data[at:at + int(rng.integers(1, max_cut))]
        else:
            data[at:at] = rng.bytes(int(rng.integers(1, 8)))
    return bytes(data)

