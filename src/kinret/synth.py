"""``python -m kinret.synth``: generate (or reuse) the synthetic dataset and report how much family signal its test
split carries: random rankings, raw-pixel cosine, a pixel-to-trait ridge fitted on train (a diagnostic), and the
generator's latent-trait oracle."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from kinret.cli import parser, run_command
from kinret.data.fiw import read_fiw
from kinret.data.split import Track3Split, read_codalab, read_labelled
from kinret.data.synth import SynthConfig, generate
from kinret.features.raw_pixels import RawPixels
from kinret.metrics import evaluate_ranking
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.similarity import cosine_scores, probe_scores


def oracle_scores(truth: Track3Split, latents_path: str | Path) -> np.ndarray:
    """Score a labelled split with the generator's own latent traits (cosine of the members' trait vectors):
    an upper reference that no image model sees. Married-in spouses share no traits, so even it is imperfect."""
    with np.load(latents_path) as data:
        index = {ref: i for i, ref in enumerate(data["refs"].tolist())}
        traits = data["traits"]

    def member(ref: str) -> int:
        return index["/".join(ref.split("/")[:2])]

    probe = traits[[member(p.ref) for p in truth.probes]]
    gallery = traits[[member(g.ref) for g in truth.gallery]]
    return cosine_scores(probe, gallery)


def signal_report(root: str | Path, n_random: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """How learnable the test split is: standard-AP scores of random rankings (mean of `n_random`), raw-pixel
    cosine, a pixel-to-trait ridge fitted on train (diagnostic), and the latent-trait oracle. Random should sit at
    chance, pixel cosine well below the oracle, the ridge in between."""
    root = Path(root)
    test = read_codalab(root / "test")
    truth = read_labelled(root / "test_truth" / "probe_list.csv", root / "test_truth" / "gallery_list.csv", None)

    def score(matrix: np.ndarray) -> dict[str, float]:
        s = evaluate_ranking(rank_gallery(matrix), truth.probe_fids, truth.gallery_fids)
        return {"mAP": s.mAP, "rank@5": s.rank[5], "average": s.average}

    pixels = RawPixels()
    paths, owner = test.probe_image_table()
    probe_px, probe_ok = pixels(paths)
    gallery_px, gallery_ok = pixels([g.path for g in test.gallery])
    w = _pixels_to_traits(root, pixels)

    def cosine(probe: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        return probe_scores(probe, probe_ok, owner, len(test.probes), gallery, gallery_ok)

    rng = np.random.default_rng(seed)
    runs = [score(rng.random((len(test.probes), len(test.gallery)))) for _ in range(n_random)]
    return {
        "random": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
        "raw_pixels": score(cosine(probe_px, gallery_px)),
        "pixel_ridge": score(cosine(probe_px @ w, gallery_px @ w)),
        "oracle": score(oracle_scores(truth, root / "latents.npz")),
    }


def _pixels_to_traits(root: Path, pixels: RawPixels, ridge: float = 100.0) -> np.ndarray:
    """A diagnostic, not a kit method: ridge regression from raw pixels to the latent traits, fitted on the train
    split's images. It shows the kinship signal is in the pixels and learnable, though plain pixel cosine is drowned
    by pose, light and age."""
    with np.load(root / "latents.npz") as data:
        index = {ref: i for i, ref in enumerate(data["refs"].tolist())}
        traits = data["traits"]
    paths, rows = [], []
    for fam in read_fiw(root / "train"):
        for m in fam.members:
            paths += m.images
            rows += [index[f"{fam.fid}/{m.mid}"]] * len(m.images)
    x, _ = pixels(paths)
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1], dtype=np.float32), x.T @ traits[rows])


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m kinret.synth", __doc__)
    p.add_argument("--root", type=Path, default=Path("data") / "synthetic", help="where the dataset goes")
    for f in dataclasses.fields(SynthConfig):
        if f.name != "version":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    p.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    p.add_argument("--no-report", action="store_true", help="only generate")
    args = p.parse_args(argv)
    return run_command(lambda: _run(args), args)


def _run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig) if f.name != "version"})
    root = generate(args.root, cfg, force=args.force)
    if not args.no_report:
        print(f"test split of {root}, standard AP:")
        for name, s in signal_report(root).items():
            print(f"  {name:<12} mAP {s['mAP']:.4f}  Rank@5 {s['rank@5']:.4f}  Average {s['average']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
