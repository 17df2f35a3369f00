"""Synthetic families in the real FIW layouts: the kit's embedded default when no real data is given.

`generate(root)` writes
    root/train/F0001/MID1/P00001_face1.jpg ... (+ mid.csv)       labelled FIW folders
    root/val/F....                  + probe_list.csv, gallery_list.csv   labelled folders and their protocol
    root/test/probes/probe_subjects/s{i}/, gallery/gallery_faces/face{j}.jpg, probe.txt, gallery.txt
    root/test_truth/probe_list.csv, gallery_list.csv               the test labels, kept outside test/
    root/latents.npz                                                each member's heritable traits (the oracle)
    root/synth_config.json                                          the config it was made from
The faces and families themselves come from `kinret.synth_faces`; this module lays them out. The whole folder
appears at once (built under a temporary name, then renamed), so an interrupted run leaves nothing half-made.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import RawPixels
from .fiw import read_fiw
from .io import atomic_dir, write_text_atomic
from .log import progress
from .metrics import evaluate_ranking
from .pipeline import probe_scores
from .ranking import cosine_scores, rank_gallery
from .split import Track3Split, build_protocol, read_codalab, read_labelled, write_codalab, write_labelled
from .synth_faces import SynthFamily, make_family, render_face

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of the synthetic dataset. The defaults keep the default `make_submission.py` run to a few minutes."""

    seed: int = 0
    n_train: int = 200
    n_val: int = 60
    n_test: int = 100
    min_members: int = 3
    max_members: int = 9
    min_images: int = 2
    max_images: int = 7
    size: int = 112
    jpeg_quality: int = 92
    version: int = 1  # bump when the generator's output changes, so cached datasets are rebuilt

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_test < 2 or self.n_val not in (0,) and self.n_val < 2:
            raise ValueError(f"need n_train >= 1, n_test >= 2 and n_val = 0 or >= 2; got {self}")


def _mid_csv(fam: SynthFamily) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    n = len(fam.members)
    w.writerow(["MID", *range(1, n + 1), "Name", "Gender"])
    for i, m in enumerate(fam.members):
        w.writerow([i + 1, *fam.relations[i].tolist(), f"{fam.fid}_{m.mid}", "female" if m.gender == "F" else "male"])
    return buf.getvalue()


def _write_families(out: Path, fids: list[str], split_code: int, cfg: SynthConfig, first_pid: int,
                    latents: dict[str, list]) -> int:
    """Render and write families as FIW folders; returns the next free person id."""
    pid = first_pid
    for k, fid in enumerate(progress(fids, desc=f"synth {SPLITS[split_code]}", unit="family")):
        fam = make_family(fid, np.random.default_rng([cfg.seed, split_code, k]), cfg.min_members, cfg.max_members,
                          cfg.min_images, cfg.max_images)
        for m_idx, m in enumerate(fam.members):
            folder = out / fid / m.mid
            folder.mkdir(parents=True)
            rng = np.random.default_rng([cfg.seed, split_code, k, m_idx, 1])
            for face in range(1, m.n_images + 1):
                render_face(m, rng, cfg.size).save(folder / f"P{pid:05d}_face{face}.jpg", quality=cfg.jpeg_quality)
            pid += 1
            latents["refs"].append(f"{fid}/{m.mid}")
            latents["traits"].append(m.traits)
            latents["age"].append(m.age)
            latents["gender"].append(m.gender)
        (out / fid / "mid.csv").write_text(_mid_csv(fam), encoding="utf-8")
    return pid


def _config_matches(root: Path, cfg: SynthConfig) -> bool:
    path = root / "synth_config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == dataclasses.asdict(cfg)
    except json.JSONDecodeError:
        return False


def generate(root: str | Path, cfg: SynthConfig = SynthConfig(), force: bool = False) -> Path:
    """Write the synthetic dataset to `root`, or reuse it when it was made from the same config."""
    root = Path(root)
    if not force and _config_matches(root, cfg):
        log.info("reusing synthetic dataset in %s", root)
        return root
    log.info("generating synthetic dataset in %s (%s)", root, cfg)
    counts = (cfg.n_train, cfg.n_val, cfg.n_test)
    first = np.cumsum((1,) + counts)
    latents: dict[str, list] = {"refs": [], "traits": [], "age": [], "gender": []}
    with atomic_dir(root) as tmp:
        pid = 1
        for code, split in enumerate(SPLITS):
            if not counts[code]:
                continue
            fids = [f"F{i:04d}" for i in range(first[code], first[code] + counts[code])]
            target = tmp / ("_test_fiw" if split == "test" else split)
            target.mkdir()
            pid = _write_families(target, fids, code, cfg, pid, latents)
        if cfg.n_val:
            val, _ = build_protocol(read_fiw(tmp / "val"), tmp / "val", seed=cfg.seed, name="val")
            write_labelled(val, tmp / "val")
        test, _ = build_protocol(read_fiw(tmp / "_test_fiw"), tmp / "_test_fiw", seed=cfg.seed + 1, name="test")
        write_codalab(test, tmp / "test", tmp / "test_truth")
        shutil.rmtree(tmp / "_test_fiw")
        np.savez(tmp / "latents.npz", refs=np.array(latents["refs"]), traits=np.stack(latents["traits"]),
                 age=np.array(latents["age"]), gender=np.array(latents["gender"]))
        write_text_atomic(tmp / "synth_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    return root


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
    """`python -m kinret.synth`: generate (or reuse) a synthetic dataset and report how learnable it is."""
    import argparse

    from .log import setup_logging

    p = argparse.ArgumentParser(prog="python -m kinret.synth", description=main.__doc__)
    p.add_argument("--root", type=Path, default=Path("data") / "synthetic")
    for f in dataclasses.fields(SynthConfig):
        if f.name != "version":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    p.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    p.add_argument("--no-report", action="store_true", help="only generate")
    args = p.parse_args(argv)
    setup_logging()
    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig) if f.name != "version"})
    root = generate(args.root, cfg, force=args.force)
    if not args.no_report:
        print(f"test split of {root}, standard AP:")
        for name, s in signal_report(root).items():
            print(f"  {name:<12} mAP {s['mAP']:.4f}  Rank@5 {s['rank@5']:.4f}  Average {s['average']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
