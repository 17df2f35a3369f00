"""Large galleries on a small machine (issue 29): one score matrix held at a time, blockwise ranking, metrics,
normalisation and submission that give the whole-matrix numbers exactly, the float16 store and the ties it could
create, shared neighbour lists and per-component linkage that change nothing, and a progress line in every loop of
the scoring, choice and submission stages."""

from __future__ import annotations

import json
import logging
import zipfile
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from kinret.ensemble.blend import normalise
from kinret.ensemble.selection import Scorer
from kinret.metrics import cmc_curve, evaluate_ranking, hits_in_rank_order, per_probe_results, relevance, roc_auc
from kinret.scoring.clusters import canonical_labels, gallery_clusters, relative_threshold
from kinret.scoring.neighbours import Neighbours, knn, top_k
from kinret.scoring.protocols import SplitData
from kinret.scoring.ranking import float16_ranks_alike, rank_gallery
from kinret.scoring.similarity import l2_normalize
from kinret.scoring.store import load_results, load_scores, results_path, stored_dtype
from kinret.scoring.transductive import RESCORINGS, rescore
from kinret.scoring.variant_kinds import Cosine, Rescored
from kinret.scoring.variants import Group, Keep, score_group
from kinret.submission import make as submit
from kinret.submission.predictions import format_predictions, read_predictions, zip_predictions
from kinret.submission.report import cmc_from_first, kin_histogram, pair_auc


def tied_scores(rng, p=9, n=57):
    """Scores with exact ties inside rows and across the k-th place of a top-k."""
    return np.round(rng.normal(size=(p, n)), 1).astype(np.float32)


# ---- float16 storage: only where it ranks alike ---------------------------------------------------------------------
def test_float16_is_refused_where_the_cast_ties_two_faces_out_of_their_index_order():
    assert not float16_ranks_alike(np.array([[1.0, 1.0001, 0.5]], dtype=np.float32))  # face 1 first; tied: face 0
    assert float16_ranks_alike(np.array([[1.0001, 1.0, 0.5]], dtype=np.float32))  # tied, but in index order anyway
    assert float16_ranks_alike(np.array([[0.5, 0.25, 0.75], [1.0, 1.0, -1.0]], dtype=np.float32))
    assert not float16_ranks_alike(np.array([[1e5, 0.0]], dtype=np.float32))  # beyond float16's range
    rng = np.random.default_rng(0)
    for _ in range(20):  # the check against ranking the float16 copy itself
        s = rng.normal(size=(6, 300)).astype(np.float32) * rng.choice([1e-3, 1.0])
        same = np.array_equal(rank_gallery(s), rank_gallery(s.astype(np.float16).astype(np.float32)))
        assert float16_ranks_alike(s, chunk_rows=4) == same


class Fixed:
    """A source whose 'embeddings' make the cosine matrix below (one image a probe)."""

    def __init__(self, probe, gallery):
        self.vectors = np.vstack([probe, gallery]).astype(np.float32)

    def key(self, images):
        return "fixed"

    def embeddings(self, images, names=None):
        return {"emb": self.vectors}


def one_probe_split(n_gallery):
    split = SimpleNamespace(probes=[SimpleNamespace(ref="s0")],
                            gallery=[SimpleNamespace(ref=f"face{j}") for j in range(n_gallery)])
    return SplitData("test", split, list(range(1 + n_gallery)), np.array([0]), np.array([0]),
                     np.arange(1, 1 + n_gallery), None)


@pytest.mark.parametrize("angles, half", [((0.0095, 0.0, 1.0), False), ((0.0, 0.0095, 1.0), True)])
def test_a_matrix_kept_for_its_ranking_is_float16_only_where_that_ranks_alike(tmp_path, angles, half):
    """Gallery faces at these angles from the probe: cosines 0.99995 and 1 both cast to float16's 1.0, which puts
    face 0 first: the matrix is kept as float32 when face 1 was first, as float16 when face 0 was."""
    gallery = np.array([[np.cos(a), np.sin(a)] for a in angles])
    group = Group("g", [Cosine("emb", "meanemb")], {None: Fixed(np.array([[1.0, 0.0]]), gallery)})
    sd = one_probe_split(len(angles))
    path = tmp_path / "g_cos-emb-meanemb" / "test.npy"
    list(score_group(group, sd, tmp_path, keep=Keep(False, frozenset({"g:cos-emb-meanemb"}),
                                                     frozenset({"g:cos-emb-meanemb"}))))
    assert stored_dtype(path) == (np.float16 if half else np.float32)
    want = rank_gallery(Fixed(np.array([[1.0, 0.0]]), gallery).vectors[:1] @ l2_normalize(gallery).T)
    assert np.array_equal(rank_gallery(load_scores(path, ["s0"], sd.gallery_ids)), want)
    # a blend reads its values: a float16 matrix is not served to it, but computed and kept as float32
    list(score_group(group, sd, tmp_path, keep=Keep(False, frozenset({"g:cos-emb-meanemb"}))))
    assert stored_dtype(path) == np.float32


# ---- blockwise equals whole ------------------------------------------------------------------------------------------
def test_per_probe_results_and_terms_in_blocks_are_the_whole_matrix_s():
    rng = np.random.default_rng(1)
    s = tied_scores(rng)
    pf, gf = np.arange(9) % 4, rng.integers(0, 5, 57)
    whole = per_probe_results(rank_gallery(s), relevance(pf, gf))
    for block in (57, 2 * 57 + 3, 1 << 22):  # one row, two rows, everything at once
        scorer = Scorer(pf, gf, block=block)
        pd.testing.assert_frame_equal(scorer.per_probe(s), whole)
        assert np.array_equal(scorer.terms(s), Scorer(pf, gf).terms(s))


@pytest.mark.parametrize("how", ["z", "rank"])
def test_normalisation_in_blocks_is_the_whole_matrix_s(how):
    s = tied_scores(np.random.default_rng(2))
    assert np.array_equal(normalise(s, how, block=57), normalise(s, how, block=1 << 30))


def test_the_submission_in_blocks_writes_and_scores_what_the_whole_ranking_does(tmp_path):
    rng = np.random.default_rng(3)
    s = tied_scores(rng, 11, 40)
    pf, gf = np.arange(11) % 5, rng.integers(0, 6, 40)
    split = SimpleNamespace(probes=list(pf), gallery=list(gf), labelled=False, describe=lambda: "11 x 40")
    truth = SimpleNamespace(probes=list(pf), gallery=list(gf), probe_fids=pf, gallery_fids=gf)
    sub = submit.submit(s, split, tmp_path, truth, "x.zip", block=3 * 40)
    assert sub.csv_path.read_bytes() == format_predictions(rank_gallery(s))
    assert np.array_equal(read_predictions(sub.zip_path, 11, 40), rank_gallery(s))
    for ap in ("standard", "trapezoid"):
        want = evaluate_ranking(rank_gallery(s), pf, gf, ap)
        got = sub.scores[ap]
        assert got.mAP == want.mAP and got.rank == want.rank and np.array_equal(got.per_probe_ap, want.per_probe_ap)


def test_the_zip_is_written_a_chunk_at_a_time(tmp_path):
    csv = tmp_path / "predictions.csv"
    csv.write_bytes(format_predictions(rank_gallery(tied_scores(np.random.default_rng(4), 30, 200))))
    zip_predictions(csv, tmp_path / "p.zip", chunk=1000)
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        assert zf.namelist() == ["predictions.csv"] and zf.read("predictions.csv") == csv.read_bytes()


# ---- neighbours, clusters and re-scorings: shared work, the same numbers ---------------------------------------------
def test_top_k_is_the_stable_order_with_ties_across_the_kth_place():
    s = tied_scores(np.random.default_rng(5), 40, 30)
    for k in (1, 3, 7, 30):
        assert np.array_equal(top_k(s, k), np.argsort(-s, axis=1, kind="stable")[:, :k])


def test_one_neighbour_list_serves_every_smaller_k_exactly():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    x[10] = x[3]  # duplicates: ties in the lists
    x[20] = x[3]
    near = Neighbours(x, 12)
    for k in (1, 5, 12, 80):
        idx, sim = near(k)
        want_idx, want_sim = knn(x, k)
        assert np.array_equal(idx, want_idx) and np.array_equal(sim, want_sim), k


def blobs(rng, n_ids=30, per=5, dim=12, spread=0.4):
    centres = rng.normal(size=(n_ids, dim))
    g = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(n_ids * per, dim))
    return l2_normalize(g[rng.permutation(len(g))].astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_linkage_per_component_is_linkage_of_the_whole_gallery(seed):
    g = blobs(np.random.default_rng(seed))
    t = relative_threshold(g, 2.0)
    d = np.clip(1.0 - g @ g.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    whole = canonical_labels(fcluster(linkage(squareform(d, checks=False), "average"), t, "distance"))
    assert np.array_equal(gallery_clusters(g, t), whole)
    assert 1 < whole.max() + 1 < len(g)  # neither one cluster nor none


def test_the_blocked_clustering_with_shared_neighbours_is_the_same():
    g = blobs(np.random.default_rng(7))
    t = relative_threshold(g, 2.0)
    assert np.array_equal(gallery_clusters(g, t, exact_max=0, k=8),
                          gallery_clusters(g, t, exact_max=0, k=8, neighbours=Neighbours(l2_normalize(g), 20)))


def test_recipes_sharing_their_work_give_what_each_gives_alone():
    rng = np.random.default_rng(8)
    g = blobs(rng)
    q = l2_normalize(rng.normal(size=(7, 12)).astype(np.float32))
    shared: dict = {}
    for name, how in RESCORINGS.items():
        assert np.array_equal(rescore(q, g, how, shared), rescore(q, g, how)), name
    assert ("dba", 10, 1.0) in shared and ("neighbours", "gallery") in shared


# ---- the report's figures from the per-probe results -----------------------------------------------------------------
def test_the_cmc_from_first_ranks_and_the_pair_auc_are_the_whole_matrix_s():
    rng = np.random.default_rng(9)
    s = tied_scores(rng, 12, 70)
    pf, gf = np.arange(12) % 6, rng.integers(0, 8, 70)
    rel = relevance(pf, gf)
    pp = per_probe_results(rank_gallery(s), rel)
    assert np.array_equal(cmc_from_first(pp["first"].to_numpy(), 70), cmc_curve(hits_in_rank_order(rank_gallery(s),
                                                                                                      rel)))
    codes = np.unique(np.r_[pf, gf], return_inverse=True)[1]
    p, g = codes[:12], codes[12:]
    want = roc_auc(s.ravel(), rel.ravel())
    assert pair_auc(s, p, g, s[rel], block=70 * 5) == pytest.approx(want, abs=1e-12)
    fig = kin_histogram(s, pf, gf, "t", "score", most=200)  # the sampled path: the title keeps every pair's AUC
    assert f"kin vs non-kin AUC {want:.3f} (non-kin drawn from" in fig.axes[0].get_title()


# ---- stored results are checked when read ----------------------------------------------------------------------------
def test_damaged_per_probe_results_are_named_and_computed_again(tmp_path, caplog):
    group = Group("g", [Cosine("emb", "meanemb"), Rescored("dsm", "emb")], {None: Fixed(np.eye(1, 3), np.eye(5, 3))})
    sd = one_probe_split(5)
    labels = SimpleNamespace(probe_fids=["F1"], gallery_fids=["F1", "F2", "F1", "F3", "F2"])
    sd = SplitData(sd.name, sd.split, sd.images, sd.probe_rows, sd.owner, sd.gallery_rows, labels)
    evaluate = Scorer(labels.probe_fids, labels.gallery_fids).per_probe
    first = dict(score_group(group, sd, tmp_path, evaluate))
    path = tmp_path / "g_cos-emb-meanemb" / "test.npy"
    key = str(np.load(results_path(path))["key"])
    np.savez(results_path(path), key=np.asarray(key), ap=np.array([1.5]), first=np.array([0.0]),
             ap_trapezoid=np.array([1.0]))
    with caplog.at_level(logging.WARNING):
        assert load_results(path, key, 1, 5) is None
        again = dict(score_group(group, sd, tmp_path, evaluate))
    assert "damaged per-probe results" in caplog.text and str(results_path(path)) in caplog.text
    pd.testing.assert_frame_equal(again["g:cos-emb-meanemb"], first["g:cos-emb-meanemb"])
    results_path(path).write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING):
        assert load_results(path, key, 1, 5) is None
    assert "unreadable per-probe results" in caplog.text


# ---- a line in every loop --------------------------------------------------------------------------------------------
def test_every_loop_of_scoring_choice_and_submission_prints_progress(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KINRET_NO_PROGRESS", raising=False)
    monkeypatch.setenv("KINRET_PROGRESS_SECONDS", "0")  # a line at every step
    work = tmp_path / "work"
    argv = ["--data-root", str(tiny_data), "--out", str(tmp_path / "out"), "--experiments", "--runs",
            str(work / "runs"), "--ensemble-dir", str(work / "ens")]
    assert submit.main(argv) == 0
    err = capsys.readouterr().err
    for desc in ("score oof0, oof1, ", "score val, test", "blend weight search", "rank and write predictions.csv",
                 "zip ", "report: "):
        assert f"kinret.progress: {desc}" in err, desc
    kept = json.loads((work / "ens" / "scores" / "kept.json").read_text())
    assert kept["choose_on"] and all(n.startswith("oof") for n in kept["choose_on"]) and kept["variants"]


def test_the_max_of_cosines_in_probe_blocks_is_the_whole_matrix_s():
    from kinret.scoring.similarity import cosine_variant

    rng = np.random.default_rng(10)
    owner = rng.permutation(np.r_[np.arange(13), rng.integers(0, 13, 30)])
    probe, gallery = rng.normal(size=(len(owner), 6)).astype(np.float32), rng.normal(size=(40, 6)).astype(np.float32)
    whole = cosine_variant(probe, owner, 13, gallery, "max")
    for block in (40, 3 * 40 * 43 // 13, 500):  # a probe at a time, a few, several
        np.testing.assert_allclose(cosine_variant(probe, owner, 13, gallery, "max", block=block), whole, atol=1e-6)


def test_re_scorings_in_blocks_match_the_whole_matrix():
    """Past their block size the cluster-fused scores and the dual softmax run on blocks: rows exactly (the row
    logsumexp), the rest within float rounding."""
    from scipy.special import logsumexp

    from kinret.scoring import transductive

    rng = np.random.default_rng(12)
    z = (rng.normal(size=(23, 170)) * 5).astype(np.float32)
    for block in (1, 60, 500):
        assert np.array_equal(transductive._logsumexp(z, 1, block), logsumexp(z, axis=1, keepdims=True))
        np.testing.assert_allclose(transductive._logsumexp(z, 0, block), logsumexp(z, axis=0, keepdims=True),
                                   rtol=1e-6)
    q, g = rng.normal(size=(23, 8)).astype(np.float32), rng.normal(size=(170, 8)).astype(np.float32)
    labels = rng.integers(0, 50, 170)
    whole = transductive.cluster_fused_scores(q, g, labels, block=1 << 30)
    np.testing.assert_allclose(transductive.cluster_fused_scores(q, g, labels, block=170 * 4), whole, atol=1e-6)


def test_per_probe_results_from_the_relatives_places_are_the_ranking_s_to_the_last_bit():
    """`Scorer.per_probe` and `.terms` place each probe's relatives without ranking the rows; ties (between
    relatives, with other faces, -0.0 and 0.0) go to the full ranking. Random rows, with and without ties."""
    rng = np.random.default_rng(11)
    for trial in range(150):
        p, n = int(rng.integers(1, 12)), int(rng.integers(1, 60))
        scorer = Scorer(np.arange(p), rng.integers(0, p + 2, n), block=int(rng.choice([n, 3 * n, 1 << 20])))
        s = rng.normal(size=(p, n)).astype(np.float32)
        if trial % 3 == 0:
            s = np.round(s, 1).astype(np.float32)
        if trial % 5 == 0:
            s[:, ::2], s[:, 1::4] = 0.0, -0.0
        ranking = rank_gallery(s)
        pd.testing.assert_frame_equal(scorer.per_probe(s), per_probe_results(ranking, scorer.rel), check_exact=True)
        hits = hits_in_rank_order(ranking, scorer.rel)
        from kinret.metrics import average_precision

        assert np.array_equal(scorer.terms(s), (average_precision(hits) + hits[:, :5].any(axis=1)) / 2.0)
