"""How much family signal the synthetic dataset's test split carries: random rankings, raw-pixel cosine, a
pixel-to-trait ridge fitted on train (a diagnostic), the generator's latent-trait oracle, and what the old-print style
does (a style-only ranking, raw pixels on print and on plain probes, how often prints retrieve prints). The report
``python -m kinret.synth`` prints after generating the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kinret.data.fiw import read_fiw
from kinret.data.track3 import Track3Split, read_codalab, read_labelled
from kinret.features.raw_pixels import RawPixels
from kinret.metrics import evaluate_ranking
from kinret.readback import DamagedFile, read_npz
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.similarity import cosine_scores, probe_scores


def latents(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The generator's latents.npz, checked; a damaged one names itself and how to make it again (exit code 2)."""
    try:
        return read_npz(path, keys)
    except DamagedFile as exc:
        raise exc.advise(f"generate the data set again: python -m kinret.synth --force --root {Path(path).parent} "
                         "(with the options it was made with)") from None


def oracle_scores(truth: Track3Split, latents_path: str | Path) -> np.ndarray:
    """Score a labelled split with the generator's own latent traits (cosine of the members' trait vectors):
    an upper reference that no image model sees. Married-in spouses share no traits, so even it is imperfect."""
    data = latents(latents_path, ("refs", "traits"))
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
    chance, pixel cosine well below the oracle, the ridge in between.

    With old prints in the split (generator version >= 2) also: `style_only`, a ranking by photo style alone (a
    probe's share of old prints s, a gallery face's print flag t, score s t + (1 - s)(1 - t)), which should sit at
    chance since the style never depends on the family; and the raw-pixel scores of the probes whose photos are
    mostly old prints (`raw_pixels_prints`) and of the others (`raw_pixels_plain`)."""
    root = Path(root)
    test, truth = _test_split(root)

    def score(matrix: np.ndarray, rows: np.ndarray | None = None) -> dict[str, float]:
        rows = np.arange(len(truth.probes)) if rows is None else rows
        s = evaluate_ranking(rank_gallery(matrix[rows]), [truth.probe_fids[i] for i in rows], truth.gallery_fids)
        return {"mAP": s.mAP, "rank@5": s.rank[5], "average": s.average}

    pixels = RawPixels()
    probe_px, probe_ok, owner, gallery_px, gallery_ok = _test_pixels(test, pixels)
    w = _pixels_to_traits(root, pixels)

    def cosine(probe: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        return probe_scores(probe, probe_ok, owner, len(test.probes), gallery, gallery_ok)

    rng = np.random.default_rng(seed)
    runs = [score(rng.random((len(test.probes), len(test.gallery)))) for _ in range(n_random)]
    raw = cosine(probe_px, gallery_px)
    report = {
        "random": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
        "raw_pixels": score(raw),
        "pixel_ridge": score(cosine(probe_px @ w, gallery_px @ w)),
        "oracle": score(oracle_scores(truth, root / "latents.npz")),
    }
    styles = print_shares(root, test)
    if styles is not None and (styles[0].any() or styles[1].any()):  # no print at all: nothing to rank by
        share, flag = styles
        report["style_only"] = score(np.outer(share, flag) + np.outer(1 - share, 1 - flag))
        for name, rows in (("raw_pixels_prints", share >= 0.5), ("raw_pixels_plain", share < 0.5)):
            if rows.any():
                report[name] = score(raw, np.flatnonzero(rows))
    return report


def _test_split(root: Path) -> tuple[Track3Split, Track3Split]:
    test = read_codalab(root / "test")
    truth = read_labelled(root / "test_truth" / "probe_list.csv", root / "test_truth" / "gallery_list.csv", None)
    return test, truth


def _test_pixels(test: Track3Split, pixels: RawPixels) -> tuple[np.ndarray, ...]:
    paths, owner = test.probe_image_table()
    probe_px, probe_ok = pixels(paths)
    gallery_px, gallery_ok = pixels([g.path for g in test.gallery])
    return probe_px, probe_ok, owner, gallery_px, gallery_ok


def print_shares(root: str | Path, test: Track3Split) -> tuple[np.ndarray, np.ndarray] | None:
    """Per probe of the test split its share of old prints, per gallery face 1.0 for an old print else 0.0, from
    the photo styles in latents.npz; None for a dataset that recorded none (generator version 1)."""
    root = Path(root)
    data = latents(root / "latents.npz")
    if "photo_style" not in data:
        return None
    style = dict(zip(data["photos"].tolist(), (data["photo_style"] > 0).tolist(), strict=True))

    def printed(path: str | Path) -> float:
        return float(style[Path(path).resolve().relative_to(root.resolve()).as_posix()])

    share = np.array([np.mean([printed(img) for img in p.images]) for p in test.probes])
    return share, np.array([printed(g.path) for g in test.gallery])


def style_retrieval(root: str | Path, k: int = 5) -> dict[str, float]:
    """How much the old-print style drives raw-pixel similarity on the test split: the share of old prints in the
    gallery, and among the raw-pixel top-k of probes whose photos are mostly prints and of the others (nan for an
    empty group; {} without prints). Equal shares mean the style does not steer retrieval; a higher share for print
    probes means prints retrieve prints."""
    root = Path(root)
    test, _ = _test_split(root)
    styles = print_shares(root, test)
    if styles is None or not (styles[0].any() or styles[1].any()):
        return {}
    share, flag = styles
    probe_px, probe_ok, owner, gallery_px, gallery_ok = _test_pixels(test, RawPixels())
    raw = probe_scores(probe_px, probe_ok, owner, len(test.probes), gallery_px, gallery_ok)
    top = flag[rank_gallery(raw)[:, :k]].mean(axis=1)
    out = {"gallery": float(flag.mean())}
    for name, rows in ((f"top{k}_of_print_probes", share >= 0.5), (f"top{k}_of_plain_probes", share < 0.5)):
        out[name] = float(top[rows].mean()) if rows.any() else float("nan")
    return out


def _pixels_to_traits(root: Path, pixels: RawPixels, ridge: float = 100.0) -> np.ndarray:
    """A diagnostic, not a kit method: ridge regression from raw pixels to the latent traits, fitted on the train
    split's images. It shows the kinship signal is in the pixels and learnable, though plain pixel cosine is drowned
    by pose, light and age."""
    data = latents(root / "latents.npz", ("refs", "traits"))
    index = {ref: i for i, ref in enumerate(data["refs"].tolist())}
    traits = data["traits"]
    paths, rows = [], []
    for fam in read_fiw(root / "train"):
        for m in fam.members:
            paths += m.images
            rows += [index[f"{fam.fid}/{m.mid}"]] * len(m.images)
    x, _ = pixels(paths)
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1], dtype=np.float32), x.T @ traits[rows])
