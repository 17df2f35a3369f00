"""Noise-aware choice: the paired bootstrap against a direct resampling loop, the blend rule on gains inside and
outside the noise, the weight search against equal weights, and the run's outputs (per-probe results, intervals
against the reference, chance rows, the short terminal summary)."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from kinret.data.layout import DataLayout
from kinret.ensemble import bootstrap as bs
from kinret.ensemble.blend import blend, normalise
from kinret.ensemble.cli import add_ensemble_args, glance, settings_from_args
from kinret.ensemble.cli import main as ensemble_main
from kinret.ensemble.run import prepare, reference_intervals, run_ensemble
from kinret.ensemble.selection import (
    Scorer,
    coordinate_ascent,
    decide,
    greedy_weights,
    moves,
    objective,
    search_weights,
    select,
)
from kinret.ensemble.settings import EnsembleSettings
from kinret.ensemble.tables import CHANCE_ROW
from kinret.errors import KinretInputError
from kinret.metrics import chance_level, summarise
from kinret.scoring.store import safe_name
from kinret.scoring.variants import missing_scores


def results(rng, n: int, skill: float) -> pd.DataFrame:
    """Per-probe results of a made-up variant: AP in [0, 1], first hit rank (NaN: no relative)."""
    first = np.floor(rng.exponential(8 / skill, n))
    first[rng.random(n) < 0.05] = np.nan
    ap = np.clip(rng.beta(1 + skill, 3, n), 0, 1)
    return pd.DataFrame({"ap": ap, "first": first})


def naive_interval(a: pd.DataFrame, b: pd.DataFrame, strata: np.ndarray, n_boot: int, seed: int, level: float = 0.95):
    """The documented draws, then one resample at a time: rows taken, Average recomputed by `summarise`."""
    rng = np.random.default_rng(seed)
    draws = {s: (np.flatnonzero(strata == s), rng.integers(0, (strata == s).sum(), size=(n_boot, (strata == s).sum())))
             for s in sorted(set(strata))}
    diffs = []
    for r in range(n_boot):
        rows = np.concatenate([members[d[r]] for members, d in draws.values()])
        diffs.append(summarise(a.iloc[rows])["average"] - summarise(b.iloc[rows])["average"])
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return summarise(a)["average"] - summarise(b)["average"], lo, hi


def test_average_terms_known_answer():
    # AP 0.5 with a hit at rank 2, AP 0.25 first hit at rank 5 (0-based: outside the top 5), no relative
    u = bs.average_terms(np.array([0.5, 0.25, 0.0]), np.array([2.0, 5.0, np.nan]))
    assert u.tolist() == [(0.5 + 1) / 2, 0.25 / 2, 0.0]
    frame = pd.DataFrame({"ap": [0.5, 0.25, 0.0], "first": [2.0, 5.0, np.nan]})
    assert u.mean() == pytest.approx(summarise(frame)["average"])


def test_resample_counts_are_the_documented_draws_within_strata():
    strata = np.array(["b", "a", "b", "a", "a"])
    counts = bs.resample_counts(strata, n_boot=50, seed=3)
    rng = np.random.default_rng(3)
    a, b = np.flatnonzero(strata == "a"), np.flatnonzero(strata == "b")
    da, db = rng.integers(0, 3, (50, 3)), rng.integers(0, 2, (50, 2))
    for r in range(50):
        want = np.bincount(np.concatenate([a[da[r]], b[db[r]]]), minlength=5)
        assert counts[r].tolist() == want.tolist()
    assert (counts[:, a].sum(1) == 3).all() and (counts[:, b].sum(1) == 2).all()  # each stratum keeps its size


@pytest.mark.parametrize("pooled", [False, True], ids=["within folds", "one stratum"])
def test_paired_interval_equals_a_direct_resampling_loop(pooled):
    rng = np.random.default_rng(0)
    a, b = results(rng, 90, 1.5), results(rng, 90, 1.0)
    strata = np.zeros(90, int) if pooled else np.repeat([0, 1, 2], [40, 30, 20])
    got = bs.interval_of(a, b, strata, n_boot=400, seed=11)
    delta, lo, hi = naive_interval(a, b, strata, 400, 11)
    assert got["delta"] == pytest.approx(delta, abs=1e-12)
    assert got["lo"] == pytest.approx(lo, abs=1e-12) and got["hi"] == pytest.approx(hi, abs=1e-12)
    assert bs.interval_of(a, b, strata, n_boot=400, seed=11) == got  # seeded: the same interval again
    assert bs.interval_of(a, b, strata, n_boot=400, seed=12) != got


def test_interval_of_a_variant_against_itself_is_zero_and_a_clear_gain_excludes_zero():
    rng = np.random.default_rng(1)
    a = results(rng, 150, 1.0)
    assert bs.interval_of(a, a, np.zeros(150)) == {"delta": 0.0, "lo": 0.0, "hi": 0.0}
    better = a.assign(ap=np.minimum(a["ap"] + 0.2, 1.0))
    iv = bs.interval_of(better, a, np.zeros(150))
    assert bs.excludes_zero(iv) and iv["lo"] <= iv["delta"] <= iv["hi"]
    with pytest.raises(ValueError, match="same probes"):
        bs.interval_of(a, a.iloc[:-1], np.zeros(150))


def test_many_variants_at_once_equal_one_pair_at_a_time():
    rng = np.random.default_rng(2)
    pp = {v: {"oof0": results(rng, 30, s), "oof1": results(rng, 25, s), "val": results(rng, 40, s)}
          for v, s in (("ref", 1.0), ("x", 1.4), ("y", 0.7))}
    found = reference_intervals(pp, "ref", n_boot=300, seed=4)
    strata = np.repeat(["oof0", "oof1"], [30, 25])
    for v in ("x", "y"):
        want = bs.interval_of(pd.concat([pp[v]["oof0"], pp[v]["oof1"]]), pd.concat([pp["ref"]["oof0"],
                              pp["ref"]["oof1"]]), strata, 300, 4)
        assert found[v]["oof"] == pytest.approx(want, abs=1e-12)
        assert found[v]["val"] == pytest.approx(bs.interval_of(pp[v]["val"], pp["ref"]["val"], np.zeros(40), 300, 4))
    assert found["ref"]["oof"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0}


def test_the_rule_blends_only_when_the_gain_interval_lies_above_zero():
    inside = {"delta": 0.012, "lo": -0.010, "hi": 0.034}
    outside = {"delta": 0.040, "lo": 0.012, "hi": 0.070}
    assert not decide("auto", 3, inside) and decide("auto", 3, outside)
    assert not decide("auto", 1, outside)  # the search kept one variant: nothing to blend
    assert decide("blend", 3, inside) and not decide("best", 3, outside)


def planted(seed: int, corr: float, n_folds: int = 4):
    """Two noisy views of one truth whose noise is correlated `corr` (the closer to 1, the less a blend adds), and a
    pure-noise variant; 30 probes a fold."""
    rng = np.random.default_rng(seed)
    oof, scorers = {"a": {}, "b": {}, "noise": {}}, {}
    for k in range(n_folds):
        fam = rng.integers(0, 30, 300)
        truth = (np.arange(30)[:, None] == fam[None, :]).astype(float)
        scorers[f"oof{k}"] = Scorer(np.arange(30).astype(str), fam.astype(str))
        shared = rng.normal(0, 1, truth.shape)
        for v in ("a", "b"):
            oof[v][f"oof{k}"] = truth + 1.2 * (np.sqrt(1 - corr) * rng.normal(0, 1, truth.shape)
                                               + np.sqrt(corr) * shared)
        oof["noise"][f"oof{k}"] = rng.normal(0, 1, truth.shape)
    return oof, scorers


def test_a_gain_beyond_the_noise_is_blended():
    sel = select(*planted(0, corr=0.0), "auto", "z", n_boot=500)
    assert sel.name == "blend_z_2v" and set(sel.weights) == {"a", "b"} and sel.gain["lo"] > 0
    assert "lies above 0: submitted the blend" in sel.reason and "cross-fitted" in sel.reason


def test_a_gain_inside_the_noise_is_not_blended():
    """Correlated views: the cross-fitted blend still gains a little (+0.02 here), which the old rule (any gain)
    would have blended on; its interval includes 0, so the best single variant is submitted."""
    sel = select(*planted(2, corr=0.9), "auto", "z", n_boot=500)
    assert sel.gain["delta"] > 0 and sel.gain["lo"] < 0 < sel.gain["hi"]
    assert sel.weights == {sel.best_single: 1.0} and sel.name == f"best_{sel.best_single}"
    assert sel.reason.startswith(f"the blend gained {sel.gain['delta']:+.3f}")
    assert f"but its 95% interval [{sel.gain['lo']:+.3f}, {sel.gain['hi']:+.3f}] includes 0: submitted the best " \
           "single variant" in sel.reason
    forced = select(*planted(2, corr=0.9), "blend", "z", n_boot=500)
    assert len(forced.weights) > 1 and forced.gain == sel.gain and "asked for" in forced.reason


def weak_and_strong(seed: int = 5):
    """A strong variant, two weak but independent ones and noise: equal weights drown the strong one; greedy steps
    of 1/n are too coarse to add the weak ones."""
    rng = np.random.default_rng(seed)
    norm, scorers = {"strong": {}, "weak": {}, "weak2": {}, "noise": {}}, {}
    for k in range(3):
        fam = rng.integers(0, 30, 300)
        truth = (np.arange(30)[:, None] == fam[None, :]).astype(float)
        scorers[f"oof{k}"] = Scorer(np.arange(30).astype(str), fam.astype(str))
        for v, sd in (("strong", 0.8), ("weak", 2.0), ("weak2", 2.5)):
            norm[v][f"oof{k}"] = normalise(truth + rng.normal(0, sd, truth.shape), "z")
        norm["noise"][f"oof{k}"] = normalise(rng.normal(0, 1, truth.shape), "z")
    return norm, scorers


def test_the_weight_search_beats_equal_weights_and_greedy_steps():
    norm, scorers = weak_and_strong()
    folds = sorted(scorers)

    def score(w):
        return objective({k: blend([norm[v][k] for v in w], list(w.values())) for k in folds}, scorers)

    w = search_weights(norm, scorers, folds)
    assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) > 0 and "noise" not in w
    equal, greedy = {v: 0.25 for v in norm}, greedy_weights(norm, scorers, folds)
    assert score(w) > score(equal) + 0.05 and score(w) > score(greedy) + 0.02
    # coordinate ascent never ends below its start, from any start
    for start in ({"noise": 1.0}, equal, {"weak": 0.5, "weak2": 0.5}):
        found, value = coordinate_ascent(norm, scorers, folds, start)
        assert value >= score(start) - 1e-12 and value == pytest.approx(score(found))


def test_moves_stay_on_the_simplex():
    w = np.array([0.5, 0.3, 0.2, 0.0])
    for i in range(4):
        for m in moves(w, i):
            assert m.min() >= 0 and m.sum() == pytest.approx(1.0) and not np.allclose(m, w)
    assert any(np.allclose(m, [0.75, 0.15, 0.1, 0.0]) for m in moves(w, 0, steps=(0.5,)))
    assert any(np.allclose(m, [0.0, 0.6, 0.4, 0.0]) for m in moves(w, 0))  # the variant removed
    assert moves(np.array([1.0, 0.0]), 0) == []


# ---- the run: per-probe results, intervals against the reference, chance rows, the terminal summary ----------------
def ensemble_args(work, *extra) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_ensemble_args(p)
    return p.parse_args(["--experiments", "--runs", str(work / "runs"), "--ensemble-dir", str(work / "ens"),
                         "--bootstrap", "300", *extra])


def prepared(args: argparse.Namespace, data):
    """(settings, splits, groups) of the ensemble options `args` on the data folder `data`."""
    settings = settings_from_args(args, data)
    _, splits, groups = prepare(settings, DataLayout.of(data), args.runs, args.ensemble_dir)
    return settings, splits, groups


# raw pixels and their re-scorings (scored when named): enough variants for a blend to be weighed
NAMED = ["raw_pixels:cos-pixels-meanemb", "raw_pixels:cos-pixels-max"] + [
    f"raw_pixels:{v}-pixels" for v in ("dba10", "qe5", "clus-div5", "dba10-clus-div5", "dsm", "sink")]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("choice")
    args = ensemble_args(work, "--variants", *NAMED)
    settings, splits, groups = prepared(args, tiny_data)
    result = run_ensemble(groups, splits, settings, work / "ens" / "scores", work / "ens")
    return result, work


def test_the_run_keeps_per_probe_results_of_every_variant_on_every_split(run):
    result, work = run
    pp = result.per_probe
    on_disk = pd.read_csv(work / "ens" / "per_probe.csv.gz", keep_default_na=True)
    assert list(on_disk.columns[:5]) == ["variant", "split", "group", "probe", "probe_id"]
    assert len(on_disk) == len(pp) and set(on_disk["variant"]) == set(pp["variant"])
    labelled = [n for n, sd in result.splits.items() if sd.labels is not None]
    for v in result.scores["test"]:
        assert sorted(pp[pp["variant"] == v]["split"].unique()) == sorted(labelled)
    table = result.table.set_index("variant")
    for v in result.scores["test"]:
        for group in ("oof", "val", "test"):
            rows = on_disk[(on_disk["variant"] == v) & (on_disk["group"] == group)]
            assert summarise(rows)["average"] == pytest.approx(table.loc[v, f"{group}_average"], abs=1e-5)
    assert gzip.decompress((work / "ens" / "per_probe.csv.gz").read_bytes()).startswith(b"variant,split,")


def test_every_variant_has_its_interval_against_the_reference(run):
    result, work = run
    sel, table = result.selection, result.table.set_index("variant")
    assert sel.reference == "raw_pixels:cos-pixels-meanemb"  # no SFace variant in this run
    for v in result.scores["test"]:
        row = table.loc[v]
        want = row["oof_average"] - table.loc[sel.reference, "oof_average"]
        assert row["oof_delta"] == pytest.approx(want, abs=1e-9) and row["oof_delta_lo"] <= row["oof_delta_hi"]
        assert row["against"] == sel.reference
    saved = json.loads((work / "ens" / "selection.json").read_text())
    assert saved["reference"] == sel.reference and set(saved["intervals_vs_reference"]) == set(result.scores["test"])
    assert set(saved["crossfit_gain"]) == {"delta", "lo", "hi"} and saved["settings"]["bootstrap"] == 300
    gain = table.loc["blend (cross-fitted out-of-fold)"]
    assert gain["oof_delta"] == pytest.approx(sel.gain["delta"]) and gain["against"].startswith("best single")


def test_chance_rows_legend_and_split_sizes_are_in_the_table(run, tiny_data):
    result, work = run
    md = (work / "ens" / "variants.md").read_text()
    assert f"| {CHANCE_ROW} |" in md and "Columns: " in md and "not comparable" in md
    assert "| variant | oof_average" in md and "oof Δ [95%]" in md and "| reference |" in md
    test = result.splits["test"].labels
    want = chance_level(test.probe_fids, test.gallery_fids)
    row = result.table.set_index("variant").loc[CHANCE_ROW]
    assert row["test_average"] == pytest.approx(want["average"]) and row["test_rank5"] == pytest.approx(want["rank@5"])
    chance = result.chance.set_index("split")
    folds = chance.loc[[n for n in chance.index if n.startswith("oof") and n != "oof"]]
    pooled = (folds["average"] * folds["probes"]).sum() / folds["probes"].sum()
    assert chance.loc["oof", "average"] == pytest.approx(pooled) and row["oof_average"] == pytest.approx(pooled)
    for name in ("val", "test"):
        assert f"| {name} | {chance.loc[name, 'probes']} | {chance.loc[name, 'gallery']} |" in md


def test_glance_is_short_and_says_what_was_submitted_and_why(run):
    result, _ = run
    text = glance(result, top=5, table_path="ens/variants.md")
    lines = text.splitlines()
    assert len(lines) <= 15
    assert lines[0].startswith(f"submitted: {result.selection.name} (Average oof ")
    assert f"why: {result.selection.reason}" in lines and "interval" in result.selection.reason
    if len(result.selection.weights) > 1:
        assert lines[1].startswith("  weights: ")
    assert "95% interval against raw_pixels:cos-pixels-meanemb" in text and "reference" in text
    assert "chance (random ranking) Average: oof " in text and "val " in text and "test " in text
    assert lines[-1] == "full table: ens/variants.md"


def test_the_command_prints_the_glance_and_refuses_an_unknown_reference(run, tiny_data, tmp_path, capsys):
    _, work = run
    shutil.copytree(work / "ens", tmp_path / "ens")  # the cached matrices: nothing is scored again
    base = ["--data-root", str(tiny_data), "--experiments", "--runs", str(work / "runs"), "--ensemble-dir",
            str(tmp_path / "ens"), "--bootstrap", "300", "--quiet"]
    assert ensemble_main([*base, "--reference", "raw_pixels:cos-pixels-max"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted: ") and "95% interval against raw_pixels:cos-pixels-max" in out
    assert "| variant |" not in out and f"full table: {tmp_path / 'ens' / 'variants.md'}" in out
    assert ensemble_main([*base, "--reference", "nope"]) == 2
    assert "--reference 'nope' is not a variant" in capsys.readouterr().err
    args = ensemble_args(work, "--reference", "nope")
    settings, splits, groups = prepared(args, tiny_data)
    with pytest.raises(KinretInputError, match="raw_pixels:cos-pixels-meanemb"):
        run_ensemble(groups, splits, settings, work / "ens" / "scores", None)


def test_per_probe_file_is_the_same_bytes_on_a_rerun(run, tiny_data, tmp_path):
    result, work = run
    args = ensemble_args(tmp_path, "--variants", *NAMED)
    settings, splits, groups = prepared(args, tiny_data)
    run_ensemble(groups, splits, settings, work / "ens" / "scores", tmp_path)
    assert (tmp_path / "per_probe.csv.gz").read_bytes() == (work / "ens" / "per_probe.csv.gz").read_bytes()


def test_the_search_objective_is_the_pooled_average_of_the_per_probe_table():
    rng = np.random.default_rng(6)
    scorers, mats = {}, {}
    for k, (p, n) in enumerate(((5, 4), (7, 60), (6, 30))):  # a gallery under 5 faces: every probe hits the top 5
        fam = rng.integers(0, p + 2, n)
        scorers[f"oof{k}"] = Scorer(np.arange(p).astype(str), fam.astype(str))
        mats[f"oof{k}"] = rng.normal(size=(p, n)).astype(np.float32)
    table = pd.concat([scorers[k].per_probe(m) for k, m in mats.items()])
    assert objective(mats, scorers) == pytest.approx(summarise(table)["average"], abs=1e-12)


# ---- the splits the choice is not made on, narrowed to the chosen variants and the reference (--score-others) ----
def test_a_narrowed_split_scores_the_chosen_and_the_reference_alone_and_the_rest_is_unchanged(run, tiny_data,
                                                                                             tmp_path):
    every, work = run
    args = ensemble_args(tmp_path, "--variants", *NAMED, "--score-others", "chosen")
    settings, splits, groups = prepared(args, tiny_data)
    scores = tmp_path / "ens" / "scores"
    result = run_ensemble(groups, splits, settings, scores, tmp_path / "ens")
    sel = result.selection
    assert sel.name == every.selection.name and sel.weights == every.selection.weights
    scored = {*sel.weights, sel.reference}
    assert result.narrowed == ("val", "test")
    pp, full = result.per_probe, every.per_probe
    for split in ("val", "test"):
        assert set(pp[pp["split"] == split]["variant"]) == scored | {f"chosen: {sel.name}"}
    oof = pp[pp["group"] == "oof"].reset_index(drop=True)
    pd.testing.assert_frame_equal(oof, full[full["group"] == "oof"].reset_index(drop=True))
    table, whole = result.table.set_index("variant"), every.table.set_index("variant")
    for v in whole.index:  # the chosen and the reference as before everywhere; the others as before out of fold
        cols = [c for c in whole.columns if v in scored or v.startswith("chosen") or not c.startswith(("val", "test"))]
        pd.testing.assert_series_equal(table.loc[v, cols], whole.loc[v, cols], check_names=False)
    others = [v for v in result.scores["test"] if v not in scored]
    assert others and table.loc[others, ["val_average", "test_average", "test_delta"]].isna().all().all()
    md = (tmp_path / "ens" / "variants.md").read_text()
    assert "On val, test, only the chosen variant(s) and the reference were scored" in md
    kept = json.loads((scores / "kept.json").read_text())
    assert set(kept["narrowed"]) == {"val", "test"} and set(kept["narrowed"]["test"]) == scored
    for g in groups:  # nothing left to build: the plan and a rerun compute nothing more
        assert all(not missing_scores(g, sd, scores) for sd in splits.values())
    assert not any((scores / safe_name(v) / "test.results.npz").exists() for v in others)
    run_ensemble(groups, splits, settings, scores, tmp_path / "again")  # a rerun: the same table from the store
    for name in ("per_probe.csv.gz", "variants.md"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "ens" / name).read_bytes()


def test_auto_narrows_a_split_only_past_the_pair_budget():
    auto, every, chosen = (EnsembleSettings(score_others=s) for s in ("auto", "every", "chosen"))
    assert auto.scores_every_variant(190, 4_482) and auto.scores_every_variant(5_000, 5_000)
    assert not auto.scores_every_variant(1_900, 33_610) and every.scores_every_variant(1_900, 33_610)
    assert not chosen.scores_every_variant(1, 1)


def test_a_blend_is_kept_combined_where_the_choice_is_not_made_and_read_back_without_its_variants(
        tiny_data, tmp_path, monkeypatch):
    from kinret.ensemble.chosen import CHOSEN_DIR
    from kinret.ensemble.selection import combine
    from kinret.scoring import variants as scoring_variants
    from kinret.scoring.ranking import rank_gallery

    args = ensemble_args(tmp_path, "--variants", *NAMED, "--choose", "blend")
    settings, splits, groups = prepared(args, tiny_data)
    scores = tmp_path / "ens" / "scores"
    result = run_ensemble(groups, splits, settings, scores, tmp_path / "ens")
    sel = result.selection
    assert len(sel.weights) > 1
    for split in ("val", "test"):  # one combined matrix, none of its variants'
        assert (scores / CHOSEN_DIR / f"{split}.npy").is_file()
        assert not any((scores / safe_name(v) / f"{split}.npy").exists() for v in sel.weights)
        assert all((scores / safe_name(v) / f"{split}.results.npz").exists() for v in sel.weights)
        kept = result.chosen[split]
        fresh = combine({v: scoring_variants.variant_scores(*result.scores[split].where(v), splits[split], scores)
                         for v in sel.weights}, sel)
        assert np.array_equal(rank_gallery(np.asarray(kept, np.float32)), rank_gallery(fresh))
    assert all((scores / safe_name(v) / "oof0.npy").is_file() for v in sel.weights)  # the choice's splits: each
    assert json.loads((scores / "kept.json").read_text())["variants"] == []

    def forbidden(self, kind):
        raise AssertionError(f"{kind.label} computed again")

    monkeypatch.setattr(scoring_variants._Scoring, "compute", forbidden)  # a rerun reads what was kept
    again = run_ensemble(groups, splits, settings, scores, tmp_path / "again")
    assert np.array_equal(again.chosen["test"], result.chosen["test"])
    assert (tmp_path / "again" / "variants.md").read_bytes() == (tmp_path / "ens" / "variants.md").read_bytes()


def test_a_rerun_reads_the_choice_back_and_makes_it_again_when_its_inputs_or_record_change(run, tiny_data,
                                                                                           tmp_path, monkeypatch,
                                                                                           caplog):
    import logging

    from kinret.ensemble import run as ensemble_run
    from kinret.ensemble.chosen import CHOICE_FILE

    result, work = run
    shutil.copytree(work / "ens", tmp_path / "ens")
    scores, record = tmp_path / "ens" / "scores", tmp_path / "ens" / "scores" / CHOICE_FILE
    assert record.is_file()
    made, real = [], ensemble_run.select

    def counted(*args, **kwargs):
        made.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(ensemble_run, "select", counted)
    settings, splits, groups = prepared(ensemble_args(tmp_path, "--variants", *NAMED), tiny_data)
    again = run_ensemble(groups, splits, settings, scores, tmp_path / "again")
    assert made == [] and again.selection == result.selection  # read back, the same to the last bit
    assert (tmp_path / "again" / "variants.md").read_bytes() == (work / "ens" / "variants.md").read_bytes()
    best = prepared(ensemble_args(tmp_path, "--variants", *NAMED, "--choose", "best"), tiny_data)[0]
    assert run_ensemble(groups, splits, best, scores, None).selection.name.startswith("best_") and made == ["best"]
    record.write_bytes(np.random.default_rng(0).bytes(200))  # damaged: named once, made again, recorded again
    with caplog.at_level(logging.WARNING):
        healed = run_ensemble(groups, splits, settings, scores, tmp_path / "healed")
    assert made == ["best", "auto"] and healed.selection == result.selection
    assert sum(str(record) in r.getMessage() for r in caplog.records) == 1
    assert json.loads(record.read_text())["selection"]["name"] == result.selection.name
