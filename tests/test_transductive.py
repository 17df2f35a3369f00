"""Transductive re-scoring: known answers on tiny matrices, each vectorised function against a naive loop kept here,
and its wiring into the variants (names, the fold average, FC over all pairs only on request)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kinret.ensemble.discovery import discover_groups, filter_groups
from kinret.errors import KinretInputError
from kinret.scoring.clusters import gallery_clusters, relative_threshold
from kinret.scoring.neighbours import knn
from kinret.scoring.protocols import SplitData
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.transductive import (
    DEFAULT_RESCORINGS,
    RESCORINGS,
    Rescoring,
    cluster_fused_scores,
    dba,
    diverse_head,
    dual_softmax,
    query_expansion,
    rescore,
    sinkhorn,
)
from kinret.scoring.variant_kinds import Cosine, FcAllPairs, GroupSpec, Rescored, joint_vectors, offered_variants
from kinret.scoring.variants import Group, group_scores


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return all(np.array_equal(a[i] == a, b[i] == b) for i in range(len(a)))


def blobs(rng, centres: int, per: int, dim: int = 16, spread: float = 0.15):
    c = rng.normal(size=(centres, dim))
    x = np.repeat(c, per, axis=0) + spread * rng.normal(size=(centres * per, dim))
    return unit(x).astype(np.float32), np.repeat(np.arange(centres), per)


# ---- naive references -----------------------------------------------------------------------------------------------
def naive_knn(x, k):
    s = unit(x) @ unit(x).T
    out = []
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-s[i, j], j))
        out.append([i] + others[:k - 1])
    return np.array(out), np.take_along_axis(s, np.array(out), 1)


def naive_average_linkage(x, t):
    d = 1 - unit(x) @ unit(x).T
    clusters = [[i] for i in range(len(x))]
    while len(clusters) > 1:
        best = min((np.mean(d[np.ix_(a, b)]), i, j) for i, a in enumerate(clusters) for j, b in enumerate(clusters)
                   if i < j)
        if best[0] > t:
            break
        _, i, j = best
        clusters[i] = clusters[i] + clusters.pop(j)
    labels = np.empty(len(x), dtype=int)
    for c, members in enumerate(clusters):
        labels[members] = c
    return labels


def naive_diverse_order(s, labels, k):
    out = []
    for row in s:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        head, seen = [], set()
        for j in order:  # the first face met of each cluster is its best one
            if labels[j] not in seen and len(head) < k:
                seen.add(labels[j])
                head.append(j)
        out.append(head + [j for j in order if j not in head])
    return np.array(out)


# ---- DBA, query expansion, kNN --------------------------------------------------------------------------------------
def test_knn_against_the_loop_with_itself_first():
    x = np.random.default_rng(0).normal(size=(23, 6)).astype(np.float32)
    idx, sim = knn(x, 5)
    want_idx, want_sim = naive_knn(x, 5)
    assert np.array_equal(idx, want_idx) and np.allclose(sim, want_sim, atol=1e-5)
    assert knn(x, 100)[0].shape == (23, 23)


def test_dba_by_hand():
    g = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    got = dba(g, k=2)  # each face plus its nearest other face, weighted by their cosine
    assert np.allclose(got, unit([[1 + 0.8 * 0.8, 0.8 * 0.6], [0.8 + 0.8, 0.6], [0.6 * 0.8, 1 + 0.6 * 0.6]]),
                       atol=1e-6)
    assert np.allclose(dba(g, k=3, alpha=0.0), unit(np.tile(g.sum(0), (3, 1))), atol=1e-6)  # plain mean of all
    assert np.array_equal(dba(g, k=1), g)


@pytest.mark.parametrize("k, alpha", [(4, 1.0), (7, 3.0), (1, 1.0)])
def test_dba_against_the_loop(k, alpha):
    g = np.random.default_rng(1).normal(size=(19, 5)).astype(np.float32)
    idx, sim = naive_knn(g, k)
    want = unit(np.stack([(np.maximum(sim[j], 0) ** alpha) @ unit(g)[idx[j]] for j in range(len(g))]))
    assert np.allclose(dba(g, k, alpha), want, atol=1e-5)


def test_query_expansion_by_hand_and_against_the_loop():
    g = np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)
    q = np.array([[0.8, 0.6]], dtype=np.float32)  # cosines 0.8, 0.96, -0.8: the top 2 are faces 1, 0
    assert np.allclose(query_expansion(q, g, k=2), unit(q + 0.96 * g[1] + 0.8 * g[0]), atol=1e-6)
    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(6, 5)), rng.normal(size=(17, 5))
    s = unit(q) @ unit(g).T
    want = []
    for i in range(len(q)):
        top = sorted(range(len(g)), key=lambda j: (-s[i, j], j))[:4]
        want.append(unit(q)[i] + sum(max(s[i, j], 0) ** 2 * unit(g)[j] for j in top))
    assert np.allclose(query_expansion(q, g, 4, alpha=2.0), unit(np.array(want)), atol=1e-5)
    assert np.allclose(query_expansion(q, g, 50), unit(unit(q) + np.maximum(s, 0) @ unit(g)), atol=1e-5)


# ---- clusters --------------------------------------------------------------------------------------------------------
def test_two_obvious_identities():
    g = np.array([[1, 0.05, 0], [1, -0.05, 0], [0.98, 0, 0.05], [0, 1, 0.02], [0.03, 1, 0]], dtype=np.float32)
    assert gallery_clusters(g, 0.3).tolist() == [0, 0, 0, 1, 1]
    assert gallery_clusters(g, 1.5).tolist() == [0, 0, 0, 0, 0]
    assert gallery_clusters(g, 0.0).tolist() == [0, 1, 2, 3, 4]
    assert same_partition(gallery_clusters(g, 0.3, exact_max=0, k=2), [0, 0, 0, 1, 1])  # the blocked path


def test_relative_threshold_is_the_pairwise_mean_plus_z_std():
    g = np.random.default_rng(3).normal(size=(30, 7))
    s = unit(g) @ unit(g).T
    off = s[~np.eye(30, dtype=bool)]
    assert relative_threshold(g, 2.0) == pytest.approx(1 - (off.mean() + 2 * off.std()), abs=1e-6)
    assert relative_threshold(g, 0.0) == pytest.approx(1 - off.mean(), abs=1e-6)
    assert relative_threshold(g * 7.5, 2.0) == pytest.approx(relative_threshold(g, 2.0))  # scale-free


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_linkage_against_the_loop_and_the_blocked_path(seed):
    rng = np.random.default_rng(seed)
    g, _ = blobs(rng, 6, 4, dim=8, spread=0.5)
    g = g[rng.permutation(len(g))]
    t = relative_threshold(g, 1.5)
    exact = gallery_clusters(g, t)
    assert same_partition(exact, naive_average_linkage(g, t))
    assert exact[0] == 0 and set(exact) == set(range(exact.max() + 1))  # numbered by first face
    # per connected component of the pairs within t, the same partition; max_block splits by longest edge
    assert same_partition(gallery_clusters(g, t, exact_max=0, k=len(g), max_block=len(g)), exact)
    small = gallery_clusters(g, t, exact_max=0, k=len(g), max_block=3)
    assert np.bincount(small).max() <= 3


def test_cluster_fused_scores_against_the_loop():
    rng = np.random.default_rng(4)
    q, g = rng.normal(size=(3, 5)), rng.normal(size=(9, 5))
    labels = np.array([0, 1, 0, 2, 1, 1, 3, 0, 2])
    want = np.empty((3, 9))
    for i in range(3):
        for j in range(9):
            centre = unit(unit(g)[labels == labels[j]].mean(0, keepdims=True))[0]
            want[i, j] = 0.7 * unit(q)[i] @ unit(g)[j] + 0.3 * unit(q)[i] @ centre
    assert np.allclose(cluster_fused_scores(q, g, labels, mix=0.3), want, atol=1e-5)


# ---- the identity-diverse head ---------------------------------------------------------------------------------------
def test_diverse_head_by_hand():
    s = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2, 0])
    got = diverse_head(s, labels, k=2)
    assert rank_gallery(got)[0].tolist() == [0, 2, 1, 3, 4, 5]  # clusters 0 and 1 first, then by score
    assert rank_gallery(diverse_head(s, labels, k=5))[0].tolist() == [0, 2, 4, 1, 3, 5]  # only 3 clusters
    assert np.array_equal(got[0, [1, 3, 4, 5]], s[0, [1, 3, 4, 5]])  # the rest keep their scores
    assert np.array_equal(diverse_head(s, labels, k=0), s)


@pytest.mark.parametrize("ties", [False, True])
def test_diverse_head_ranks_exactly_in_the_diverse_order(ties):
    rng = np.random.default_rng(5)
    s = rng.integers(0, 4, size=(40, 30)).astype(np.float32) if ties else rng.normal(size=(40, 30)).astype(np.float32)
    s[3] = 1e-9 * np.arange(30)  # differences below float32 precision of the lift
    labels = rng.integers(0, 9, size=30)
    for k in (1, 5, 9, 20):
        got = diverse_head(s, labels, k, chunk_rows=7)
        assert np.array_equal(rank_gallery(got), naive_diverse_order(s, labels, k))


# ---- normalisation over probes ---------------------------------------------------------------------------------------
def test_the_column_softmax_gives_a_face_to_the_probe_it_is_closest_to():
    s = np.array([[0.9, 0.2], [0.5, 0.45]], dtype=np.float32)  # probe 1 ranks face 0 first, but face 0 is probe 0's
    assert rank_gallery(s)[1].tolist() == [0, 1]
    assert rank_gallery(dual_softmax(s, 0.1))[1].tolist() == [1, 0]
    assert rank_gallery(sinkhorn(s, 0.1, 50))[1].tolist() == [1, 0]
    assert rank_gallery(dual_softmax(s, 0.1))[0].tolist() == [0, 1]


def test_dual_softmax_and_sinkhorn_against_loops():
    s = np.random.default_rng(6).normal(size=(5, 8)).astype(np.float32)
    t = 0.7
    e = np.exp(s.astype(np.float64) / t)
    want = np.log(e / e.sum(1, keepdims=True)) + np.log(e / e.sum(0, keepdims=True))
    assert np.allclose(dual_softmax(s, t), want, atol=1e-4)
    m = e.copy()
    for _ in range(200):  # the textbook alternation on the matrix itself
        m *= (8 / 5) / m.sum(1, keepdims=True)
        m /= m.sum(0, keepdims=True)
    got = sinkhorn(s, t, n_iter=200)
    assert np.allclose(got, np.log(m), atol=1e-3)
    assert np.allclose(np.exp(got).sum(0), 1, atol=1e-4) and np.allclose(np.exp(got).sum(1), 8 / 5, atol=1e-3)
    with pytest.raises(ValueError, match="finite"):
        dual_softmax(np.array([[0.0, np.inf]]), 1.0)


def test_sinkhorn_falls_back_to_logs_where_exp_underflows_a_row():
    s = np.array([[0.0, 1.0, 0.5], [-300.0, -300.5, -299.0]], dtype=np.float32)  # row 1: exp(-300) is 0 in float32
    got = sinkhorn(s, 1.0, n_iter=100)
    assert np.isfinite(got).all()
    assert np.allclose(np.exp(got.astype(np.float64)).sum(0), 1, atol=1e-4)
    assert np.allclose(np.exp(got.astype(np.float64)).sum(1), 3 / 2, atol=1e-4)
    assert rank_gallery(got)[1].tolist() == [2, 0, 1]


# ---- recipes ---------------------------------------------------------------------------------------------------------
def test_every_recipe_gives_finite_scores_and_the_empty_one_the_cosine():
    rng = np.random.default_rng(7)
    g, _ = blobs(rng, 12, 5)
    q = unit(rng.normal(size=(6, 16)))
    assert np.allclose(rescore(q, g, Rescoring()), unit(q) @ unit(g).T, atol=1e-6)
    for name, how in RESCORINGS.items():
        got = rescore(q, g, how)
        assert got.shape == (6, 60) and got.dtype == np.float32 and np.isfinite(got).all(), name
        if how.diverse_k:
            gal = dba(g, how.dba_k, how.dba_alpha) if how.dba_k else g
            labels = gallery_clusters(gal, relative_threshold(gal, how.cluster_z))
            heads = labels[rank_gallery(got)[:, :how.diverse_k]]
            assert all(len(set(h)) == how.diverse_k for h in heads), name
    with pytest.raises(ValueError, match="needs clusters"):
        Rescoring(diverse_k=5)


def test_dba_joins_a_noisy_face_to_its_identity():
    rng = np.random.default_rng(8)
    g, ident = blobs(rng, 20, 6, spread=0.35)
    q = unit(np.repeat(g[::6], 1, axis=0) + 0.35 * rng.normal(size=(20, 16)))  # a fresh photo of each identity
    hits = (ident[rank_gallery(rescore(q, g, Rescoring()))[:, :5]] == np.arange(20)[:, None]).mean()
    hits_dba = (ident[rank_gallery(rescore(q, g, RESCORINGS["dba10"]))[:, :5]] == np.arange(20)[:, None]).mean()
    assert hits_dba > hits


# ---- wiring into the variants ----------------------------------------------------------------------------------------
def labels(kinds):
    return [k.label for k in kinds]


def test_the_listed_variants():
    listed, on_request = offered_variants(GroupSpec(("emb",), "emb", pair_head=True))
    assert labels(listed) == ["cos-emb-meanemb", "cos-emb-max", *(f"{r}-emb" for r in DEFAULT_RESCORINGS),
                              "rerank100-emb"]
    assert labels(on_request) == ["qe5-emb", "sink-emb", "fc-mean", "fc-max", "fc-meanemb"]
    assert set(DEFAULT_RESCORINGS) < set(RESCORINGS)
    listed, on_request = offered_variants(GroupSpec(("emb",), "emb", pair_head=True, top_n=7, fc_all=True))
    assert labels(listed)[-4:] == ["fc-mean", "fc-max", "fc-meanemb", "rerank7-emb"]
    assert labels(on_request) == ["qe5-emb", "sink-emb"]
    listed, on_request = offered_variants(GroupSpec(("a", "b")))  # no main embedding, no pair head
    assert labels(listed) == ["cos-a-meanemb", "cos-a-max", "cos-b-meanemb", "cos-b-max"] and on_request == []
    listed, on_request = offered_variants(GroupSpec(("pixels",), "pixels", rescore_listed=False))
    assert labels(listed) == ["cos-pixels-meanemb", "cos-pixels-max"]
    assert labels(on_request) == [f"{r}-pixels" for r in RESCORINGS]
    assert 4 <= len(RESCORINGS) <= 8


class FakeSource:
    def __init__(self, seed):
        self.seed, self.pair_fn = seed, None

    def key(self, images):
        return f"fake{self.seed}"

    def embeddings(self, images, names=None):
        return {"emb": np.random.default_rng(self.seed).normal(size=(len(images), 6)).astype(np.float32)}


def fake_split(n_probe_images=7, n_gallery=25):
    owner = np.array([0, 0, 1, 2, 2, 2, 1])
    split = SimpleNamespace(probes=[SimpleNamespace(ref=f"s{i}") for i in range(3)],
                            gallery=[SimpleNamespace(ref=f"face{j}") for j in range(n_gallery)])
    return SplitData("test", split, list(range(n_probe_images + n_gallery)), np.arange(n_probe_images), owner,
                     np.arange(n_probe_images, n_probe_images + n_gallery), None)


def test_fold_models_are_re_scored_once_on_the_mean_of_their_cosines(tmp_path):
    sd = fake_split()
    kinds = [Cosine("emb", "meanemb"), Rescored("dba10", "emb"), Rescored("dsm", "emb")]
    group = Group("g", kinds, {0: FakeSource(0), 1: FakeSource(1)})
    got = group_scores(group, sd, tmp_path)
    views = []
    for seed in (0, 1):
        e = FakeSource(seed).embeddings(sd.images)["emb"]
        q = unit(np.stack([unit(e[:7])[sd.owner == p].sum(0) for p in range(3)]))
        views.append((q.astype(np.float32), unit(e[7:]).astype(np.float32)))
    jq, jg = joint_vectors(views)
    assert np.allclose(jq @ jg.T, got["g:cos-emb-meanemb"], atol=1e-6)  # the joint cosine is the fold average
    assert np.allclose(got["g:dba10-emb"], rescore(jq, jg, RESCORINGS["dba10"]), atol=1e-6)
    assert np.allclose(got["g:dsm-emb"], rescore(jq, jg, RESCORINGS["dsm"]), atol=1e-5)
    assert all(np.array_equal(v, group_scores(group, sd, tmp_path)[k]) for k, v in got.items())  # from the cache


def test_fc_over_all_pairs_only_on_request(tmp_path):
    ext = tmp_path / "external" / "team"
    ext.mkdir(parents=True)
    np.savez(ext / "embeddings.npz", image_ids=np.array(["a"]), embeddings=np.zeros((1, 4), dtype=np.float32))
    groups = discover_groups([], tmp_path / "cache", tmp_path / "external")
    variants = [v for g in groups for v in g.variants]
    assert "team:clus-div5-emb" in variants and "team:qe5-emb" not in variants
    assert not any(":fc-" in v for v in variants)
    assert not any(v.startswith("raw_pixels:") and not v.startswith("raw_pixels:cos-") for v in variants)
    kept = filter_groups(groups, ["raw_pixels:dba10-pixels", "team:qe5-emb"])  # the rest is scored when named
    assert [v for g in kept for v in g.variants] == ["raw_pixels:dba10-pixels", "team:qe5-emb"]
    listed, on_request = offered_variants(GroupSpec(("emb",), "emb", pair_head=True))
    pair = Group("pairs", listed, {}, on_request=[k for k in on_request if isinstance(k, FcAllPairs)])
    assert not any(":fc-" in v for v in pair.variants)
    kept = filter_groups([*groups, pair], ["pairs:fc-mean", "team:dsm-emb"])
    assert [v for g in kept for v in g.variants] == ["team:dsm-emb", "pairs:fc-mean"]
    with pytest.raises(KinretInputError, match="on request: pairs:fc-max"):
        filter_groups([pair], ["pairs:fc-median"])
