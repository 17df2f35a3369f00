"""Tests for the synthetic camera and old prints (kinret.data.synth_photo) and their use by the face renderer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kinret.data.synth_faces import appearance, draw_face, make_family, render_face
from kinret.data.synth_photo import (
    OLD_PHOTO_AGE_WEIGHT,
    OldPhoto,
    draw_old_photo,
    draw_styles,
    old_photo_rate,
    old_print,
    style_code,
)

GREY = OldPhoto(kind="grey", tone=0.0, black=0.1, white=0.9, grain=0.05, vignette=0.4, soft=0.8)
SEPIA = OldPhoto(kind="sepia", tone=0.8, black=0.05, white=0.95, grain=0.0, vignette=0.3, soft=0.5)


def naive_old_print(x: np.ndarray, st: OldPhoto, noise: np.ndarray) -> np.ndarray:
    """Pixel by pixel, straight from the docstring's formula."""
    h, w, _ = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    sepia = (1.0, 0.86, 0.66)
    for i in range(h):
        for j in range(w):
            u, v = -1 + 2 * j / (w - 1), -1 + 2 * i / (h - 1)
            y = 0.299 * x[i, j, 0] + 0.587 * x[i, j, 1] + 0.114 * x[i, j, 2]
            faded = st.black + (st.white - st.black) * y
            y = faded * (1 - st.vignette * (u * u + v * v) / 2) + st.grain * noise[i, j]
            for ch in range(3):
                out[i, j, ch] = min(1.0, max(0.0, (1 + st.tone * (sepia[ch] - 1)) * y))
    return out


@pytest.mark.parametrize("style", [GREY, SEPIA])
def test_old_print_matches_the_formula(style: OldPhoto) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((4, 5, 3), dtype=np.float32)
    noise = rng.standard_normal((4, 5)).astype(np.float32)
    got = old_print(x, style, noise)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, naive_old_print(x, style, noise), atol=1e-5)


def test_old_print_known_values() -> None:
    # a flat mid-grey 3x3 photo, no grain: the centre keeps black + (white - black) * 0.5; a corner (r^2 = 1) loses
    # the vignette's share of it
    x = np.full((3, 3, 3), 0.5, np.float32)
    st = OldPhoto(kind="grey", tone=0.0, black=0.2, white=0.8, grain=0.0, vignette=0.5, soft=0.0)
    out = old_print(x, st, np.zeros((3, 3), np.float32))
    assert out[1, 1].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert out[0, 0].tolist() == pytest.approx([0.25, 0.25, 0.25])  # 0.5 * (1 - 0.5 * 1)
    assert out[0, 1].tolist() == pytest.approx([0.375, 0.375, 0.375])  # r^2 = 1/2


def test_rates_depend_on_age_only_and_are_capped() -> None:
    assert old_photo_rate("adult", 0.2) == pytest.approx(0.2 * OLD_PHOTO_AGE_WEIGHT["adult"])
    assert old_photo_rate("elder", 0.9) == 1.0 and old_photo_rate("child", 0.0) == 0.0
    assert draw_styles("child", 50, 0.0, np.random.default_rng(0)) == (None,) * 50
    assert all(s is not None for s in draw_styles("elder", 50, 1.0, np.random.default_rng(0)))
    styles = [draw_old_photo(np.random.default_rng(i)) for i in range(400)]
    kinds = [s.kind for s in styles]
    assert 0.45 < kinds.count("grey") / 400 < 0.65
    assert all((s.tone == 0) == (s.kind == "grey") and 0 < s.black < s.white < 1 for s in styles)
    assert [style_code(None), style_code(GREY), style_code(SEPIA)] == [0, 1, 2]


def test_rendered_prints_are_grey_or_sepia_and_change_nothing_else() -> None:
    member = make_family("F0001", np.random.default_rng(2)).members[0]

    def render(style: OldPhoto | None) -> tuple[np.ndarray, dict]:
        rng = np.random.default_rng(5)
        img = render_face(member, rng, 112, style)
        assert img.mode == "RGB" and img.size == (112, 112)
        return np.asarray(img, np.int16), rng.bit_generator.state

    plain, state = render(None)
    grey, grey_state = render(GREY)
    sepia, sepia_state = render(SEPIA)
    assert state == grey_state == sepia_state  # a print draws no extra numbers: the next photo is the same
    assert np.abs(plain[..., 0] - plain[..., 2]).mean() > 5  # colour photo
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert np.all(sepia[..., 0] >= sepia[..., 1]) and np.all(sepia[..., 1] >= sepia[..., 2])
    assert (sepia[..., 0] - sepia[..., 2]).mean() > 20
    # the same photo underneath: its luminance correlates strongly with the print's
    luma = plain @ np.array([0.299, 0.587, 0.114])
    assert np.corrcoef(luma.ravel(), grey[..., 0].ravel())[0, 1] > 0.8


def test_face_layer_is_valid_premultiplied() -> None:
    """render_face draws straight colours into an "RGBa" layer: right only while every pixel is opaque or fully
    transparent black (a translucent fill would write its alpha into the layer, a hole in the face)."""
    alphas: set[int] = set()
    for seed in range(25):
        for m in make_family("F0001", np.random.default_rng(seed), min_members=6, max_members=12).members:
            layer = Image.new("RGBa", (168, 168), (0, 0, 0, 0))
            draw_face(ImageDraw.Draw(layer), appearance(m), np.random.default_rng(seed), 112, 28)
            px = np.asarray(layer)
            alphas |= set(np.unique(px[..., 3]).tolist())
            assert not px[px[..., 3] == 0, :3].any()
    assert alphas == {0, 255}
