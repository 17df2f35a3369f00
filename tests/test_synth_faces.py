"""Tests for the synthetic kinship families and their face renderer (kinret.data.synth_faces)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from kinret.data.synth_faces import LINEAGE, N_TRAITS, SynthFamily, SynthMember, make_family, render_face

PAIRED = {1: 4, 4: 1, 2: 2, 5: 5, 3: 6, 6: 3, 9: 9}  # code of (i, j) -> required code of (j, i)


def _families(seed: int, n: int, **kw) -> list[SynthFamily]:
    rng = np.random.default_rng(seed)
    return [make_family(f"F{i:04d}", rng, **kw) for i in range(n)]


def _center_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32)[40:72, 40:72].reshape(-1, 3).mean(0)


def test_same_seed_same_family_and_pixels() -> None:
    def build(seed: int) -> tuple[SynthFamily, list[bytes]]:
        rng = np.random.default_rng(seed)
        fam = make_family("F0001", rng)
        return fam, [render_face(m, rng).tobytes() for m in fam.members]

    (f1, img1), (f2, img2), (f3, img3) = build(7), build(7), build(8)
    assert [m.mid for m in f1.members] == [m.mid for m in f2.members]
    for a, b in zip(f1.members, f2.members, strict=True):
        assert a.traits.tobytes() == b.traits.tobytes()
        assert (a.age, a.gender, a.generation, a.parents, a.spouse, a.n_images) == (
            b.age, b.gender, b.generation, b.parents, b.spouse, b.n_images)
    np.testing.assert_array_equal(f1.relations, f2.relations)
    assert img1 == img2
    assert f1.members[0].traits.tobytes() != f3.members[0].traits.tobytes()
    assert img1[0] != img3[0]


def test_render_ignores_and_keeps_global_random_state() -> None:
    member = make_family("F0001", np.random.default_rng(0)).members[0]
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    a = render_face(member, np.random.default_rng(3)).tobytes()
    np.random.seed(2)
    b = render_face(member, np.random.default_rng(3)).tobytes()
    assert a == b
    np.random.seed(1)
    render_face(member, np.random.default_rng(3))
    assert np.array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("lo,hi", [(3, 3), (3, 10), (5, 8), (12, 22), (4, 40)])
def test_structure_and_relations(lo: int, hi: int) -> None:
    for fam in _families(lo * 100 + hi, 60, min_members=lo, max_members=hi, min_images=1, max_images=3):
        n = len(fam.members)
        assert lo <= n <= min(hi, 22)
        mids = [m.mid for m in fam.members]
        assert mids == [f"MID{i + 1}" for i in range(n)]
        rel, by_mid = fam.relations, {m.mid: m for m in fam.members}
        assert rel.dtype == np.int8 and rel.shape == (n, n)
        assert np.all(np.diag(rel) == 0)
        for i in range(n):
            for j in range(n):
                if i != j:
                    assert rel[i, j] in PAIRED and rel[j, i] == PAIRED[rel[i, j]], (fam.fid, i, j)
        for i, m in enumerate(fam.members):
            assert m.traits.dtype == np.float32 and m.traits.shape == (N_TRAITS,)
            assert m.age in ("child", "adult", "elder") and m.gender in ("F", "M")
            assert 1 <= m.n_images <= 3
            assert len(m.parents) in (0, 2) and all(p in by_mid for p in m.parents)
            for p in m.parents:
                assert rel[i, mids.index(p)] == 1 and by_mid[p].generation == m.generation - 1
            if m.generation == 0:
                assert not m.parents
            if m.spouse is not None:
                sp = by_mid[m.spouse]
                assert sp.spouse == m.mid and sp.gender != m.gender and rel[i, mids.index(sp.mid)] == 5
                # spouses are never blood relatives: at most one of them descends from the founders
                assert not (m.parents and sp.parents)
            if m.age == "child":
                assert m.spouse is None and not any(m.mid in o.parents for o in fam.members)
            if np.any(rel[i] == 6):
                assert m.age == "elder"  # grandparents are elders
        assert np.sum(rel == 5) >= 2  # the founding couple
        assert np.sum(rel == 4) >= 2  # and at least one child of theirs


def test_bad_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    for kw in ({"min_members": 2}, {"min_members": 6, "max_members": 5}, {"min_members": 23, "max_members": 30},
               {"min_images": 0}, {"min_images": 4, "max_images": 3}):
        with pytest.raises(ValueError):
            make_family("F0001", rng, **kw)


def _pooled_corr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    a = np.array([p[0] for p in pairs], np.float64)
    b = np.array([p[1] for p in pairs], np.float64)
    return float(np.mean([np.corrcoef(a[:, d], b[:, d])[0, 1] for d in range(a.shape[1])]))


def test_genetics_kin_and_spouses_share_lineage_strangers_do_not() -> None:
    fams = _families(11, 400, min_members=3, max_members=16)
    kinds: dict[str, list] = {"parent": [], "sibling": [], "grandparent": [], "spouse": [], "stranger": []}
    names = {4: "parent", 2: "sibling", 6: "grandparent", 5: "spouse"}
    for fam in fams:
        iu, ju = np.triu_indices(len(fam.members), 1)
        for i, j in zip(iu, ju, strict=True):
            code = int(fam.relations[i, j]) if fam.relations[i, j] in names else int(fam.relations[j, i])
            if code in names:
                kinds[names[code]].append((fam.members[i].traits, fam.members[j].traits))
    for f, g in zip(fams, fams[1:] + fams[:1], strict=True):
        kinds["stranger"].extend((a.traits, b.traits) for a, b in zip(f.members, g.members, strict=False))
    corr = {k: _pooled_corr(v) for k, v in kinds.items()}
    rho = LINEAGE
    assert abs(corr["parent"] - (1 + rho) / 2) < 0.1, corr
    assert abs(corr["sibling"] - (1 + rho) / 2) < 0.1, corr
    assert abs(corr["grandparent"] - (1 + 3 * rho) / 4) < 0.12, corr
    assert abs(corr["spouse"] - rho) < 0.1, corr
    assert abs(corr["stranger"]) < 0.08, corr
    assert corr["stranger"] < corr["spouse"] < corr["grandparent"] < corr["parent"]
    all_traits = np.array([m.traits for f in fams for m in f.members])
    assert abs(all_traits.mean()) < 0.05 and 0.85 < all_traits.std() < 1.15  # unit variance in every generation


def test_image_basics_and_nuisances() -> None:
    rng = np.random.default_rng(3)
    fam = make_family("F0001", rng, min_members=6, max_members=6)
    for m in fam.members:
        a, b = render_face(m, rng), render_face(m, rng)
        for img in (a, b):
            assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (112, 112)
            assert np.asarray(img).std() > 10
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() > 5
    small = render_face(fam.members[0], rng, size=64)
    assert small.mode == "RGB" and small.size == (64, 64)


def test_traits_age_and_gender_drive_the_face() -> None:
    m = make_family("F0001", np.random.default_rng(4)).members[0]

    def diff(other: SynthMember) -> float:
        a = np.asarray(render_face(m, np.random.default_rng(9)), np.float32)
        return float(np.abs(a - np.asarray(render_face(other, np.random.default_rng(9)), np.float32)).mean())

    assert diff(replace(m)) == 0.0
    assert diff(replace(m, traits=(m.traits + 1.0).astype(np.float32))) > 1.0
    assert diff(replace(m, age="child" if m.age != "child" else "elder")) > 3.0
    assert diff(replace(m, gender="M" if m.gender == "F" else "F")) > 1.0


def test_same_member_photos_closer_than_other_families() -> None:
    rng = np.random.default_rng(21)
    members = [f.members[int(rng.integers(len(f.members)))] for f in _families(22, 60)]
    a = np.array([_center_colour(render_face(m, rng)) for m in members])
    b = np.array([_center_colour(render_face(m, rng)) for m in members])
    same = np.linalg.norm(a - b, axis=1).mean()
    dist = np.linalg.norm(a[:, None] - b[None], axis=2)
    other = dist[~np.eye(len(members), dtype=bool)].mean()
    assert same < 0.9 * other, (same, other)


def test_parent_child_photos_closer_than_strangers() -> None:
    """The kinship signal survives the nuisances: averaged over 4 photos (a probe's set), a parent's coarse face
    colour is closer to its child's than to the same-index member of another family."""
    rng = np.random.default_rng(31)
    fams = _families(32, 60, min_members=3, max_members=5)
    feats = [[np.mean([_center_colour(render_face(m, rng)) for _ in range(4)], 0) for m in f.members] for f in fams]
    kin, stranger = [], []
    for k, fam in enumerate(fams):
        other = feats[(k + 1) % len(fams)]
        for i, j in zip(*np.nonzero(fam.relations == 4), strict=True):
            if j < len(other):
                kin.append(np.linalg.norm(feats[k][i] - feats[k][j]))
                stranger.append(np.linalg.norm(feats[k][i] - other[j]))
    assert len(kin) > 100
    assert np.mean(kin) < 0.95 * np.mean(stranger), (np.mean(kin), np.mean(stranger))
