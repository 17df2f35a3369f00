"""A Track-3 split (probes in probe-index order, gallery in gallery-index order), how to read one from the Codalab
test layout or from labelled lists, and how to build one from labelled FIW families."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kinret.data.fiw import Family, natural_key
from kinret.data.images import is_image_file, load_image
from kinret.data.lists import (
    GalleryRow,
    ProbeRow,
    read_gallery_list,
    read_index_entries,
    read_probe_list,
    write_gallery_list,
    write_index_list,
    write_probe_list,
)
from kinret.errors import KinretInputError
from kinret.io import atomic_path

log = logging.getLogger(__name__)
PROBE_DIR = Path("probes") / "probe_subjects"
GALLERY_DIR = Path("gallery") / "gallery_faces"


@dataclass(frozen=True)
class Probe:
    """One probe subject: several photos of one person. `fid` is None when the split is unlabelled."""

    images: tuple[Path, ...]
    ref: str
    fid: str | None = None


@dataclass(frozen=True)
class GalleryFace:
    path: Path
    ref: str
    fid: str | None = None


@dataclass(frozen=True)
class Track3Split:
    """Row i of `probes` is probe s{i}; row j of `gallery` is face{j}. Built once, validated once."""

    name: str
    probes: tuple[Probe, ...]
    gallery: tuple[GalleryFace, ...]

    def __post_init__(self) -> None:
        if not self.probes:
            raise KinretInputError(None, f"split {self.name!r} has no probes")
        if not self.gallery:
            raise KinretInputError(None, f"split {self.name!r} has an empty gallery")
        for i, p in enumerate(self.probes):
            if not p.images:
                raise KinretInputError(p.ref, f"probe s{i} of split {self.name!r} has no images")
        labelled = {p.fid is not None for p in self.probes} | {g.fid is not None for g in self.gallery}
        if len(labelled) != 1:
            raise KinretInputError(None, f"split {self.name!r} is partly labelled: label all rows or none")

    @property
    def labelled(self) -> bool:
        return self.probes[0].fid is not None

    @property
    def probe_fids(self) -> np.ndarray:
        return np.array([p.fid for p in self.probes], dtype=object)

    @property
    def gallery_fids(self) -> np.ndarray:
        return np.array([g.fid for g in self.gallery], dtype=object)

    def probe_image_table(self) -> tuple[list[Path], np.ndarray]:
        """All probe images flattened, and the probe index that owns each one (non-decreasing)."""
        paths = [img for p in self.probes for img in p.images]
        owner = np.repeat(np.arange(len(self.probes)), [len(p.images) for p in self.probes])
        return paths, owner

    def describe(self) -> str:
        n_img = sum(len(p.images) for p in self.probes)
        return f"{self.name}: {len(self.probes)} probes ({n_img} faces), {len(self.gallery)} gallery faces"


def _numbered_entries(folder: Path, prefix: str, want_dirs: bool) -> list[Path]:
    """Entries named `{prefix}{i}` in folder, ordered by i (never directory order); a gap or duplicate raises."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)(\.[A-Za-z]+)?$")
    found: dict[int, Path] = {}
    if not folder.is_dir():
        raise KinretInputError(folder, f"folder does not exist (the Codalab layout has {prefix}0, {prefix}1, ... here)")
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if not m or p.is_dir() != want_dirs or (not want_dirs and not is_image_file(p)):
            continue
        i = int(m.group(1))
        if i in found:
            raise KinretInputError(p, f"duplicate index {i} (also {found[i].name})")
        found[i] = p
    if not found:
        raise KinretInputError(folder, f"no entries named {prefix}<number>")
    missing = sorted(set(range(len(found))) - set(found))
    if missing:
        raise KinretInputError(folder, f"{prefix}{missing[0]} is missing: entries must be numbered 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


def _resolve(root: Path, rel: str, list_path: Path, line: int, want_dir: bool) -> Path:
    p = (root / rel).resolve()
    if want_dir and not p.is_dir():
        raise KinretInputError(list_path, f"probe folder {rel!r} does not exist under {root}", line=line)
    if not want_dir and not p.is_file():
        raise KinretInputError(list_path, f"gallery image {rel!r} does not exist under {root}", line=line)
    return p


def _is_entry(p: Path, want_dirs: bool) -> bool:
    # hidden names (.DS_Store, ._face0.jpg, .ipynb_checkpoints) are left behind by tools, never data
    return not p.name.startswith(".") and (p.is_dir() if want_dirs else is_image_file(p))


def _listed(root: Path, list_path: Path, folder: Path, want_dirs: bool) -> list[Path]:
    """The paths an index list names, in index order, checked against the Codalab folder they belong in.

    Refused (KinretInputError naming the list): a listed path that does not exist, a path listed twice (one image
    would fill two gallery columns), and an entry of `folder` that the list does not name. The organisers' lists
    carry no count and no end marker, so a list cut short would otherwise be read silently and every submission
    made from it come out a gallery column (or a probe row) short. The error names the first unlisted entries and,
    when the list is shorter than the folder, the line where it ends.
    """
    kind = "probe folder" if want_dirs else "image"
    or_delete = (f"or delete {list_path.name} to order the {kind}s by the numbers in their names "
                 f"({'s0, s1' if want_dirs else 'face0.jpg, face1.jpg'}, ...)")
    try:
        entries = read_index_entries(list_path)
        paths = [_resolve(root, e.path, list_path, e.line, want_dirs) for e in entries]
        first_line: dict[Path, int] = {}
        for e, p in zip(entries, paths, strict=True):
            if p in first_line:
                raise KinretInputError(list_path, f"names {e.path!r} again (line {first_line[p]} names it too)",
                                       line=e.line)
            first_line[p] = e.line
    except KinretInputError as exc:  # what to do about it: the list as the organisers wrote it, or none
        if exc.path != str(list_path):
            raise
        raise KinretInputError(exc.path, f"{exc.message}; to fix it, restore the organisers' {list_path.name} "
                                         f"{or_delete}", exc.line) from exc
    if not folder.is_dir():  # the list points elsewhere: there is no Codalab folder to hold it to
        return paths
    on_disk = [q for q in folder.iterdir() if _is_entry(q, want_dirs)]
    unlisted = sorted((q for q in on_disk if q.resolve() not in first_line), key=lambda q: natural_key(q.name))
    if unlisted:
        names = ", ".join(q.name for q in unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5
                                                           else "")
        where = folder.relative_to(root).as_posix()
        if len(entries) < len(on_disk):
            line = f"{len(entries)} {entries[-1].path.rpartition('/')[0] or '.'}/{unlisted[0].name}"
            raise KinretInputError(list_path, f"the list ends here with {len(entries)} entries, but {where} holds "
                                              f"{len(on_disk)} {kind}s; not listed: {names}; to fix it, restore the "
                                              f"missing line(s) (the next one is likely '{line}') {or_delete}",
                                   line=max(e.line for e in entries))
        raise KinretInputError(list_path, f"{where} holds {len(unlisted)} {kind}{'s' if len(unlisted) > 1 else ''} "
                                          f"the list does not name: {names}; to fix it, restore the organisers' "
                                          f"{list_path.name} {or_delete}")
    return paths


def _probe_images(folder: Path) -> tuple[Path, ...]:
    images = tuple(sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name)))
    if not images:
        raise KinretInputError(folder, "probe folder holds no images")
    return images


def read_codalab(root: str | Path, name: str = "test") -> Track3Split:
    """Read the unlabelled Codalab layout: `probes/probe_subjects/s{i}/` and `gallery/gallery_faces/face{j}.jpg`.

    The order comes from `probe.txt`/`gallery.txt` in `root` when present (their line numbers are quoted in
    errors; the real lists are CRLF without a trailing newline), else from the numbers in the names. A list must
    name every probe folder (every gallery image) of its folder: see `_listed`.
    """
    root = Path(root)
    if not root.is_dir():
        raise KinretInputError(root, "test folder does not exist")
    if (root / "probe.txt").is_file():
        probe_dirs = _listed(root, root / "probe.txt", root / PROBE_DIR, want_dirs=True)
    else:
        probe_dirs = _numbered_entries(root / PROBE_DIR, "s", want_dirs=True)
    if (root / "gallery.txt").is_file():
        gallery = _listed(root, root / "gallery.txt", root / GALLERY_DIR, want_dirs=False)
    else:
        gallery = _numbered_entries(root / GALLERY_DIR, "face", want_dirs=False)
    probes = tuple(Probe(_probe_images(d), ref=f"s{i}") for i, d in enumerate(probe_dirs))
    faces = tuple(GalleryFace(p, ref=f"face{j}") for j, p in enumerate(gallery))
    return Track3Split(name, probes, faces)


def read_labelled(probe_list: str | Path, gallery_list: str | Path, image_root: str | Path | None,
                  name: str = "val") -> Track3Split:
    """A labelled split from RFIW2021 lists; image paths (`ref`) are taken relative to `image_root`.

    With `image_root=None` only labels are read (enough to score a predictions file): image paths are left
    unresolved and the probes hold their ref as their one image.
    """
    prows, grows = read_probe_list(probe_list), read_gallery_list(gallery_list)
    if image_root is None:
        probes = tuple(Probe((Path(r.ref),), ref=r.ref, fid=r.fid) for r in prows)
        gallery = tuple(GalleryFace(Path(r.ref), ref=r.ref, fid=r.fid) for r in grows)
    else:
        root = Path(image_root)
        # row i sits on line i + 2 (after the header) in the lists the kit writes
        probes = tuple(Probe(_probe_images(_resolve(root, r.ref, Path(probe_list), i + 2, True)), r.ref, r.fid)
                       for i, r in enumerate(prows))
        gallery = tuple(GalleryFace(_resolve(root, r.ref, Path(gallery_list), j + 2, False), r.ref, r.fid)
                        for j, r in enumerate(grows))
    return Track3Split(name, probes, gallery)


def build_protocol(families: Sequence[Family], root: str | Path, seed: int = 0, name: str = "protocol"
                   ) -> tuple[Track3Split, int]:
    """One probe member per family (seeded); the gallery is every face of that family's other members.

    Families with fewer than two members holding images are skipped and their number returned. Probes keep
    family order; the gallery is shuffled (seeded) so that its order carries no family information (rankings
    break ties by lower gallery index).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    probes: list[Probe] = []
    gallery: list[GalleryFace] = []
    skipped = 0
    for fam in sorted(families, key=lambda f: f.fid):
        members = [m for m in fam.members if m.images]
        if len(members) < 2:
            skipped += 1
            continue
        k = int(rng.integers(len(members)))
        probe = members[k]
        probes.append(Probe(probe.images, ref=f"{fam.fid}/{probe.mid}", fid=fam.fid))
        for m in members[:k] + members[k + 1:]:
            gallery.extend(GalleryFace(p, ref=p.relative_to(root).as_posix(), fid=fam.fid) for p in m.images)
    if skipped:
        log.info("protocol %s: skipped %d famil%s with fewer than two members", name, skipped,
                 "y" if skipped == 1 else "ies")
    order = rng.permutation(len(gallery))
    return Track3Split(name, tuple(probes), tuple(gallery[i] for i in order)), skipped


def truth_rows(split: Track3Split) -> tuple[list[ProbeRow], list[GalleryRow]]:
    """The RFIW2021 labelled rows of a labelled split (refs as stored in the split)."""
    if not split.labelled:
        raise ValueError(f"split {split.name!r} is unlabelled")
    prows = [ProbeRow(ref=p.ref, fid=p.fid, feat_path=p.ref) for p in split.probes]
    grows = [GalleryRow(fid=g.fid, mid=g.ref.split("/")[1], ref=g.ref, labels=g.fid.lstrip("F").lstrip("0") or "0")
             for g in split.gallery]
    return prows, grows


def write_labelled(split: Track3Split, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `probe_list.csv` and `gallery_list.csv` (RFIW2021 columns) for a labelled split."""
    out_dir = Path(out_dir)
    prows, grows = truth_rows(split)
    return write_probe_list(prows, out_dir / "probe_list.csv"), write_gallery_list(grows, out_dir / "gallery_list.csv")


def _copy_as_jpeg(src: Path, dst: Path) -> None:
    with atomic_path(dst, suffix=".jpg") as tmp:
        if src.suffix.lower() in (".jpg", ".jpeg"):
            shutil.copyfile(src, tmp)
        else:
            load_image(src).save(tmp, format="JPEG", quality=95)


def write_codalab(split: Track3Split, out_dir: str | Path, truth_dir: str | Path) -> None:
    """An unlabelled Codalab-style copy (`s{i}/`, anonymised `face{j}.jpg`, probe.txt/gallery.txt in the
    organisers' CRLF form) in `out_dir`; the labelled truth lists go to `truth_dir`, which must lie outside it."""
    out_dir, truth_dir = Path(out_dir), Path(truth_dir)
    if truth_dir.resolve().is_relative_to(out_dir.resolve()):
        raise KinretInputError(truth_dir, f"truth folder must not lie inside the unlabelled copy {out_dir}")
    probe_rel, gallery_rel = [], []
    for i, p in enumerate(split.probes):
        for k, img in enumerate(p.images):
            _copy_as_jpeg(img, out_dir / PROBE_DIR / f"s{i}" / f"{k}.jpg")
        probe_rel.append(f"./{(PROBE_DIR / f's{i}').as_posix()}")
    for j, g in enumerate(split.gallery):
        _copy_as_jpeg(g.path, out_dir / GALLERY_DIR / f"face{j}.jpg")
        gallery_rel.append(f"./{(GALLERY_DIR / f'face{j}.jpg').as_posix()}")
    write_index_list(probe_rel, out_dir / "probe.txt")
    write_index_list(gallery_rel, out_dir / "gallery.txt")
    write_labelled(split, truth_dir)
