"""The transductive re-scorings (`kinret.scoring.transductive.RESCORINGS`) timed side by side with the plain cosine
they start from, at test scale and 10x, on embeddings with a planted family and identity structure.

The inputs: families, each with one probe subject (several photos) and other members whose photos form the gallery;
a photo is 0.45 x its family's vector + 0.9 x its person's vector + N(0, 1) noise in 128 dimensions (the plain
cosine's Average then lands near zero-shot SFace's on real families, ~0.26). Test scale is 190 probes, 1,487 probe
photos, 3,897 gallery faces; 10x is 1,900 / 14,870 / 38,970. Each (scale, recipe) runs in a fresh process with
`--threads` BLAS threads and times what a variant costs from the embeddings: the probes' mean embeddings
(`mean_embedding`) then `rescore`; "cosine" is the empty recipe (the kit's cos-emb-meanemb). Memory is that
process's peak RSS. The Average (mAP + Rank@5) / 2, standard AP, is printed so that a recipe's cost can be set against
what it did on these inputs (planted data: not evidence for real faces).

Clustering: up to 8,000 gallery faces it is exact average linkage over all pairs; at 10x that would be 5.7 GiB of
float32 similarities and 5.7 GiB of float64 distances, copied by scipy, so `gallery_clusters` clusters per block of a
32-nearest-neighbour graph instead. `--agreement N` (default 8,000) clusters N faces drawn like the test scale's both
ways and prints how many same-cluster pairs the blocked path shares with the exact one (precision and recall over
pairs), then times the blocked path on the 10x gallery.

    python benchmarks/bench_rescoring.py                 # scales 1 and 10, every recipe, agreement at 8,000
    python benchmarks/bench_rescoring.py --scale 1 --agreement 0
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from kinret.metrics import evaluate_ranking
from kinret.scoring.clusters import gallery_clusters, relative_threshold
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.similarity import mean_embedding
from kinret.scoring.transductive import RESCORINGS, Rescoring, rescore

TEST_SCALE = (190, 1487, 3897)  # probes, probe photos, gallery faces
DIM = 128
RECIPES = {"cosine": Rescoring(), **RESCORINGS}
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def make_inputs(n_probes: int, n_images: int, n_gallery: int, dim: int = DIM, seed: int = 0):
    """(probe photos (M, D), owner (M,), gallery (N, D), gallery family (N,)): probe p is family p's first member;
    the gallery faces are spread over 2-6 other members of each family."""
    rng = np.random.default_rng(seed)
    family = rng.standard_normal((n_probes, dim), dtype=np.float32)
    owner = rng.permutation(np.concatenate([np.arange(n_probes), rng.integers(0, n_probes, n_images - n_probes)]))
    probe = 0.45 * family[owner] + 0.9 * rng.standard_normal((n_probes, dim), dtype=np.float32)[owner]
    members = rng.integers(2, 7, n_probes)  # gallery members of each family
    member_fam = np.repeat(np.arange(n_probes), members)
    person = rng.standard_normal((len(member_fam), dim), dtype=np.float32)
    who = np.concatenate([np.arange(len(member_fam)), rng.integers(0, len(member_fam), n_gallery - len(member_fam))])
    gallery = 0.45 * family[member_fam[who]] + 0.9 * person[who]
    probe += rng.standard_normal(probe.shape, dtype=np.float32)
    gallery += rng.standard_normal(gallery.shape, dtype=np.float32)
    return probe, owner, gallery, member_fam[who]


def run_one(scale: int, name: str) -> dict:
    """One recipe at one scale, timed from the embeddings; its Average and the process's peak RSS."""
    probe, owner, gallery, gallery_fam = make_inputs(*(n * scale for n in TEST_SCALE))
    n_probes = TEST_SCALE[0] * scale
    start = time.perf_counter()
    scores = rescore(mean_embedding(probe, owner, n_probes), gallery, RECIPES[name])
    seconds = time.perf_counter() - start
    result = evaluate_ranking(rank_gallery(scores), np.arange(n_probes), gallery_fam)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"seconds": seconds, "gib": peak, "mAP": result.mAP, "rank5": result.rank[5], "average": result.average}


def pair_agreement(exact: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of `other`'s same-cluster pairs against `exact`'s, counted from the contingency table."""
    def pairs(counts: np.ndarray) -> float:
        return float((counts * (counts - 1) / 2).sum())

    _, joint = np.unique(np.stack([exact, other]), axis=1, return_counts=True)
    both = pairs(joint)
    return both / max(pairs(np.bincount(other)), 1), both / max(pairs(np.bincount(exact)), 1)


def clustering(n: int) -> dict:
    """Exact against blocked clustering (z 2.5, no DBA) of n gallery faces drawn like the test scale's (about five
    photos a person), then the blocked path alone on the 10x gallery."""
    p = round(TEST_SCALE[0] * n / TEST_SCALE[2])
    gallery = make_inputs(p, p * 8, n)[2]
    threshold = relative_threshold(gallery, 2.5)
    t0 = time.perf_counter()
    exact = gallery_clusters(gallery, threshold, exact_max=n)
    t1 = time.perf_counter()
    blocked = gallery_clusters(gallery, threshold, exact_max=0)
    t2 = time.perf_counter()
    big = make_inputs(*(n_ * 10 for n_ in TEST_SCALE))[2]
    t3 = time.perf_counter()
    at_10x = gallery_clusters(big, relative_threshold(big, 2.5))
    t4 = time.perf_counter()
    precision, recall = pair_agreement(exact, blocked)
    return {"exact_s": t1 - t0, "blocked_s": t2 - t1, "precision": precision, "recall": recall,
            "exact_clusters": int(exact.max() + 1), "blocked_clusters": int(blocked.max() + 1),
            "10x_s": t4 - t3, "10x_clusters": int(at_10x.max() + 1), "10x_faces": len(big),
            "gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def in_fresh_process(threads: int, fn, *args) -> dict:
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, nargs="+", default=[1, 10])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--agreement", type=int, default=8000, help="faces clustered exactly and blocked (0: skip)")
    args = p.parse_args(argv)
    for scale in args.scale:
        probes, photos, faces = (n * scale for n in TEST_SCALE)
        print(f"\nscale {scale}x: {probes} probes ({photos} photos) x {faces} gallery faces x {DIM}-d, "
              f"{args.threads} threads")
        print(f"| recipe | seconds | x cosine | peak GiB | mAP | Rank@5 | Average |\n|{'---|' * 7}")
        base = None
        for name in args.recipes:
            r = in_fresh_process(args.threads, run_one, scale, name)
            base = r["seconds"] if name == "cosine" else base
            ratio = f"{r['seconds'] / base:.1f}" if base else "-"
            print(f"| {name} | {r['seconds']:.2f} | {ratio} | {r['gib']:.2f} | {r['mAP']:.3f} | {r['rank5']:.3f} | "
                  f"{r['average']:.3f} |", flush=True)
    if args.agreement:
        a = in_fresh_process(args.threads, clustering, args.agreement)
        n10 = a["10x_faces"]
        print(f"\nclustering {args.agreement} faces: exact average linkage {a['exact_s']:.1f} s, "
              f"{a['exact_clusters']} clusters; blocked (32-NN graph, blocks <= 2,000) {a['blocked_s']:.1f} s, "
              f"{a['blocked_clusters']} clusters; the blocked path's same-cluster pairs against the exact one's: "
              f"precision {a['precision']:.4f}, recall {a['recall']:.4f}")
        print(f"clustering {n10} faces (10x): blocked {a['10x_s']:.1f} s, {a['10x_clusters']} clusters; exact would "
              f"hold {n10 * n10 * 4 / 2**30:.1f} GiB of float32 similarities and {n10 * (n10 - 1) / 2 * 8 / 2**30:.1f} "
              f"GiB of float64 distances (twice: linkage copies them); peak {a['gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
