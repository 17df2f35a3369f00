"""Synthetic kinship families: heritable latent traits and cheap cartoon face photos of their members.

Why this exists: kinret needs an embedded default data set without shipping real faces, yet one that behaves like
real kinship data. Traits are inherited like additive genes (parent-child and sibling correlation ~0.5, married-in
spouses unrelated), and the renderer turns them into face geometry and colours. On top of that come the two
difficulties of real kin retrieval: strong age/gender styling shared across families (non-kin of the same age and
gender look alike, kin of different ages do not) and per-photo nuisances (pose, light, blur, noise, background,
expression, glasses) that carry no family information. Everything depends only on the rng passed in.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from kinret.data.synth_photo import OldPhoto, photograph
from kinret.errors import KinretInputError

N_TRAITS = 16
MAX_FAMILY_SIZE = 22  # 2 founders + 4 children + 4 branches of (married-in spouse + 3 grandchildren)
# Shared ancestry: a family's founders, and the spouses who marry in, are drawn around one family lineage
# (FIW families mostly share an ethnicity, so skin, hair and face shape differ more between families than within).
# Any two lineage draws (founders, spouses) correlate LINEAGE; a child is the mid-parent plus mutation of variance
# (1 - LINEAGE) / 2, which keeps unit variance and gives parent-child and sibling correlation (1 + LINEAGE) / 2,
# grandparent-grandchild (1 + 3 * LINEAGE) / 4, and people of different families 0.
LINEAGE = 0.4
MUTATION_SD = math.sqrt((1 - LINEAGE) / 2)
REL_NONE, REL_CHILD, REL_SIBLING, REL_GRANDCHILD, REL_PARENT, REL_SPOUSE, REL_GRANDPARENT, REL_UNKNOWN = (
    0, 1, 2, 3, 4, 5, 6, 9)

# Each visual feature reads a unit-variance mix of 2-3 trait dims: every trait drives several features and no
# feature (hence no pixel) is a single trait, so there is no trivial family code in the image.
_FEATURES: dict[str, tuple[tuple[int, float], ...]] = {
    "face_w": ((0, 1.0), (5, 0.5)), "face_h": ((1, 1.0), (8, -0.5)), "jaw": ((2, 1.0), (11, 0.5)),
    "eye_gap": ((3, 1.0), (14, 0.4)), "eye_size": ((4, 1.0), (0, -0.4)), "eye_shape": ((5, 1.0), (12, 0.5)),
    "iris": ((6, 1.0), (2, 0.4)), "brow_thick": ((7, 1.0), (3, 0.5)), "brow_angle": ((8, 1.0), (6, -0.4)),
    "nose_len": ((9, 1.0), (1, 0.4)), "nose_w": ((10, 1.0), (4, 0.5)), "mouth_w": ((11, 1.0), (9, -0.4)),
    "lip": ((12, 1.0), (15, 0.4)), "ear": ((13, 1.0), (7, 0.4)), "skin": ((14, 1.0), (10, 0.5)),
    "skin_hue": ((10, 1.0), (13, -0.5)), "hair_col": ((15, 1.0), (13, 0.5)), "hair_red": ((6, 0.6), (15, -0.8)),
    "hairline": ((0, 0.5), (12, -0.6), (9, 0.4)), "hair_vol": ((5, 0.6), (9, 0.6), (3, -0.4)),
}
_SKIN = np.array([(255, 226, 200), (238, 196, 164), (206, 152, 116), (150, 100, 70), (96, 62, 44)], np.float32)
_HAIR = np.array([(28, 24, 22), (66, 44, 30), (116, 78, 48), (166, 124, 78), (218, 188, 124)], np.float32)
_IRIS = np.array([(58, 36, 22), (112, 72, 36), (100, 118, 60), (70, 116, 168)], np.float32)
_ANGLES = np.linspace(0, 2 * math.pi, 48, endpoint=False)  # the face outline's 48 points
_OUTLINE_COS, _OUTLINE_SIN = np.cos(_ANGLES), np.sin(_ANGLES)
_FRINGE_X, _LIP_X = np.linspace(-1, 1, 17), np.linspace(-1, 1, 9)  # sample points across the fringe and the lips
# a photo's face on the 2x canvas in pixels: s, centre cx cy, half width/height fw fh, eye/mouth line ey my, stroke lw
_Frame = tuple[int, float, float, float, float, float, float, int]


@dataclass(frozen=True)
class SynthMember:
    mid: str                  # "MID1", "MID2", ... (1-based, creation order)
    traits: np.ndarray        # float32 (N_TRAITS,), heritable latent, identical for every photo of this member
    age: str                  # "child" | "adult" | "elder"
    gender: str               # "F" | "M"
    generation: int           # 0 founders, 1 their children, 2 grandchildren
    parents: tuple[str, ...]  # mids of parents inside the family; () for founders and married-in spouses
    spouse: str | None        # mid of the spouse inside the family, if any
    n_images: int             # photos to render for this member (>= 1)


@dataclass(frozen=True)
class SynthFamily:
    fid: str
    members: tuple[SynthMember, ...]
    relations: np.ndarray     # int8 (n, n): relations[i, j] = what member i is to member j (FIW codes), diagonal 0


def make_family(fid: str, rng: np.random.Generator, min_members: int = 3, max_members: int = 10,
                min_images: int = 2, max_images: int = 8) -> SynthFamily:
    """Invent one family: a founding couple, 1-4 children, and married-in spouses with grandchildren.

    The member count is drawn uniformly in [min_members, min(max_members, MAX_FAMILY_SIZE)]; a family needs at
    least a couple and one child (3) for any kinship signal, so smaller bounds are refused.
    """
    if not 3 <= min_members <= max_members or min_members > MAX_FAMILY_SIZE:
        raise KinretInputError(None, f"need 3 <= min_members <= max_members and min_members <= {MAX_FAMILY_SIZE}, "
                                     f"got {min_members}, {max_members}")
    if not 1 <= min_images <= max_images:
        raise KinretInputError(None, f"need 1 <= min_images <= max_images, got {min_images}, {max_images}")
    n = int(rng.integers(min_members, min(max_members, MAX_FAMILY_SIZE) + 1))
    k = max(min(int(rng.integers(1, 5)), n - 2), -(-(n - 2) // 5))  # generation-1 children; each branch <= 4 more
    branch = [0] * k  # per generation-1 child: 0 = single, 1 = spouse only, b = spouse + (b - 1) children
    for _ in range(n - 2 - k):
        free = [i for i in range(k) if branch[i] < 4]
        branch[free[int(rng.integers(len(free)))]] += 1
    elder_founders = any(b >= 2 for b in branch) or rng.random() < 0.4
    recs = _family_tree(branch, elder_founders, rng)
    mids = [f"MID{i + 1}" for i in range(len(recs))]
    members = tuple(
        SynthMember(mid=mids[i], traits=r[0], age=r[1], gender=r[2], generation=r[3],
                    parents=tuple(mids[p] for p in r[4]), spouse=None if r[5] is None else mids[r[5]],
                    n_images=int(rng.integers(min_images, max_images + 1)))
        for i, r in enumerate(recs))
    return SynthFamily(fid=fid, members=members, relations=_relations([r[4] for r in recs], [r[5] for r in recs]))


def _family_tree(branch: list[int], elder_founders: bool, rng: np.random.Generator) -> list[list]:
    """Draw the members in creation order, as [traits, age, gender, generation, parent indices, spouse index]."""
    recs: list[list] = []
    lineage = rng.standard_normal(N_TRAITS)  # the family's shared ancestry (see LINEAGE)

    def add(traits: np.ndarray, age: str, gender: str, gen: int, parents: tuple[int, ...] = ()) -> int:
        t = traits.astype(np.float32)
        t.setflags(write=False)  # shared by every photo of the member: guard against in-place edits
        recs.append([t, age, gender, gen, parents, None])
        return len(recs) - 1

    def child_traits(a: int, b: int) -> np.ndarray:
        return (recs[a][0] + recs[b][0]) / 2 + MUTATION_SD * rng.standard_normal(N_TRAITS)

    def marry(a: int, b: int) -> None:
        recs[a][5], recs[b][5] = b, a

    def founder_traits() -> np.ndarray:
        return math.sqrt(LINEAGE) * lineage + math.sqrt(1 - LINEAGE) * rng.standard_normal(N_TRAITS)

    g = "FM"[int(rng.integers(2))]
    f0 = add(founder_traits(), "elder" if elder_founders else "adult", g, 0)
    f1 = add(founder_traits(), recs[f0][1], "M" if g == "F" else "F", 0)
    marry(f0, f1)
    gen1 = []
    for b in branch:
        age = "adult" if elder_founders or b > 0 or rng.random() < 0.25 else "child"
        gen1.append(add(child_traits(f0, f1), age, "FM"[int(rng.integers(2))], 1, (f0, f1)))
    for c, b in zip(gen1, branch, strict=True):
        if b == 0:
            continue
        sp = add(founder_traits(), "adult", "M" if recs[c][2] == "F" else "F", 1)
        marry(c, sp)
        for _ in range(b - 1):
            add(child_traits(c, sp), "child", "FM"[int(rng.integers(2))], 2, (c, sp))
    return recs


def _relations(parents: list[tuple[int, ...]], spouse: list[int | None]) -> np.ndarray:
    n = len(parents)
    rel = np.full((n, n), REL_UNKNOWN, np.int8)
    for i in range(n):
        for j in range(n):
            if i == j:
                rel[i, j] = REL_NONE
            elif spouse[i] == j:
                rel[i, j] = REL_SPOUSE
            elif j in parents[i]:
                rel[i, j] = REL_CHILD
            elif i in parents[j]:
                rel[i, j] = REL_PARENT
            elif parents[i] and set(parents[i]) == set(parents[j]):
                rel[i, j] = REL_SIBLING
            elif any(j in parents[p] for p in parents[i]):
                rel[i, j] = REL_GRANDCHILD
            elif any(i in parents[p] for p in parents[j]):
                rel[i, j] = REL_GRANDPARENT
    return rel


def _mix(palette: np.ndarray, pos: float) -> np.ndarray:
    x = float(np.clip(pos, 0.0, 1.0)) * (len(palette) - 1)
    i = min(int(x), len(palette) - 2)
    return palette[i] + (x - i) * (palette[i + 1] - palette[i])


def _rgb(c: np.ndarray) -> tuple[int, int, int, int]:
    """An opaque fill. Every fill is opaque, so the layer's pixels are either opaque or (0, 0, 0, 0) and the straight
    colours drawn into the "RGBa" layer are its premultiplied colours too."""
    return tuple(int(min(max(float(v), 0.0), 255.0)) for v in c[:3]) + (255,)  # plain floats: np.clip is slow here


def _over(base: np.ndarray, ink: np.ndarray, alpha: float) -> tuple[int, int, int, int]:
    """The opaque colour of `ink` at opacity `alpha` laid over `base` (ImageDraw would instead write the alpha into
    the layer and punch a translucent hole through the face)."""
    return _rgb((1 - alpha) * np.asarray(base, np.float32) + alpha * np.asarray(ink, np.float32))


def appearance(m: SynthMember) -> dict:
    """Stable look of one member: heritable traits + age/gender styling + personal, non-heritable habits.

    The personal part (hairstyle, beard, greying, glasses habit) is seeded from the member's own traits, so it is
    stable across photos but independent between relatives: extra within-family variation, like in real life.
    Computed once per member (cached on its traits, age and gender) and only read by the drawing code.
    """
    return _look(np.asarray(m.traits, np.float32).tobytes(), m.age, m.gender)


@functools.lru_cache(maxsize=256)
def _look(traits: bytes, age: str, gender: str) -> dict:
    t = np.frombuffer(traits, np.float32).astype(np.float64)
    z = {k: float(np.clip(sum(w * t[d] for d, w in v) / math.sqrt(sum(w * w for _, w in v)), -2.5, 2.5))
         for k, v in _FEATURES.items()}
    own = np.random.default_rng(zlib.crc32(traits + (age + gender).encode()))
    child, elder, male = age == "child", age == "elder", gender == "M"
    hs = 0.86 if child else 1.0
    a = {"child": child, "elder": elder, "male": male}
    a["fw"] = hs * 0.225 * (1 + 0.1 * z["face_w"]) * (1.06 if male else 0.96) * (1.08 if child else 1.0)
    a["fh"] = hs * 0.285 * (1 + 0.08 * z["face_h"]) * (0.88 if child else 1.04 if elder else 1.0)
    a["jaw"] = float(np.clip(2.1 + 0.4 * z["jaw"] + (0.45 if male and not child else -0.2), 1.4, 3.4))
    a["eye_y"] = 0.08 if child else -0.04  # fraction of face height below the centre; child eyes sit lower
    a["ex"] = a["fw"] * (0.4 + 0.05 * z["eye_gap"])
    a["er"] = 0.03 * (1 + 0.14 * z["eye_size"]) * (1.35 if child else 0.88 if elder else 1.0) * (1.0 if male else 1.06)
    a["ea"] = 0.66 + 0.1 * z["eye_shape"]
    a["iris"] = _mix(_IRIS, 0.35 + 0.28 * z["iris"])
    a["bt"] = 0.011 * (1 + 0.3 * z["brow_thick"]) * (1.6 if male and not child else 0.85)
    a["ba"] = 0.012 * z["brow_angle"] - 0.006  # inner end up (<0) or down
    a["nl"] = a["fh"] * (0.3 + 0.05 * z["nose_len"]) * (0.7 if child else 1.1 if elder else 1.0)
    a["nw"] = a["fw"] * (0.2 + 0.04 * z["nose_w"]) * (0.85 if child else 1.0)
    a["mw"] = a["fw"] * (0.36 + 0.06 * z["mouth_w"]) * (0.85 if child else 1.0)
    a["lt"] = 0.011 * (1 + 0.28 * z["lip"]) * (0.65 if elder else 1.0) * (1.0 if male else 1.2)
    a["ear"] = 0.042 * (1 + 0.16 * z["ear"]) * (1.15 if elder else 1.0)
    skin = _mix(_SKIN, 0.38 + 0.16 * z["skin"]) + np.array([8, 0, -6], np.float32) * z["skin_hue"]
    if elder:
        skin = 0.72 * skin + 0.28 * np.array([232, 222, 216], np.float32)
    elif child:
        skin = 0.88 * skin + 0.12 * np.array([255, 214, 204], np.float32)
    a["skin"] = skin
    hair = _mix(_HAIR, 0.45 + 0.2 * z["hair_col"]) + np.array([50, 4, -22], np.float32) * max(0.0, z["hair_red"] - 0.9)
    if child:
        hair = 0.82 * hair + 0.18 * _HAIR[4]
    a["grey"] = own.uniform(0.5, 0.95) if elder else 0.0
    a["hair"] = (1 - a["grey"]) * hair + a["grey"] * np.array([214, 212, 210], np.float32)
    a["brow"] = (1 - 0.6 * a["grey"]) * hair + 0.6 * a["grey"] * np.array([190, 188, 186], np.float32)
    a["hl"] = 0.6 - 0.12 * z["hairline"] + (0.12 if elder else 0.0) + (0.06 if male and not child else 0.0)
    a["hv"] = (0.014 if male else 0.034) * (1 + 0.35 * z["hair_vol"])
    a["bald"] = elder and male and own.random() < 0.4
    a["style"] = "short" if male else ("long", "bob", "bun", "bangs")[int(own.choice(4, p=(0.4, 0.25, 0.15, 0.2)))]
    if elder and a["style"] == "long":
        a["style"] = "bob"
    a["beard"] = ("none", "stubble", "full", "moustache")[int(own.choice(4, p=(0.45, 0.3, 0.15, 0.1)))] \
        if male and not child else "none"
    a["glasses_p"] = 0.8 if own.random() < (0.05 if child else 0.4 if elder else 0.15) else 0.03
    for v in a.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)  # the cached look is shared by every photo of the member
    return a


def render_face(member: SynthMember, rng: np.random.Generator, size: int = 112,
                old_photo: OldPhoto | None = None) -> Image.Image:
    """One RGB photo (mode "RGB", size x size) of `member`; all per-photo randomness comes from rng.

    Drawn at 2x with ImageDraw, downsampled for anti-aliasing, then photographed by `synth_photo.photograph`: posed
    with one affine warp, composited on a random background, degraded (blur, lighting gradient, colour cast,
    gamma/contrast, sensor noise) and, when `old_photo` is given, made an old print (greyscale or sepia, faded,
    grainy, vignetted). The print changes nothing else: the same rng gives the same face, pose and light.
    """
    a = appearance(member)
    s = 2 * size
    m = size // 4  # margin around the canvas, so the warp never pulls clipped edges (shoulders) into view
    # drawn straight into a premultiplied layer (see _rgb), so the 2x2 box (the anti-aliasing step) and the warp
    # need no conversions
    layer = Image.new("RGBa", (s + 4 * m, s + 4 * m), (0, 0, 0, 0))
    draw_face(ImageDraw.Draw(layer), a, rng, s, 2 * m)
    layer = layer.reduce(2)
    return photograph(layer, rng, size, m, old_photo)


def draw_face(d: ImageDraw.ImageDraw, a: dict, rng: np.random.Generator, s: int, off: int) -> None:
    """Paint the face in canvas units (0..1 scaled by s, shifted by off): back to front, per-photo expression."""
    cx, cy = off + 0.5 * s, off + 0.47 * s
    fw, fh = a["fw"] * s, a["fh"] * s
    ey, lw = cy + a["eye_y"] * fh, max(1, round(2 * (s / 224.0)))
    f = s, cx, cy, fw, fh, ey, cy + 0.55 * fh, lw
    _draw_behind_face(d, a, rng, f)
    _draw_face_shape(d, a, f)
    _draw_expression(d, a, rng, f)
    if rng.random() < a["glasses_p"]:  # glasses: two round rims and a bridge, dark (70%) or light frame
        frame = _rgb(rng.uniform(10, 120, 3) if rng.random() < 0.7 else rng.uniform(100, 230, 3))
        gr = 1.55 * a["er"] * s
        for sx in (-1, 1):
            gx = cx + sx * a["ex"] * s
            d.ellipse((gx - gr, ey - 0.8 * gr, gx + gr, ey + 0.8 * gr), outline=frame, width=lw + 1)
        d.line((cx - a["ex"] * s + gr, ey, cx + a["ex"] * s - gr, ey), fill=frame, width=lw + 1)


def _draw_behind_face(d: ImageDraw.ImageDraw, a: dict, rng: np.random.Generator, f: _Frame) -> None:
    """Draw what the face covers: back hair, neck, clothes (per-photo colour), locks, hair cap or bald tufts, ears."""
    s, cx, cy, fw, fh, ey, _, _ = f
    hair, hv = a["hair"], a["hv"] * s
    long_ = a["style"] in ("long", "bangs") and not a["bald"]
    if long_ or a["style"] == "bob":  # back hair first, so neck and clothes hide it below the chin
        bottom = cy + fh + 0.12 * s if long_ else cy + 0.85 * fh
        d.rounded_rectangle((cx - fw - hv, cy - fh - hv, cx + fw + hv, bottom), radius=int(fw * 0.9), fill=_rgb(hair))
    d.rectangle((cx - 0.5 * fw, cy + 0.4 * fh, cx + 0.5 * fw, cy + fh + 0.08 * s), fill=_rgb(a["skin"] * 0.86))
    d.ellipse((cx - 0.45 * s, cy + fh + 0.03 * s, cx + 0.45 * s, cy + fh + 0.6 * s),  # clothes: per-photo colour
              fill=_rgb(rng.uniform(20, 235, 3)))
    if long_:  # locks falling in front of the shoulders, beside the neck
        for sx in (-1, 1):
            x0, x1 = sorted((cx + sx * 0.62 * fw, cx + sx * (fw + hv)))
            d.rounded_rectangle((x0, ey, x1, cy + fh + 0.14 * s), radius=int(0.15 * fw), fill=_rgb(hair))
    if not a["bald"]:
        d.ellipse((cx - fw - hv, cy - fh - hv, cx + fw + hv, cy + 0.45 * fh), fill=_rgb(hair))
        if a["style"] == "bun":
            d.ellipse((cx - 0.35 * fw, cy - fh - hv - 0.5 * fw, cx + 0.35 * fw, cy - fh - hv + 0.2 * fw),
                      fill=_rgb(hair))
    else:
        for sx in (-1, 1):
            d.ellipse((cx + sx * fw - 0.3 * fw, ey - 0.35 * fh, cx + sx * fw + 0.3 * fw, ey + 0.1 * fh),
                      fill=_rgb(hair))
    er_ = a["ear"] * s
    for sx in (-1, 1):
        ex_ = cx + sx * 0.97 * fw
        d.ellipse((ex_ - er_, ey - 0.3 * er_, ex_ + er_, ey + 2.2 * er_), fill=_rgb(a["skin"] * 0.9))


def _draw_face_shape(d: ImageDraw.ImageDraw, a: dict, f: _Frame) -> None:
    """Draw the face outline, the fringe, a child's cheeks or an elder's wrinkles, and a stubble or full beard."""
    s, cx, cy, fw, fh, ey, my, lw = f
    # face outline: an ellipse on top, a superellipse (exponent = jaw) below: square jaw vs pointed chin
    c, sn = _OUTLINE_COS, _OUTLINE_SIN
    e = np.where(sn > 0, 2.0 / a["jaw"], 1.0)
    pts = np.stack([cx + fw * np.sign(c) * np.abs(c) ** e, cy + fh * np.sign(sn) * np.abs(sn) ** e], 1)
    d.polygon([tuple(p) for p in pts.tolist()], fill=_rgb(a["skin"]))
    if not a["bald"]:  # fringe: hair between the top of the face and a hairline curve reaching the temples
        xs = _FRINGE_X
        top = cy - fh * np.sqrt(1 - xs ** 2) - 1
        y0 = cy - fh * (a["hl"] if a["style"] != "bangs" else 0.32)
        hline = np.maximum(top, np.minimum(y0 + (ey - 0.2 * fh - y0) * xs ** 4, ey - 0.2 * fh))
        hx = (cx + fw * xs).tolist()
        d.polygon(list(zip(hx, top.tolist(), strict=True)) + list(zip(hx, hline.tolist(), strict=True))[::-1],
                  fill=_rgb(a["hair"]))
    if a["child"]:  # rosy cheeks
        blush = _over(a["skin"], np.array([235, 110, 110]), 60 / 255)
        for sx in (-1, 1):
            bx = cx + sx * 0.55 * fw
            d.ellipse((bx - 0.18 * fw, my - 0.3 * fh, bx + 0.18 * fw, my - 0.15 * fh), fill=blush)
    if a["elder"]:  # wrinkles: forehead lines, nasolabial folds, crow's feet
        line = _rgb(a["skin"] * 0.7)
        for i in range(3):
            yy = ey - 0.32 * fh - i * 0.08 * fh
            d.arc((cx - 0.5 * fw, yy, cx + 0.5 * fw, yy + 0.12 * fh), 200, 340, fill=line, width=lw)
        for sx in (-1, 1):
            d.line((cx + sx * a["nw"] * s * 1.3, ey + a["nl"] * s * 0.9, cx + sx * (a["mw"] * s + 0.03 * s),
                    my + 0.1 * fh), fill=line, width=lw)
            ox = cx + sx * (a["ex"] * s + 1.6 * a["er"] * s)
            for dy in (-0.02, 0.0, 0.02):
                d.line((ox, ey, ox + sx * 0.03 * s, ey + dy * s), fill=line, width=lw)
    if a["beard"] in ("stubble", "full"):
        lower = pts[(pts[:, 1] > my - 0.15 * fh)]
        lower = lower[np.argsort(np.arctan2(lower[:, 1] - cy, lower[:, 0] - cx))]
        alpha = 70 / 255 if a["beard"] == "stubble" else 1.0
        d.polygon([tuple(p) for p in lower.tolist()], fill=_over(a["skin"], a["hair"] * 0.9, alpha))


def _draw_expression(d: ImageDraw.ImageDraw, a: dict, rng: np.random.Generator, f: _Frame) -> None:
    """Draw eyes and brows, nose, moustache and lips, with this photo's smile, eye opening and gaze."""
    s, cx, _, _, _, ey, my, lw = f
    skin, er = a["skin"], a["er"] * s
    smile, open_, look = rng.uniform(-0.5, 1.0), rng.uniform(0.5, 1.1), rng.uniform(-0.25, 0.25) * a["er"] * s
    for sx in (-1, 1):  # eyes: white, iris, pupil, upper lid
        ex, eh = cx + sx * a["ex"] * s, max(er * a["ea"] * open_, 1.0)
        d.ellipse((ex - er, ey - eh, ex + er, ey + eh), fill=(245, 243, 238, 255))
        ir = min(0.55 * er, eh)
        d.ellipse((ex + look - ir, ey - ir, ex + look + ir, ey + ir), fill=_rgb(a["iris"]))
        pr = 0.45 * ir
        d.ellipse((ex + look - pr, ey - pr, ex + look + pr, ey + pr), fill=(15, 12, 12, 255))
        d.arc((ex - er, ey - eh, ex + er, ey + eh), 180, 360, fill=(40, 30, 28, 255), width=lw + (not a["male"]))
        by, bt = ey - eh - 0.6 * er - 0.02 * s, a["bt"] * s  # brow: tapered quad, slanted by brow_angle
        inner, outer = (cx + sx * (a["ex"] * s - 0.9 * er), by + a["ba"] * s), (cx + sx * (a["ex"] * s + 1.3 * er), by)
        d.polygon([inner, (inner[0], inner[1] - bt), (outer[0], outer[1] - 0.6 * bt), outer], fill=_rgb(a["brow"]))
    nt, nw = ey + a["nl"] * s, a["nw"] * s  # nose: bridge line, shaded tip, nostrils
    d.line((cx - 0.2 * nw, ey + 0.3 * er, cx - 0.35 * nw, nt - 0.3 * nw), fill=_rgb(skin * 0.8), width=lw)
    d.ellipse((cx - 0.6 * nw, nt - 0.5 * nw, cx + 0.6 * nw, nt + 0.3 * nw), fill=_rgb(skin * 0.88))
    for sx in (-1, 1):
        d.ellipse((cx + sx * nw - 0.3 * nw, nt - 0.1 * nw, cx + sx * nw + 0.3 * nw, nt + 0.2 * nw),
                  fill=_rgb(skin * 0.55))
    if a["beard"] == "moustache":
        d.polygon([(cx - a["mw"] * s * 1.05, my), (cx, nt + 0.4 * nw), (cx + a["mw"] * s * 1.05, my),
                   (cx, my - 0.5 * a["lt"] * s)], fill=_rgb(a["hair"] * 0.9))
    mw, lt, bend = a["mw"] * s, a["lt"] * s, smile * 0.025 * s  # lips: corners lift when smiling
    xs = _LIP_X
    mid = my + bend * (1 - xs ** 2) - bend
    upper = mid - lt * (1 - xs ** 2) * 0.8
    lower = mid + lt * (1 - xs ** 2) * 1.2
    lip = _rgb(skin * 0.55 + np.array([150, 40, 45], np.float32) * (0.45 if not a["male"] else 0.3))
    mx = (cx + mw * xs).tolist()
    d.polygon(list(zip(mx, upper.tolist(), strict=True)) + list(zip(mx, lower.tolist(), strict=True))[::-1], fill=lip)
    d.line(list(zip(mx, mid.tolist(), strict=True)), fill=_rgb(skin * 0.35), width=lw)
