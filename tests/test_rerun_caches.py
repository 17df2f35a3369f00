"""Caches are keyed on the content of the images, not on their path, size and modification time: a face copied over
another, padded to the old size and given back its old mtime must not be served from the old cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_fiw, write_image

from kinret.data import pixels
from kinret.data.fiw import read_fiw
from kinret.data.pixels import ImageTable, decode_pixels, file_list_digest
from kinret.features.frozen import FrozenPass
from kinret.features.sources import ImageSet


def swap_in(target: Path, other: Path) -> None:
    """Copy `other`'s bytes over `target`, zero-padded to target's old size, and restore target's times."""
    st = target.stat()
    data = other.read_bytes()
    assert len(data) < st.st_size, "the replacement must be smaller than the image it replaces"
    target.write_bytes(data + b"\0" * (st.st_size - len(data)))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


@pytest.fixture
def faces(tmp_path):
    root = make_fiw(tmp_path / "train", {"F0001": [2, 2], "F0002": [2, 1]})
    table = ImageTable.from_families(read_fiw(root))
    write_image(table.paths[0], seed=4242, size=24)  # larger than the 16 px faces: another face fits inside it
    return table


def test_pixel_cache_sees_a_face_swapped_in_at_the_same_size_and_mtime(tmp_path, faces):
    cache = tmp_path / "cache"
    first = np.array(decode_pixels(faces.paths, 8, cache))
    swap_in(faces.paths[0], faces.paths[-1])
    again = decode_pixels(faces.paths, 8, cache)
    fresh = decode_pixels(faces.paths, 8, None)
    assert np.array_equal(fresh[0], fresh[-1]) and not np.array_equal(fresh[0], first[0])
    assert np.array_equal(again, fresh)  # the new face, not the cached old one
    assert len(list(cache.glob("pixels_*.npy"))) == 2


def test_feature_and_source_keys_follow_the_content(faces):
    data_cfg = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    paths = faces.paths
    def feature_key() -> str:
        return FrozenPass(torch.nn.Identity(), "w" * 16, data_cfg, "t", runtime="torch-fp32").key(
            file_list_digest(paths))

    before = (file_list_digest(paths), feature_key(),
              ImageSet("test", paths, tuple(p.name for p in paths)).digest)
    swap_in(paths[0], paths[-1])
    after = (file_list_digest(paths), feature_key(),
             ImageSet("test", paths, tuple(p.name for p in paths)).digest)
    assert all(a != b for a, b in zip(before, after, strict=True))


def test_unchanged_files_keep_their_key_and_are_not_rehashed_in_one_process(tmp_path, faces, monkeypatch):
    monkeypatch.setattr(pixels, "RACY_NS", 0)  # trust a hash of a file changed just before it was taken
    time.sleep(0.05)
    key = file_list_digest(faces.paths)
    reads = []
    real = pixels._hash_file
    monkeypatch.setattr(pixels, "_hash_file", lambda p: reads.append(p) or real(p))
    assert file_list_digest(faces.paths) == key
    assert file_list_digest(faces.paths, "x") != key
    assert pixels.content_hashes(faces.paths) == pixels.content_hashes(faces.paths)
    assert reads == []  # verified against (size, mtime, ctime, inode), hashed only once
    swap_in(faces.paths[0], faces.paths[-1])  # utime cannot restore the ctime: the changed file is hashed again
    time.sleep(0.05)
    assert file_list_digest(faces.paths) != key and reads == [faces.paths[0]]


def test_fingerprinting_is_fast(tmp_path):
    """Hashing thousands of small JPEGs takes well under a second a thousand files (printed with -s)."""
    root = make_fiw(tmp_path / "train", {f"F{i:04d}": [25, 25] for i in range(1, 21)})  # 1,000 images
    paths = ImageTable.from_families(read_fiw(root)).paths
    t0 = time.perf_counter()
    hashes = pixels.content_hashes(paths)
    seconds = time.perf_counter() - t0
    print(f"content hashes of {len(paths)} images: {seconds:.3f} s")
    assert len(set(hashes)) == len(paths) and seconds < 5
