"""Synthetic families in the real FIW layouts: the kit's embedded default when no real data is given.

`generate(root)` writes
    root/train/F0001/MID1/P00001_face1.jpg ... (+ mid.csv)       labelled FIW folders
    root/val/F....                  + probe_list.csv, gallery_list.csv   labelled folders and their protocol
    root/test/probes/probe_subjects/s{i}/, gallery/gallery_faces/face{j}.jpg, probe.txt, gallery.txt
    root/test_truth/probe_list.csv, gallery_list.csv               the test labels, kept outside test/
    root/latents.npz            each member's heritable traits (the oracle: refs, traits, age, gender) and each
                                photo's style (photos: path under root, photo_style: 0 plain, 1 grey, 2 sepia print)
    root/synth_config.json                                          the config it was made from
The faces and families themselves come from `kinret.data.synth_faces`, the camera and the old prints from
`kinret.data.synth_photo`; this module lays them out. Families are invented and every photo's style drawn in this
process, then rendered by worker processes (joblib); every draw is seeded by family and member, so the files are
byte-identical whatever the number of processes. The whole folder appears at once (built under a temporary name,
then renamed), so an interrupted run leaves nothing half-made.
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

from kinret.data import DEFAULT_ROOT
from kinret.data.fiw import read_fiw
from kinret.data.synth_faces import SynthFamily, make_family, render_face
from kinret.data.synth_photo import OldPhoto, draw_styles, style_code
from kinret.data.track3 import GALLERY_DIR, PROBE_DIR, Track3Split, build_protocol, write_codalab, write_labelled
from kinret.errors import KinretInputError
from kinret.io import atomic_dir, write_text_atomic
from kinret.log import progress
from kinret.readback import DamagedFile, read_json, rebuilt

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MAX_AUTO_JOBS = 8
IMAGES_PER_JOB = 400  # below this many photos per process, starting one more costs more than it saves


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of the synthetic dataset. The defaults (220 families, ~4,700 photos: ~23 CPU-seconds, which `generate`
    spreads over the cores) keep the default `make_submission.py` run to a few minutes."""

    seed: int = 0
    n_train: int = 120
    n_val: int = 40
    n_test: int = 60
    min_members: int = 3
    max_members: int = 9
    min_images: int = 2
    max_images: int = 5
    size: int = 112
    jpeg_quality: int = 92
    old_photo_p: float = 0.2  # chance that a photo is an old print (kinret.data.synth_photo), drawn per photo
    version: int = 2  # bump when the generator's output changes, so cached datasets are rebuilt

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_test < 2 or self.n_val not in (0,) and self.n_val < 2:
            raise KinretInputError(None, f"need n_train >= 1, n_test >= 2 and n_val = 0 or >= 2; got {self}")
        if not 0.0 <= self.old_photo_p <= 1.0:
            raise KinretInputError(None, f"need 0 <= old_photo_p <= 1, got {self.old_photo_p}")


@dataclass(frozen=True)
class FamilyJob:
    """One family to render: everything a worker process needs, so the files do not depend on who renders them."""

    folder: str                                      # the split's folder under the dataset root
    family: SynthFamily
    seeds: tuple[int, int, int]                      # (config seed, split code, family index in the split)
    first_pid: int                                   # person id of the family's first member
    styles: tuple[tuple[OldPhoto | None, ...], ...]  # per member, per photo: None or its old-print style

    def photos(self) -> list[tuple[str, OldPhoto | None]]:
        """(path under the dataset root, style) of every photo, in rendering order."""
        out = []
        for m_idx, m in enumerate(self.family.members):
            folder = f"{self.folder}/{self.family.fid}/{m.mid}"
            out += [(f"{folder}/P{self.first_pid + m_idx:05d}_face{i + 1}.jpg", st)
                    for i, st in enumerate(self.styles[m_idx])]
        return out


def plan_families(cfg: SynthConfig) -> list[FamilyJob]:
    """Invent every family and draw every photo's style, in the main process (cheap, no pixels). Family k of split
    code c draws from rng [seed, c, k], its member i's photos from [seed, c, k, i, 1] and their styles from
    [seed, c, k, i, 2]; person ids run on across the splits."""
    counts = (cfg.n_train, cfg.n_val, cfg.n_test)
    first_fid = np.cumsum((1,) + counts)
    plan, pid = [], 1
    for code, split in enumerate(SPLITS):
        folder = "_test_fiw" if split == "test" else split
        for k in range(counts[code]):
            fam = make_family(f"F{first_fid[code] + k:04d}", np.random.default_rng([cfg.seed, code, k]),
                              cfg.min_members, cfg.max_members, cfg.min_images, cfg.max_images)
            styles = tuple(draw_styles(m.age, m.n_images, cfg.old_photo_p,
                                       np.random.default_rng([cfg.seed, code, k, i, 2]))
                           for i, m in enumerate(fam.members))
            plan.append(FamilyJob(folder, fam, (cfg.seed, code, k), pid, styles))
            pid += len(fam.members)
    return plan


def _mid_csv(fam: SynthFamily) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    n = len(fam.members)
    w.writerow(["MID", *range(1, n + 1), "Name", "Gender"])
    for i, m in enumerate(fam.members):
        w.writerow([i + 1, *fam.relations[i].tolist(), f"{fam.fid}_{m.mid}", "female" if m.gender == "F" else "male"])
    return buf.getvalue()


def render_families(root: Path, jobs: list[FamilyJob], size: int, quality: int) -> int:
    """Render and write families as FIW folders under `root` (a worker's whole task); returns the photo count."""
    n = 0
    for job in jobs:
        fam, photos = job.family, iter(job.photos())
        for m_idx, m in enumerate(fam.members):
            (root / job.folder / fam.fid / m.mid).mkdir(parents=True)
            rng = np.random.default_rng([*job.seeds, m_idx, 1])
            for _ in range(m.n_images):
                path, style = next(photos)
                render_face(m, rng, size, style).save(root / path, quality=quality)
                n += 1
        (root / job.folder / fam.fid / "mid.csv").write_text(_mid_csv(fam), encoding="utf-8")
    return n


def _chunks(plan: list[FamilyJob], n: int) -> list[list[FamilyJob]]:
    """`plan` cut into at most n contiguous chunks of about equal photo counts."""
    sizes = np.cumsum([sum(m.n_images for m in job.family.members) for job in plan])
    cuts = np.searchsorted(sizes, sizes[-1] * np.arange(1, n) / n, side="right")
    bounds = [0, *sorted(set(cuts.tolist()) - {0, len(plan)}), len(plan)]
    return [plan[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def auto_jobs(n_photos: int) -> int:
    """Worker processes for `n_photos`: the usable cores, at most MAX_AUTO_JOBS, and one per IMAGES_PER_JOB."""
    import joblib

    return max(1, min(joblib.cpu_count(), MAX_AUTO_JOBS, n_photos // IMAGES_PER_JOB))


def _render_all(root: Path, plan: list[FamilyJob], cfg: SynthConfig, jobs: int | None) -> None:
    n_photos = sum(len(job.photos()) for job in plan)
    jobs = auto_jobs(n_photos) if jobs is None else jobs
    if jobs == 1:
        for job in progress(plan, desc="synth", unit="family"):
            render_families(root, [job], cfg.size, cfg.jpeg_quality)
        return
    from joblib import Parallel, delayed

    chunks = _chunks(plan, 4 * jobs)  # a few chunks per worker evens out the load
    log.info("rendering %d photos of %d families in %d processes", n_photos, len(plan), jobs)
    run = Parallel(n_jobs=jobs, return_as="generator_unordered")(
        delayed(render_families)(root, chunk, cfg.size, cfg.jpeg_quality) for chunk in chunks)
    for _ in progress(run, desc="synth", total=len(chunks), unit="chunk"):
        pass
    end_idle_workers(jobs)


def end_idle_workers(jobs: int) -> None:
    """End joblib's worker processes once the rendering is done. joblib keeps them for the next parallel call, and
    loky restarts a reused worker whose memory grew by 300 MB since its first task: training workers taking over
    these light ones were each restarted after their first run, importing torch again (the default's head-only
    grid took 25 s after a fresh dataset, 14 s otherwise)."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(max_workers=jobs).shutdown(wait=True)


def made_from(root: str | Path, cfg: SynthConfig) -> bool:
    """Whether `root` holds the dataset `cfg` makes (so `generate` would reuse it)."""
    path = Path(root) / "synth_config.json"
    if not path.is_file():
        return False
    try:
        return read_json(path, dict) == dataclasses.asdict(cfg)
    except DamagedFile as exc:
        rebuilt(exc, "the data set is generated again")
        return False


def generate(root: str | Path, cfg: SynthConfig = SynthConfig(), force: bool = False, jobs: int | None = None
             ) -> Path:
    """Write the synthetic dataset to `root`, or reuse it when it was made from the same config.

    `jobs` worker processes (joblib's reusable loky pool) render the families, None for `auto_jobs`; the files are
    byte-identical for any number.
    """
    root = Path(root)
    if jobs is not None and jobs < 1:
        raise KinretInputError(None, f"need jobs >= 1, got {jobs}")
    if not force and made_from(root, cfg):
        log.info("reusing synthetic dataset in %s", root)
        return root
    log.info("generating synthetic dataset in %s (%s)", root, cfg)
    plan = plan_families(cfg)
    with atomic_dir(root) as tmp:
        for folder in sorted({job.folder for job in plan}):
            (tmp / folder).mkdir()
        _render_all(tmp, plan, cfg, jobs)
        styles = {path: style_code(st) for job in plan for path, st in job.photos()}
        if cfg.n_val:
            val, _ = build_protocol(read_fiw(tmp / "val"), tmp / "val", seed=cfg.seed, name="val")
            write_labelled(val, tmp / "val")
        test, _ = build_protocol(read_fiw(tmp / "_test_fiw"), tmp / "_test_fiw", seed=cfg.seed + 1, name="test")
        write_codalab(test, tmp / "test", tmp / "test_truth")
        shutil.rmtree(tmp / "_test_fiw")
        photos = _final_paths(test, tmp, styles)
        members = [m for job in plan for m in job.family.members]
        np.savez(tmp / "latents.npz", refs=np.array([f"{job.family.fid}/{m.mid}" for job in plan
                                                     for m in job.family.members]),
                 traits=np.stack([m.traits for m in members]), age=np.array([m.age for m in members]),
                 gender=np.array([m.gender for m in members]), photos=np.array(list(photos)),
                 photo_style=np.array(list(photos.values()), np.int8))
        write_text_atomic(tmp / "synth_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    return root


def ensure_default(seed: int | None = None, regenerate: bool = False) -> Path:
    """The embedded default data folder (`kinret.data.DEFAULT_ROOT`): with `seed`, generated from that seed unless
    it already was (`regenerate` forces it); without, generated from the default seed only when it holds no data."""
    if seed is None:
        if (DEFAULT_ROOT / "train").is_dir():
            return DEFAULT_ROOT
        seed = SynthConfig.seed
    return generate(DEFAULT_ROOT, SynthConfig(seed=seed), force=regenerate)


def _final_paths(test: Track3Split, tmp: Path, styles: dict[str, int]) -> dict[str, int]:
    """Photo styles keyed by each photo's final path under the root; the test photos, which `write_codalab` copied
    as test/probes/probe_subjects/s{i}/{k}.jpg and test/gallery/gallery_faces/face{j}.jpg, under those names."""
    out = {path: code for path, code in styles.items() if not path.startswith("_test_fiw/")}
    for i, probe in enumerate(test.probes):
        for k, img in enumerate(probe.images):
            out[(Path("test") / PROBE_DIR / f"s{i}" / f"{k}.jpg").as_posix()] = styles[_rel(img, tmp)]
    for j, face in enumerate(test.gallery):
        out[(Path("test") / GALLERY_DIR / f"face{j}.jpg").as_posix()] = styles[_rel(face.path, tmp)]
    return out


def _rel(path: str | Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()
