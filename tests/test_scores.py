"""Similarity variants against naive loops, the variant kinds (names, fold reduction, shared work), per-probe
normalisation by hand, and the score-matrix file contract."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kinret.ensemble.blend import normalise
from kinret.errors import KinretInputError
from kinret.scoring.protocols import SplitData
from kinret.scoring.similarity import FUSIONS, cosine_variant, fc_matrix, fc_rerank, fc_variant, probe_scores, rerank
from kinret.scoring.store import ids_path, load_scores, save_scores, stored_key
from kinret.scoring.transductive import RESCORINGS
from kinret.scoring.variant_kinds import (
    KINDS,
    Cosine,
    FcAllPairs,
    FcRerank,
    GroupSpec,
    Rescored,
    offered_variants,
    parse_kind,
)
from kinret.scoring.variants import Group, group_scores, missing_scores, variant_name


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def embs():
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(7, 5)).astype(np.float32)
    ge = rng.normal(size=(11, 5)).astype(np.float32)
    owner = np.array([0, 0, 1, 2, 2, 2, 1])  # rows need not be grouped
    return pe, owner, ge


def pair_fn(a, b):  # a non-symmetric, non-linear "head"
    return np.tanh((a * b).sum(1) + 0.3 * a[:, 0] - 0.1 * b[:, 1] ** 2)


def test_cosine_meanemb_orders_as_mean_of_cosines_and_max_is_the_max(embs):
    pe, owner, ge = embs
    cos = unit(pe) @ unit(ge).T
    mean = np.stack([cos[owner == p].mean(0) for p in range(3)])
    got = cosine_variant(pe, owner, 3, ge, "meanemb")
    assert np.array_equal(np.argsort(-got, 1), np.argsort(-mean, 1))
    assert np.allclose(cosine_variant(pe, owner, 3, ge, "max"), np.stack([cos[owner == p].max(0) for p in range(3)]),
                       atol=1e-6)
    for bad in (lambda: cosine_variant(pe, owner, 3, ge, "median"), lambda: cosine_variant(pe, owner, 3, ge, "mean"),
                lambda: probe_scores(pe, np.ones(7, bool), owner, 3, ge, np.ones(11, bool), "mean")):
        with pytest.raises(ValueError, match="unknown cosine fusion .*; choose one of meanemb, max"):
            bad()
    with pytest.raises(ValueError, match="unknown fc fusion 'median'; choose one of mean, max, meanemb"):
        fc_variant(pair_fn, pe, owner, 3, ge, "median")


@pytest.mark.parametrize("max_pairs", [1, 7, 11, 10_000])
def test_fc_matrix_in_bounded_chunks_equals_the_pair_loop(embs, max_pairs):
    pe, _, ge = embs
    naive = np.array([[pair_fn(pe[i:i + 1], ge[j:j + 1])[0] for j in range(len(ge))] for i in range(len(pe))])
    assert np.allclose(fc_matrix(pair_fn, pe, ge, max_pairs), naive, atol=1e-6)


def test_fc_aggregations_against_loops(embs):
    pe, owner, ge = embs
    per_image = fc_matrix(pair_fn, pe, ge)
    assert np.allclose(fc_variant(pair_fn, pe, owner, 3, ge, "mean"),
                       [per_image[owner == p].mean(0) for p in range(3)], atol=1e-6)
    assert np.allclose(fc_variant(pair_fn, pe, owner, 3, ge, "max"), [per_image[owner == p].max(0) for p in range(3)])
    means = unit(np.stack([unit(pe)[owner == p].sum(0) for p in range(3)]))
    assert np.allclose(fc_variant(pair_fn, pe, owner, 3, ge, "meanemb"), fc_matrix(pair_fn, means, ge), atol=1e-5)


def test_rerank_reorders_only_the_shortlist_and_keeps_it_on_top():
    short = np.array([[0.9, 0.1, 0.8, 0.7, 0.2, 0.3]], dtype=np.float32)
    fine = np.array([[-1.0, 9.0, 2.0, 5.0, 9.0, 0.0]])
    got = rerank(short, fine, top_n=3)  # shortlist = faces 0, 2, 3 by the first score
    order = np.argsort(-got[0], kind="stable")
    assert order[:3].tolist() == [3, 2, 0]  # by fine score
    assert order[3:].tolist() == [5, 4, 1]  # the rest in shortlist order, below
    assert np.array_equal(rerank(short, fine, top_n=100).argsort()[0], np.argsort(fine[0]))


@pytest.mark.parametrize("top_n, max_pairs", [(3, 1), (4, 5), (100, 1 << 18)])
def test_fc_rerank_runs_the_head_on_the_shortlist_only_and_equals_the_full_rerank(embs, top_n, max_pairs):
    pe, owner, ge = embs
    calls = []

    def counted(a, b):
        calls.append(len(a))
        return pair_fn(a, b)

    want = rerank(cosine_variant(pe, owner, 3, ge), fc_variant(pair_fn, pe, owner, 3, ge, "mean"), top_n)
    assert np.allclose(fc_rerank(counted, pe, owner, 3, ge, top_n, max_pairs), want, atol=1e-6)
    assert sum(calls) == len(pe) * min(top_n, len(ge)) and max(calls) <= max(max_pairs, min(top_n, len(ge)))


# ---- variant kinds ---------------------------------------------------------------------------------------------------
EVERY_KIND = GroupSpec(("emb", "native"), "emb", pair_head=True, top_n=5)  # a spec every registered kind offers for


def test_every_kinds_name_parses_back_to_an_equal_variant():
    listed, on_request = offered_variants(EVERY_KIND)
    every = [*listed, *on_request]
    assert {type(k) for k in every} == set(KINDS)  # a new kind offers variants here, so its names are checked
    assert len({k.label for k in every}) == len(every)
    for kind in [*every, FcRerank(100, "emb"), Rescored("dba10-clus-div5", "native"), Cosine("max", "max")]:
        assert parse_kind(kind.label) == kind and parse_kind(kind.label).label == kind.label
    assert parse_kind("cos-emb-meanemb") == Cosine("emb", "meanemb") and parse_kind("fc-max") == FcAllPairs("max")
    assert parse_kind("rerank100-emb") == FcRerank(100) and parse_kind("dsm-native") == Rescored("dsm", "native")
    assert parse_kind("dba10-clus-div5-emb") == Rescored("dba10-clus-div5", "emb")
    assert variant_name("sface", Cosine("native")) == "sface:cos-native-meanemb"
    assert variant_name("team", None) == "team"


@pytest.mark.parametrize("name, match", [
    ("median-emb", "unknown variant name 'median-emb'; a name is one of: cos-EMB-FUSION"),
    ("cos-emb", "unknown variant name"),
    ("cos-a-b-meanemb", "unknown variant name"),
    ("rerank0-emb", "unknown variant name"),
    ("", "unknown variant name"),
    ("cos-emb-median", "unknown cosine fusion 'median'; choose one of meanemb, max"),
    ("cos-emb-mean", "unknown cosine fusion 'mean'"),
    ("fc-meanest", "unknown fc fusion 'meanest'; choose one of mean, max, meanemb"),
    ("dba10-", "embedding name '' must be"),
    ("rerank5-a:b", "embedding name 'a:b' must be"),
])
def test_an_unknown_or_malformed_name_is_refused(name, match):
    with pytest.raises(KinretInputError, match=match):
        parse_kind(name)


def test_bad_parameters_are_refused():
    recipes = ", ".join(RESCORINGS)
    for make, match in [(lambda: Cosine("emb", "median"), "unknown cosine fusion"),
                        (lambda: Rescored("dba99", "emb"), f"unknown re-scoring 'dba99'; choose one of {recipes}"),
                        (lambda: FcRerank(0), "positive"), (lambda: FcRerank(True), "positive"),
                        (lambda: FcAllPairs("meanemb-x"), "unknown fc fusion"), (lambda: Cosine("a-b"), "embedding")]:
        with pytest.raises(KinretInputError, match=match):
            make()


class FoldModel:
    """A fold model's embeddings of a split's images and a counted pair head."""

    def __init__(self, seed):
        self.seed, self.pairs = seed, 0

    def key(self, images):
        return f"fold{self.seed}"

    def embeddings(self, images, names=None):
        return {"emb": np.random.default_rng(self.seed).normal(size=(len(images), 5)).astype(np.float32)}

    def pair_fn(self, a, b):
        self.pairs += len(a)
        return pair_fn(a, b) + self.seed


def test_fold_models_average_and_share_the_fc_matrix(tmp_path, embs):
    pe, owner, ge = embs
    split = SimpleNamespace(probes=[SimpleNamespace(ref=f"s{i}") for i in range(3)],
                            gallery=[SimpleNamespace(ref=f"f{j}") for j in range(11)])
    sd = SplitData("val", split, list(range(18)), np.arange(7), owner, np.arange(7, 18), None)
    models = {0: FoldModel(0), 1: FoldModel(1)}
    kinds = [Cosine("emb", f) for f in FUSIONS["cosine"]] + [FcAllPairs(f) for f in FUSIONS["fc"]] + [FcRerank(4)]
    group = Group("g", kinds, models)
    got = group_scores(group, sd, tmp_path)
    assert list(got) == group.variants and missing_scores(group, sd, tmp_path) == []
    for m in models.values():  # per fold model: the head over every image pair once for mean and max
        assert m.pairs == 7 * 11 + 3 * 11 + 7 * 4
    parts = {k: [] for k in kinds}
    for m in models.values():
        e = m.embeddings(sd.images)["emb"]
        for f in FUSIONS["cosine"]:
            parts[Cosine("emb", f)].append(cosine_variant(e[:7], owner, 3, e[7:], f))
        for f in FUSIONS["fc"]:
            parts[FcAllPairs(f)].append(fc_variant(m.pair_fn, e[:7], owner, 3, e[7:], f))
        parts[FcRerank(4)].append(fc_rerank(m.pair_fn, e[:7], owner, 3, e[7:], 4))
    for kind, (a, b) in parts.items():
        assert np.allclose(got[variant_name("g", kind)], (a + b) / 2, atol=1e-6), kind.label
    oof = SplitData("oof1", split, sd.images, sd.probe_rows, owner, sd.gallery_rows, None)
    assert np.array_equal(group_scores(group, oof, tmp_path)["g:fc-max"], parts[FcAllPairs("max")][1])


def test_normalise_by_hand():
    s = np.array([[1.0, 2.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    z = normalise(s, "z")
    assert np.allclose(z[0], (s[0] - 2.25) / np.std(s[0]))
    assert np.array_equal(z[1], np.zeros(4))  # a constant row stays finite
    assert np.allclose(normalise(s, "rank"), [[0, 1 / 3, 2 / 3, 2 / 3], [0, 0, 0, 0]])
    with pytest.raises(ValueError):
        normalise(s, "minmax")


def test_scores_round_trip_with_ids_and_key(tmp_path):
    s = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = save_scores(tmp_path / "v" / "test.npy", s, ["s0", "s1"], ["f0", "f1", "f2"], key="abc")
    assert ids_path(path).name == "test.ids.npz" and stored_key(path) == "abc"
    assert np.array_equal(load_scores(path, ["s0", "s1"], ["f0", "f1", "f2"]), s)
    assert stored_key(tmp_path / "missing.npy") is None


@pytest.mark.parametrize("probes, gallery, match", [
    (["s1", "s0"], ["f0", "f1", "f2"], "probe id at row 0 is 's0', the split has 's1'"),
    (["s0", "s1"], ["f0", "f1"], "holds 3 gallery ids, the split has 2"),
])
def test_load_refuses_other_ids_naming_the_ids_file(tmp_path, probes, gallery, match):
    path = save_scores(tmp_path / "test.npy", np.zeros((2, 3)), ["s0", "s1"], ["f0", "f1", "f2"])
    with pytest.raises(KinretInputError, match=match) as err:
        load_scores(path, probes, gallery)
    assert "test.ids.npz" in str(err.value)


def test_load_refuses_bad_shape_non_finite_and_a_missing_ids_file(tmp_path):
    path = save_scores(tmp_path / "test.npy", np.zeros((2, 3)), ["s0", "s1"], ["f0", "f1", "f2"])
    np.save(path, np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(KinretInputError, match=r"test.npy: score matrix has shape \(3, 2\), expected \(2, 3\)"):
        load_scores(path, ["s0", "s1"], ["f0", "f1", "f2"])
    for bad in (np.nan, np.inf, -np.inf):
        m = np.zeros((2, 3), dtype=np.float32)
        m[1, 2] = bad
        np.save(path, m)
        with pytest.raises(KinretInputError, match=r"test.npy: 1 non-finite score\(s\).*probe row 1 \(s1\), gallery "
                                                   r"column 2 \(f2\)"):
            load_scores(path, ["s0", "s1"], ["f0", "f1", "f2"])
    with pytest.raises(KinretInputError, match="non-finite"):  # never written either
        save_scores(tmp_path / "other.npy", m, ["s0", "s1"], ["f0", "f1", "f2"])
    assert not (tmp_path / "other.npy").exists() and not ids_path(tmp_path / "other.npy").exists()
    ids_path(path).unlink()
    with pytest.raises(KinretInputError, match="test.ids.npz: missing"):
        load_scores(path, ["s0", "s1"], ["f0", "f1", "f2"])
