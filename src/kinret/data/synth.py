"""Synthetic families in the real FIW layouts: the kit's embedded default when no real data is given.

`generate(root)` writes
    root/train/F0001/MID1/P00001_face1.jpg ... (+ mid.csv)       labelled FIW folders
    root/val/F....                  + probe_list.csv, gallery_list.csv   labelled folders and their protocol
    root/test/probes/probe_subjects/s{i}/, gallery/gallery_faces/face{j}.jpg, probe.txt, gallery.txt
    root/test_truth/probe_list.csv, gallery_list.csv               the test labels, kept outside test/
    root/latents.npz                                                each member's heritable traits (the oracle)
    root/synth_config.json                                          the config it was made from
The faces and families themselves come from `kinret.data.synth_faces`; this module lays them out. The whole folder
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

from kinret.data.fiw import read_fiw
from kinret.data.split import build_protocol, write_codalab, write_labelled
from kinret.data.synth_faces import SynthFamily, make_family, render_face
from kinret.errors import KinretInputError
from kinret.io import atomic_dir, write_text_atomic
from kinret.log import progress

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
            raise KinretInputError(None, f"need n_train >= 1, n_test >= 2 and n_val = 0 or >= 2; got {self}")


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
