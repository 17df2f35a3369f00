"""The camera and the print: what happens to a synthetic face (kinret.data.synth_faces) after it is drawn.

Every photo is posed (one affine warp), put on a random background and degraded like a snapshot: blur, a light
gradient, a colour cast, contrast and gamma, sensor noise. A share of the photos is also an old print: greyscale or
sepia, faded, grainy, vignetted and soft. On real FIW photos the worst probes were old greyscale prints of children
ranking greyscale prints of unrelated children first: the photo's style, not kinship, drove part of the similarity.
Here the style is drawn per photo from the photographed member's age alone, never from the family, so it is a
nuisance shared across families, like pose and light. Everything depends only on the rng passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Relative rate of old prints by the age of the person photographed (family albums hold many old scans of the
# children and of the elders). Over the generator's mix of photos (~19% child, ~59% adult, ~22% elder) the weights
# average ~1, so the overall rate of old prints is ~ the configured probability.
OLD_PHOTO_AGE_WEIGHT = {"child": 1.25, "adult": 0.83, "elder": 1.25}
OLD_PHOTO_KINDS = ("grey", "sepia")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luminance weights
_SEPIA = np.array([1.0, 0.86, 0.66], np.float32)     # full sepia toning: multiplies the luminance per channel
_GAMMA_STEPS = 4096


@dataclass(frozen=True)
class OldPhoto:
    """How one old print looks (see `old_print` for the formula)."""

    kind: str        # "grey" | "sepia"
    tone: float      # sepia strength in [0, 1]; 0 for grey
    black: float     # faded black level: luminance is squeezed into [black, white]
    white: float
    grain: float     # sd of the luminance grain (one field shared by the channels)
    vignette: float  # darkening at the corners: luminance times 1 - vignette * r^2, r = 1 at the corners
    soft: float      # least blur radius in pixels (old lenses, print scans)


def old_photo_rate(age: str, p: float) -> float:
    """Chance that one photo of a member of this age is an old print: min(1, p * OLD_PHOTO_AGE_WEIGHT[age])."""
    return min(1.0, p * OLD_PHOTO_AGE_WEIGHT[age])


def draw_old_photo(rng: np.random.Generator) -> OldPhoto:
    """One random old-print style: 55% greyscale, 45% sepia."""
    sepia = rng.random() < 0.45
    return OldPhoto(kind=OLD_PHOTO_KINDS[int(sepia)], tone=float(rng.uniform(0.55, 1.0)) if sepia else 0.0,
                    black=float(rng.uniform(0.03, 0.16)), white=float(rng.uniform(0.8, 0.97)),
                    grain=float(rng.uniform(0.015, 0.05)), vignette=float(rng.uniform(0.15, 0.5)),
                    soft=float(rng.uniform(0.5, 1.4)))


def draw_styles(age: str, n: int, p: float, rng: np.random.Generator) -> tuple[OldPhoto | None, ...]:
    """The styles of a member's `n` photos, in order: each is an old print with chance `old_photo_rate(age, p)`,
    drawn independently. Only the age enters: the family never does."""
    rate = old_photo_rate(age, p)
    return tuple(draw_old_photo(rng) if rng.random() < rate else None for _ in range(n))


def style_code(style: OldPhoto | None) -> int:
    """0 for a plain photo, 1 + the index of its kind in OLD_PHOTO_KINDS for an old print."""
    return 0 if style is None else 1 + OLD_PHOTO_KINDS.index(style.kind)


def old_print(x: np.ndarray, style: OldPhoto, noise: np.ndarray) -> np.ndarray:
    """Turn a photo into an old print.

    x: float32 (H, W, 3) in [0, 1]; noise: (H, W) of unit variance. With luminance y = x . (0.299, 0.587, 0.114),
    r^2 = (u^2 + v^2) / 2 for pixel coordinates u, v in [-1, 1], and tint t = 1 + tone * (sepia - 1):
        out = clip(t * ((black + (white - black) * y) * (1 - vignette * r^2) + grain * noise), 0, 1)
    so a greyscale print has equal channels and a sepia one has R >= G >= B.
    """
    h, w = x.shape[:2]
    u, v = np.linspace(-1.0, 1.0, w, dtype=np.float32), np.linspace(-1.0, 1.0, h, dtype=np.float32)
    r2 = (u[None, :] ** 2 + v[:, None] ** 2) / 2
    y = x @ _LUMA
    y = (style.black + (style.white - style.black) * y) * (1 - style.vignette * r2) + style.grain * noise
    tint = 1 + style.tone * (_SEPIA - 1)
    return np.clip(y[:, :, None] * tint, 0.0, 1.0)


def pose(layer: Image.Image, rng: np.random.Generator, size: int, margin: int) -> Image.Image:
    """Warp a premultiplied ("RGBa") face layer of size + 2 * margin pixels to size x size: rotation +-15 degrees,
    scale 0.85-1.15, horizontal squeeze 0.86-1 (a turned head), shift +-4%."""
    ang = math.radians(rng.uniform(-15, 15))
    sc, sq = rng.uniform(0.85, 1.15), rng.uniform(0.86, 1.0)
    dx, dy = rng.uniform(-0.04, 0.04, 2) * size
    ca, sa, c = math.cos(ang), math.sin(ang), size / 2
    # inverse map output -> input: diag(1/(sc*sq), 1/sc) @ R(-ang) applied around the centre, minus the shift
    ia, ib, id_, ie = ca / (sc * sq), sa / (sc * sq), -sa / sc, ca / sc
    ox, oy, ci = -c - dx, -c - dy, c + margin
    coeffs = (ia, ib, ia * ox + ib * oy + ci, id_, ie, id_ * ox + ie * oy + ci)
    return layer.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)


def background(rng: np.random.Generator, s: int) -> Image.Image:
    """Random two-colour gradient (RGBA, opaque), sometimes with a few blocks (a room, a poster): no family
    information."""
    corners = np.clip(rng.uniform(40, 215, (2, 2, 1)) + rng.uniform(-60, 60, (2, 2, 3)), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        corners[1] = corners[0]
    bg = Image.fromarray(corners, "RGB").resize((s, s), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        d = ImageDraw.Draw(bg)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.uniform(-0.2, 0.9, 2) * s
            w, h = rng.uniform(0.1, 0.6, 2) * s
            d.rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in rng.uniform(30, 235, 3)))
    return bg.convert("RGBA")


def develop(img: Image.Image, rng: np.random.Generator, style: OldPhoto | None = None) -> Image.Image:
    """Degrade a composited RGB photo like a snapshot, then, if `style` is given, make it an old print.

    Blur of radius U(0, 1.3) px (skipped under 0.25; at least style.soft for a print), then with pixel coordinates
    u, v in [-1, 1]: x' = clip(x * (1 + k (cos(phi) u + sin(phi) v)) * wb * c + 0.5 - 0.5 c + b, 0, 1) ** gamma
    (light gradient, white balance, contrast c, brightness b; the gamma through a 4096-entry table), plus uniform
    noise of sd U(0, 0.035) per channel, or made an old print by `old_print` with the noise field's first channel.
    The rng draws the same numbers in the same order whether or not the photo is a print, so the style changes
    nothing else.
    """
    size = img.size[0]
    r = rng.uniform(0.0, 1.3)
    if style is not None:
        r = max(r, style.soft)
    if r > 0.25:
        img = img.filter(ImageFilter.GaussianBlur(r))
    phi, k = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.45)
    wb = 1.0 + rng.normal(0, 0.05, 3)
    c, b = rng.uniform(0.75, 1.2), rng.uniform(-0.1, 0.1)
    gamma = rng.uniform(0.75, 1.3)
    # the photo as (H, 3W) rows, a pixel's three channels side by side: every operation then runs along long rows
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    light = 1.0 + k * (math.cos(phi) * np.repeat(g, 3)[None, :] + math.sin(phi) * g[:, None])
    x = np.asarray(img, np.float32).reshape(size, 3 * size)
    x *= light * np.tile(wb * (c / 255.0), size).astype(np.float32)
    x += np.float32(0.5 - 0.5 * c + b)
    np.clip(x, 0.0, 1.0, out=x)
    lut = np.linspace(0.0, 1.0, _GAMMA_STEPS, dtype=np.float32) ** np.float32(gamma)
    x = lut[(x * (_GAMMA_STEPS - 1) + 0.5).astype(np.int16)]
    noise = (rng.random(x.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(math.sqrt(12))  # unit variance
    sd = rng.uniform(0.0, 0.035)
    if style is None:
        x += noise * np.float32(sd)
    else:
        x = old_print(x.reshape(size, size, 3), style, noise[:, ::3])
    x = np.clip(x * np.float32(255) + np.float32(0.5), 0.0, 255.0)
    return Image.fromarray(x.astype(np.uint8).reshape(size, size, 3), "RGB")


def photograph(layer: Image.Image, rng: np.random.Generator, size: int, margin: int,
               style: OldPhoto | None = None) -> Image.Image:
    """The whole camera: pose the premultiplied face layer, put it on a background, `develop` it."""
    face = pose(layer, rng, size, margin).convert("RGBA")
    return develop(Image.alpha_composite(background(rng, size), face).convert("RGB"), rng, style)

