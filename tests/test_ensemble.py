"""Selection and blending on planted score matrices: pooled metrics by hand, greedy weights, the cross-fitted
choice between the best single variant and a blend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kinret.ensemble.blend import normalise
from kinret.ensemble.selection import Scorer, combine, greedy_weights, pooled, select
from kinret.metrics import evaluate_ranking
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.store import safe_name


def test_pooled_counts_every_probe_of_every_split_once():
    a = pd.DataFrame({"ap": [1.0, 0.5], "first": [0.0, 7.0], "ap_trapezoid": [1.0, 0.25]})
    b = pd.DataFrame({"ap": [1 / 3], "first": [3.0], "ap_trapezoid": [0.2]})
    got = pooled([a, b])
    assert got["mAP"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)
    assert got["mAP_trapezoid"] == pytest.approx((1 + 0.25 + 0.2) / 3)
    assert got["rank1"] == pytest.approx(1 / 3) and got["rank5"] == pytest.approx(2 / 3)
    assert got["average"] == pytest.approx(((1 + 0.5 + 1 / 3) / 3 + 2 / 3) / 2)


def test_scorer_agrees_with_evaluate_ranking():
    rng = np.random.default_rng(1)
    pf, gf = np.array(["F1", "F2", "F3"]), rng.choice(["F1", "F2", "F3", "F4"], 40)
    s = rng.normal(size=(3, 40))
    want = evaluate_ranking(rank_gallery(s), pf, gf)
    got = pooled([Scorer(pf, gf).per_probe(s)])
    assert got["mAP"] == pytest.approx(want.mAP) and got["rank5"] == want.rank[5] and got["rank1"] == want.rank[1]


def planted(n_folds=4, seed=0):
    """Two noisy views of one truth: each variant alone is weak, their sum is stronger; a third is pure noise."""
    rng = np.random.default_rng(seed)
    oof, scorers = {"a": {}, "b": {}, "noise": {}}, {}
    for k in range(n_folds):
        fam = rng.integers(0, 30, 300)
        probes = np.arange(30)
        truth = (probes[:, None] == fam[None, :]).astype(float)
        scorers[f"oof{k}"] = Scorer(probes.astype(str), fam.astype(str))
        oof["a"][f"oof{k}"] = truth + rng.normal(0, 1.2, truth.shape)
        oof["b"][f"oof{k}"] = 10 * (truth + rng.normal(0, 1.2, truth.shape))  # another scale: normalisation matters
        oof["noise"][f"oof{k}"] = rng.normal(0, 1, truth.shape)
    return oof, scorers


def test_greedy_blends_the_complementary_variants_and_drops_noise():
    oof, scorers = planted()
    norm = {v: {k: normalise(m, "z") for k, m in oof[v].items()} for v in ("a", "b", "noise")}
    w = greedy_weights(norm, scorers, sorted(scorers))
    assert set(w) == {"a", "b"} and sum(w.values()) == pytest.approx(1.0)


def test_select_blends_when_cross_fitted_blend_wins_and_reports_both():
    oof, scorers = planted()
    sel = select(oof, scorers, "auto", "z")
    assert sel.name == "blend_z_2v" and set(sel.weights) == {"a", "b"}
    cf = sel.crossfit
    assert cf["blend"]["average"] > cf["best single"]["average"]
    assert sel.best_single in ("a", "b") and "cross-fitted" in sel.reason
    best = select(oof, scorers, "best")
    assert best.weights == {best.best_single: 1.0} and best.name == f"best_{best.best_single}"
    # the blend of the chosen weights, as applied to another split
    m = combine({v: oof[v]["oof0"] for v in oof}, sel)
    want = sum(w * normalise(oof[v]["oof0"], "z") for v, w in sel.weights.items())
    assert np.allclose(m, want, atol=1e-5)


def test_select_keeps_the_single_variant_when_blending_does_not_help():
    oof, scorers = planted()
    oof = {"a": oof["a"], "noise": oof["noise"]}
    sel = select(oof, scorers, "auto", "rank")
    assert sel.weights == {"a": 1.0} and sel.name == "best_a"


def test_select_refuses_nothing_and_unknown_options():
    with pytest.raises(ValueError, match="no variants"):
        select({}, {})
    oof, scorers = planted(2)
    with pytest.raises(ValueError, match="normalisation"):
        select(oof, scorers, "auto", "minmax")


def test_safe_name():
    assert safe_name("sface_heads/bce-comb1:fc-mean") == "sface_heads_bce-comb1_fc-mean"
