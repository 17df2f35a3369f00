from __future__ import annotations

import pytest
from conftest import write_image

from kinret.data.images import load_image, load_images
from kinret.errors import KinretInputError


def test_bad_images_are_named(tmp_path):
    good = write_image(tmp_path / "good.jpg", 1, size=32)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert load_image(good).mode == "RGB"
    for path, why in [(tmp_path / "gone.jpg", "missing"), (empty, "empty"), (text, "cannot decode"),
                      (truncated, "cannot decode")]:
        with pytest.raises(KinretInputError, match=why) as info:
            load_image(path)
        assert str(path) in str(info.value)


def test_skip_bad_counts_and_keeps_slots(tmp_path, caplog):
    good = write_image(tmp_path / "good.png", 1)
    arrays, bad = load_images([good, tmp_path / "gone.jpg", good], size=8, skip_bad=True)
    assert [a is None for a in arrays] == [False, True, False] and bad == [tmp_path / "gone.jpg"]
    assert arrays[0].shape == (8, 8, 3)
    assert "skipped 1 bad image(s) of 3" in caplog.text
    with pytest.raises(KinretInputError):
        load_images([good, tmp_path / "gone.jpg"])
