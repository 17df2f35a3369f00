"""Similarity variants against naive loops, per-probe normalisation by hand, and the score-matrix file contract."""

from __future__ import annotations

import numpy as np
import pytest

from kinret.ensemble.blend import normalise
from kinret.errors import KinretInputError
from kinret.scoring.similarity import cosine_variant, fc_matrix, fc_rerank, fc_variant, rerank
from kinret.scoring.store import ids_path, load_scores, save_scores, stored_key


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
    with pytest.raises(ValueError, match="unknown cosine aggregation"):
        cosine_variant(pe, owner, 3, ge, "median")


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
