"""Metrics against hand-computed fractions, scikit-learn, and a naive loop kept here as the reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from kinret.metrics import (
    average_precision,
    cmc_curve,
    evaluate_ranking,
    hits_in_rank_order,
    mid_ranks,
    rank_at_k,
    relevance,
    roc_auc,
)
from kinret.scoring.ranking import rank_gallery


def hits_at(ranks: list[int], n: int) -> np.ndarray:
    h = np.zeros((1, n), dtype=bool)
    h[0, ranks] = True
    return h


@pytest.mark.parametrize(("ranks", "standard", "trapezoid"), [
    ([0, 2, 5], (1 + 2 / 3 + 3 / 6) / 3, ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 5 + 3 / 6) / 2) / 3),
    ([3], 1 / 4, (0 / 3 + 1 / 4) / 2),
    ([0], 1.0, 1.0),
    ([1, 2], (1 / 2 + 2 / 3) / 2, ((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2),
    ([0, 1, 2, 3, 4, 5], 1.0, 1.0),
])
def test_ap_matches_hand_computed_fractions(ranks, standard, trapezoid):
    h = hits_at(ranks, 6)
    assert average_precision(h, "standard")[0] == pytest.approx(standard)
    assert average_precision(h, "trapezoid")[0] == pytest.approx(trapezoid)


def test_track3_worked_example_values():
    # the two worked examples of track3.md, to four decimals
    assert round(float(average_precision(hits_at([0, 2, 5], 8))[0]), 4) == 0.7222
    assert round(float(average_precision(hits_at([0, 2, 5], 8), "trapezoid")[0]), 4) == 0.6778
    assert average_precision(hits_at([3], 8), "trapezoid")[0] == pytest.approx(0.125)


def test_probe_without_relative_adds_zero_but_counts():
    ranking = np.array([[0, 1, 2], [0, 1, 2]])
    s = evaluate_ranking(ranking, ["F1", "F9"], ["F1", "F2", "F1"])
    np.testing.assert_allclose(s.per_probe_ap, [(1 + 2 / 3) / 2, 0.0])
    assert s.mAP == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)
    assert s.rank[1] == pytest.approx(1 / 2)


def test_average_reproduces_published_table():
    # (mAP + Rank@5) / 2 on a constructed case: probe 0 hits at rank 0, probe 1 has no hit in top 5
    ranking = np.tile(np.arange(10), (2, 1))
    g = ["F1"] + ["F3"] * 8 + ["F2"]
    s = evaluate_ranking(ranking, ["F1", "F2"], g)
    assert s.mAP == pytest.approx((1 + 1 / 10) / 2)
    assert s.rank[5] == pytest.approx(1 / 2)
    assert s.average == pytest.approx(((1 + 1 / 10) / 2 + 1 / 2) / 2)
    assert set(s.as_dict()) == {"mAP", "rank@1", "rank@5", "rank@10", "rank@20", "rank@50", "average", "ap",
                                "n_probes", "n_gallery"}


def test_rank_at_k_beyond_gallery_and_cmc():
    h = np.array([[0, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=bool)
    assert rank_at_k(h, ks=(1, 2, 3, 50)) == {1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 50: 2 / 3}
    np.testing.assert_allclose(cmc_curve(h), [1 / 3, 1 / 3, 2 / 3])


def test_ties_go_to_lower_gallery_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert rank_gallery(scores).tolist() == [[1, 3, 0, 2, 4]]
    # a tie between a relative and a stranger: the relative at the lower index wins, at the higher index loses
    assert evaluate_ranking(rank_gallery(np.ones((1, 3))), ["F1"], ["F1", "F2", "F2"]).mAP == 1.0
    assert evaluate_ranking(rank_gallery(np.ones((1, 3))), ["F1"], ["F2", "F2", "F1"]).mAP == pytest.approx(1 / 3)


def naive_scores(scores, probe_fids, gallery_fids, ks=(1, 5, 10)):
    """The public-solution style: a Python loop per probe, sorting by (-score, index)."""
    aps_std, aps_trap, first = [], [], []
    for i, pf in enumerate(probe_fids):
        order = sorted(range(len(gallery_fids)), key=lambda j: (-scores[i][j], j))
        rel_ranks = [r for r, j in enumerate(order) if gallery_fids[j] == pf]
        std = trap = 0.0
        for c, r in enumerate(rel_ranks, start=1):
            std += c / (r + 1)
            before = 1.0 if r == 0 else (c - 1) / r
            trap += (before + c / (r + 1)) / 2
        aps_std.append(std / len(rel_ranks) if rel_ranks else 0.0)
        aps_trap.append(trap / len(rel_ranks) if rel_ranks else 0.0)
        first.append(rel_ranks[0] if rel_ranks else len(gallery_fids))
    rank = {k: sum(f < k for f in first) / len(first) for k in ks}
    return np.array(aps_std), np.array(aps_trap), rank


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_metrics_match_naive_loop_with_ties(seed):
    rng = np.random.default_rng(seed)
    p, n = 7, 40
    scores = rng.integers(0, 5, (p, n)).astype(float)  # many ties on purpose
    pf = [f"F{i}" for i in rng.integers(0, 6, p)]
    gf = [f"F{i}" for i in rng.integers(0, 6, n)]
    std, trap, rank = naive_scores(scores.tolist(), pf, gf)
    ranking = rank_gallery(scores)
    np.testing.assert_allclose(evaluate_ranking(ranking, pf, gf, "standard").per_probe_ap, std)
    np.testing.assert_allclose(evaluate_ranking(ranking, pf, gf, "trapezoid").per_probe_ap, trap)
    ours = evaluate_ranking(ranking, pf, gf).rank
    assert {k: ours[k] for k in rank} == pytest.approx(rank)


@pytest.mark.parametrize("seed", range(5))
def test_standard_ap_matches_sklearn_on_tie_free_data(seed):
    rng = np.random.default_rng(100 + seed)
    p, n = 12, 60
    scores = rng.normal(size=(p, n))
    pf = [f"F{i}" for i in range(p)]
    gf = [f"F{i}" for i in rng.integers(0, p, n)]
    rel = relevance(pf, gf)
    ours = average_precision(hits_in_rank_order(rank_gallery(scores), rel))
    for i in range(p):
        if rel[i].any():
            assert ours[i] == pytest.approx(average_precision_score(rel[i], scores[i]))
        else:
            assert ours[i] == 0.0


def test_trapezoid_never_above_standard():
    rng = np.random.default_rng(7)
    h = rng.random((200, 30)) < 0.2
    assert np.all(average_precision(h, "trapezoid") <= average_precision(h, "standard") + 1e-12)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown AP variant"):
        average_precision(np.ones((1, 2), bool), "voc")
    with pytest.raises(ValueError, match="shape"):
        evaluate_ranking(np.zeros((2, 3), int), ["F1"], ["F1", "F2", "F3"])


def test_chance_level_matches_monte_carlo():
    from kinret.metrics import chance_level

    rng = np.random.default_rng(3)
    pf = ["F1", "F2", "F3", "F9"]
    gf = ["F1"] * 3 + ["F2"] * 1 + ["F3"] * 7 + ["F4"] * 29
    want = chance_level(pf, gf)
    runs = [evaluate_ranking(rank_gallery(rng.random((4, 40))), pf, gf) for _ in range(4000)]
    assert want["mAP"] == pytest.approx(np.mean([r.mAP for r in runs]), abs=0.004)
    assert want["rank@5"] == pytest.approx(np.mean([r.rank[5] for r in runs]), abs=0.01)
    assert want["rank@50"] == pytest.approx(3 / 4)  # K beyond the gallery: every probe with a relative hits
    # one relative among N: E[AP] = H_N / N exactly
    assert chance_level(["F1"], ["F1"] + ["F2"] * 9)["mAP"] == pytest.approx(sum(1 / k for k in range(1, 11)) / 10)


@pytest.mark.parametrize("seed", range(4))
def test_pooled_per_probe_results_match_evaluate_ranking_with_ties_and_empty_probes(seed):
    """Per-probe results of two blocks of probes, pooled, give evaluate_ranking's numbers on the whole split."""
    from kinret.metrics import per_probe_results, relevance, summarise

    rng = np.random.default_rng(200 + seed)
    p, n = 9, 30
    scores = rng.integers(0, 4, (p, n)).astype(np.float32)  # ties on purpose
    pf = [f"F{i}" for i in rng.integers(0, 8, p - 1)] + ["F99"]  # the last probe has no relative
    gf = [f"F{i}" for i in rng.integers(0, 8, n)]
    ranking = rank_gallery(scores)
    rel = relevance(pf, gf)
    parts = [per_probe_results(ranking[a:a + 4], rel[a:a + 4]) for a in range(0, p, 4)]
    got = summarise(pd.concat(parts, ignore_index=True))
    assert np.isnan(parts[-1]["first"].iloc[-1]) and parts[-1]["ap"].iloc[-1] == 0.0
    for ap, key in (("standard", "mAP"), ("trapezoid", "mAP_trapezoid")):
        want = evaluate_ranking(ranking, pf, gf, ap, ks=(1, 5, 10))
        assert got[key] == pytest.approx(want.mAP, rel=1e-12)
        assert [got[f"rank{k}"] for k in (1, 5, 10)] == [want.rank[k] for k in (1, 5, 10)]
    assert got["average"] == pytest.approx((got["mAP"] + got["rank5"]) / 2)


def test_summarise_hand_computed():
    from kinret.metrics import summarise

    results = pd.DataFrame({"ap": [1.0, 0.5, 0.0], "first": [0.0, 3.0, np.nan]})
    got = summarise(results)
    assert got["mAP"] == pytest.approx(1.5 / 3) and got["rank1"] == pytest.approx(1 / 3)
    assert got["rank5"] == pytest.approx(2 / 3) and got["average"] == pytest.approx((1.5 / 3 + 2 / 3) / 2)
    assert "mAP_trapezoid" not in got


@pytest.mark.parametrize("seed", range(5))
def test_mid_ranks_equal_scipys_average_ranks_and_the_auc_sklearns(seed):
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6 + 10 * seed, 40).astype(np.float32)  # many ties at first, fewer later
    np.testing.assert_array_equal(mid_ranks(x), rankdata(x))
    y = rng.integers(0, 2, 40).astype(bool)
    assert roc_auc(x, y) == pytest.approx(roc_auc_score(y, x))
    assert mid_ranks(np.array([])).shape == (0,)
    x[3] = np.nan
    assert np.isnan(mid_ranks(x)).all() and np.isnan(roc_auc(x, y))


def test_ranks_equal_scipys_rankdata_for_both_tie_rules():
    """The kit's one rank implementation against scipy's `rankdata` (the oracle), rows of ties included."""
    from scipy.stats import rankdata

    from kinret.metrics import ranks

    rng = np.random.default_rng(3)
    for _ in range(200):
        x = rng.integers(0, 4, (int(rng.integers(1, 4)), int(rng.integers(1, 9)))).astype(np.float64)
        for ties in ("average", "min"):
            np.testing.assert_array_equal(ranks(x, ties), rankdata(x, method=ties, axis=-1))
    assert np.isnan(ranks(np.array([[1.0, np.nan], [2.0, 1.0]]))[0]).all()
    assert ranks(np.array([[1.0, np.nan], [2.0, 1.0]]))[1].tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="ties"):
        ranks(np.zeros(2), "max")
