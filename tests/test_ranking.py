"""Aggregation, early fusion and ranking against naive per-probe references."""

from __future__ import annotations

import numpy as np
import pytest

from kinret.scoring.ranking import first_non_permutation, rank_gallery
from kinret.scoring.similarity import aggregate, cosine_scores, mean_embedding, probe_scores


def test_aggregate_matches_naive_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(9, 5)).astype(np.float32)
    owner = np.array([2, 0, 1, 2, 0, 0, 3, 1, 2])
    for how, fn in (("mean", np.mean), ("max", np.max)):
        want = np.stack([fn(scores[owner == p], axis=0) for p in range(4)])
        np.testing.assert_allclose(aggregate(scores, owner, 4, how), want, rtol=1e-6)
    with pytest.raises(ValueError, match="probe 4 has no image"):
        aggregate(scores, owner, 5)


def test_mean_embedding_orders_like_mean_of_cosines():
    rng = np.random.default_rng(1)
    probe = rng.normal(size=(12, 8))
    gallery = rng.normal(size=(30, 8))
    owner = np.repeat(np.arange(4), 3)
    by_mean_cos = aggregate(cosine_scores(probe, gallery), owner, 4, "mean")
    by_mean_emb = cosine_scores(mean_embedding(probe, owner, 4), gallery)
    assert np.array_equal(rank_gallery(by_mean_cos), rank_gallery(by_mean_emb))
    assert not np.array_equal(rank_gallery(aggregate(cosine_scores(probe, gallery), owner, 4, "max")),
                              rank_gallery(by_mean_emb))


def test_rank_gallery_refuses_nan_and_puts_minus_inf_last():
    with pytest.raises(ValueError, match="NaN .* probe row 1"):
        rank_gallery(np.array([[0.0, 1.0], [np.nan, 0.0]]))
    assert rank_gallery(np.array([[-np.inf, 0.1, -5.0]])).tolist() == [[1, 2, 0]]


def test_ranking_is_the_order_not_its_inverse():
    scores = np.array([[0.1, 0.9, 0.5, 0.7]])  # order 1, 3, 2, 0; its inverse permutation would be 3, 0, 2, 1
    assert rank_gallery(scores).tolist() == [[1, 3, 2, 0]]


def test_first_non_permutation():
    assert first_non_permutation(np.array([[0, 1, 2], [2, 1, 0]])) is None
    assert first_non_permutation(np.array([[0, 1, 2], [0, 0, 1], [3, 1, 0]])) == 1
    assert first_non_permutation(np.array([[0, 1, 2], [0, 1, 3]])) == 1


def test_probe_scores_handle_unreadable_images():
    rng = np.random.default_rng(2)
    pf, gf = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    owner = np.array([0, 0, 1, 2, 2])
    pok = np.array([True, False, False, True, True])
    gok = np.array([True, True, False, True, True, True])
    s = probe_scores(pf, pok, owner, 3, gf, gok, "max")
    assert np.all(s[1, gok] == 0)  # probe 1 lost its only image
    assert np.all(np.isneginf(s[:, 2]))
    np.testing.assert_allclose(s[0, gok], cosine_scores(pf[:1], gf[gok])[0], rtol=1e-6)
    assert rank_gallery(s)[0, -1] == 2


def test_float32_key_sort_matches_stable_argsort_on_ties_infinities_and_signed_zero():
    rng = np.random.default_rng(3)
    for _ in range(50):
        p, n = rng.integers(1, 6), rng.integers(1, 200)
        s = (rng.integers(-3, 4, (p, n)) * rng.choice([1.0, 1e-40, 1e30], (p, n))).astype(np.float32)  # subnormals too
        s[rng.random((p, n)) < 0.1] = -np.inf
        s[rng.random((p, n)) < 0.05] = np.inf
        s[rng.random((p, n)) < 0.1] = -0.0  # ties with 0.0, as the argsort of -scores has it
        s[0] = -np.inf  # a whole row unreadable: gallery order
        want = np.argsort(-s, axis=1, kind="stable")
        for chunk in (1, 2, 256):
            got = rank_gallery(s, chunk_rows=chunk)
            assert got.dtype == np.int64 and np.array_equal(got, want)
        assert np.array_equal(rank_gallery(s, dtype=np.int32), want) and rank_gallery(s, np.int32).dtype == np.int32


def test_rank_gallery_dtype_must_hold_every_index():
    with pytest.raises(ValueError, match="cannot hold gallery indices up to 299"):
        rank_gallery(np.zeros((1, 300), np.float32), dtype=np.int8)
    with pytest.raises(ValueError, match="cannot hold"):
        rank_gallery(np.zeros((1, 3), np.float32), dtype=np.float32)
    assert rank_gallery(np.zeros((1, 3), np.float16), dtype=np.uint8).tolist() == [[0, 1, 2]]
