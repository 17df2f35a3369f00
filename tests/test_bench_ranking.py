"""benchmarks/bench_ranking.py at a tiny scale: the kit's submission path and the reference loops give the same
ranking, CSV and AP, and the agreement check it relies on fails on a wrong ranking or CSV. No timing is asserted."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import REPO

from kinret.scoring.similarity import probe_scores
from kinret.submission.predictions import CSV_NAME, read_predictions


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ranking", REPO / "benchmarks" / "bench_ranking.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _scores(x, how):
    ok_p, ok_g = np.ones(len(x.owner), bool), np.ones(len(x.gallery_feats), bool)
    return probe_scores(x.probe_feats, ok_p, x.owner, x.n_probes, x.gallery_feats, ok_g, how)


def _tie_free_inputs(bench, how):
    """The first seeded tiny input whose scores have no two values of a row within 1e-5 (the paths fuse in a
    different float order, ~1e-7 apart, so only such near-ties could swap) and a probe without a relative."""
    for seed in range(100):
        x = bench.make_inputs(8, 24, 40, dim=16, seed=seed)
        if np.diff(np.sort(_scores(x, how), axis=1), axis=1).min() > 1e-5 and not set(x.probe_fids) <= set(
                x.gallery_fids):
            return x
    raise AssertionError("no tie-free seed")


@pytest.mark.parametrize("how", ["meanemb", "max"])
def test_kit_and_reference_paths_agree_exactly(bench, tmp_path, how):
    x = _tie_free_inputs(bench, how)
    results = {}
    for name, run in (("kit", bench.kit_path), ("naive", bench.naive_path),
                      ("public", lambda x, out, how: bench.public_path(x, out, how, batch=7))):
        (tmp_path / name).mkdir()
        results[name] = run(x, tmp_path / name, how)
    kit = results["kit"]
    assert set(kit.times) == set(bench.STAGES)
    for ref in ("naive", "public"):
        np.testing.assert_array_equal(kit.ranking, results[ref].ranking)
        for ap in ("standard", "trapezoid"):
            np.testing.assert_allclose(kit.ap[ap], results[ref].ap[ap], rtol=1e-12, atol=1e-15)
    assert 0 < kit.ap["standard"].mean() < 1 and (kit.ap["standard"] == 0).any()  # a probe without a relative
    kit_csv = (tmp_path / "kit" / CSV_NAME).read_bytes()
    assert kit_csv == (tmp_path / "naive" / CSV_NAME).read_bytes()
    assert kit_csv == (tmp_path / "public" / CSV_NAME).read_bytes().replace(b"\r\n", b"\n")  # csv.writer: CRLF
    for side in ("kit", "naive", "public"):
        np.testing.assert_array_equal(read_predictions(tmp_path / side / "submission.zip", 8, 40), kit.ranking)
    lines = {side: bench.csv_line_digests(tmp_path / side / CSV_NAME) for side in results}
    assert len(lines["kit"]) == 8 and len(set(lines["kit"].tolist())) == 8
    for ref in ("naive", "public"):
        np.testing.assert_array_equal(lines["kit"], lines[ref])
        same, diff = bench.check_agreement(x, how, kit.ranking, results[ref].ranking, kit.ap, results[ref].ap,
                                           lines["kit"], lines[ref])
        assert same == 8 and max(diff.values()) < 1e-12


def test_agreement_check_fails_on_a_wrong_ranking_or_csv(bench):
    x = bench.make_inputs(6, 15, 40, dim=16, seed=2)
    ranking = np.argsort(-_scores(x, "meanemb"), axis=1, kind="stable")
    wrong = ranking.copy()
    wrong[2, [0, -1]] = wrong[2, [-1, 0]]  # best and worst swapped: far beyond any float tie
    ap = {"standard": np.zeros(6)}
    lines = np.arange(6, dtype=np.uint64)
    assert bench.check_agreement(x, "meanemb", ranking, ranking, ap, ap, lines, lines)[0] == 6
    with pytest.raises(AssertionError, match="breaks the kit's score order"):
        bench.check_agreement(x, "meanemb", ranking, wrong, ap, ap)
    with pytest.raises(AssertionError, match="mAP differs"):
        bench.check_agreement(x, "meanemb", ranking, ranking, ap, {"standard": np.full(6, 0.5)})
    other = lines.copy()
    other[4] = 99  # same rankings, one CSV line not byte-identical
    with pytest.raises(AssertionError, match="CSV line 4 is not byte-identical"):
        bench.check_agreement(x, "meanemb", ranking, ranking, ap, ap, lines, other)
    with pytest.raises(AssertionError, match="reference CSV has 5 lines"):
        bench.check_agreement(x, "meanemb", ranking, ranking, ap, ap, lines, lines[:5])


def test_make_inputs_is_deterministic_and_sized(bench):
    a, b = bench.make_inputs(8, 20, 50, dim=4, seed=3), bench.make_inputs(8, 20, 50, dim=4, seed=3)
    np.testing.assert_array_equal(a.probe_feats, b.probe_feats)
    assert a.probe_feats.shape == (20, 4) and a.gallery_feats.shape == (50, 4) and a.probe_feats.dtype == np.float32
    assert np.array_equal(np.unique(a.owner), np.arange(8))  # every probe has an image
    assert a.gallery_fids == b.gallery_fids and len(a.probe_fids) == 8


def test_harness_prints_verdicts_and_flags_extrapolation(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "TEST_SCALE", (10, 25, 60))
    rows = bench.bench_scale(1, ["meanemb"], threads=2, naive_probes=4, repeats=1, isolate=False)
    check = rows[0]["naive_check"]
    assert check["extrapolated"] and rows[0]["naive"]["n_timed"] == 4 and check["same"] <= 4
    assert not rows[0]["public_check"]["extrapolated"]  # at 1x the public loop runs every probe
    assert set(rows[0]["kit"]["times"]) == set(bench.STAGES)
    verdicts = bench.print_table(rows, threads=2)
    out = capsys.readouterr().out
    assert "EXTRAPOLATED from 4 probes" in out and "naive/kit" in verdicts[0] and "public/kit" in verdicts[1]
    assert "naive agrees:" in out and "public agrees:" in out and " kit " in out
