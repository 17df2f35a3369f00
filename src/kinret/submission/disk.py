"""What a run leaves on disk: the bytes of its folders and of the caches in them, `--clean-cache` (every cache goes,
checkpoints and tables stay: the next run rebuilds the caches from them), and the free space held against a run's
estimated need (one line per disk, and whether one is short)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from kinret.io import free_bytes, human_bytes

SCORE_CACHES = ("scores", "scores_final")  # an ensemble folder's score matrices (fold models', final fit's)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when absent); links are not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_paths(runs: Path, ensemble_dir: Path) -> list[Path]:
    """What `--clean-cache` removes: the frozen-feature, prefix and pixel caches (``_cache/``), each run's embedding
    caches (``embeddings/``), the score matrices (``scores/``, ``scores_final/``), wherever they lie under `runs` and
    `ensemble_dir`: a data set's folders, or the folders of every data set below them (``runs/``, ``ensemble/``).
    Checkpoints, configs, summaries and tables stay: everything removed is rebuilt from them on the next run."""
    runs, ensemble_dir = Path(runs), Path(ensemble_dir)
    found: list[Path] = []
    if runs.is_dir():
        found += sorted(p for p in runs.rglob("*") if p.is_dir() and p.name in ("_cache", "embeddings")
                        and not any(q.name in ("_cache", "embeddings") for q in p.relative_to(runs).parents
                                    if q != Path(".")))
    for folder in [ensemble_dir, *(sorted(p for p in ensemble_dir.iterdir() if p.is_dir())
                                   if ensemble_dir.is_dir() else [])]:
        found += [folder / name for name in SCORE_CACHES if (folder / name).is_dir()]
    return list(dict.fromkeys(found))


def disk_use(runs: Path, ensemble_dir: Path) -> list[tuple[str, int]]:
    """(label, bytes) of the run folder, the ensemble folder and, last, the caches inside them."""
    caches = sum(tree_bytes(p) for p in cache_paths(runs, ensemble_dir))
    return [(f"{runs}/", tree_bytes(runs)), (f"{ensemble_dir}/", tree_bytes(ensemble_dir)), ("caches", caches)]


def disk_line(runs: Path, ensemble_dir: Path) -> str:
    *folders, (_, caches) = disk_use(runs, ensemble_dir)
    return ("disk: " + ", ".join(f"{label} {human_bytes(n)}" for label, n in folders)
            + f"; {human_bytes(caches)} of it caches (make_submission.py --clean-cache frees them; checkpoints stay)")


def clean_cache(runs: Path, ensemble_dir: Path) -> int:
    """Remove every cache under `runs` and `ensemble_dir` (see `cache_paths`); returns the bytes freed."""
    freed = 0
    for path in cache_paths(runs, ensemble_dir):
        freed += tree_bytes(path)
        shutil.rmtree(path)
    return freed


def _device(folder: Path) -> int:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def space_lines(need: dict[Path, float], notes: Iterable[str] = ()) -> tuple[list[str], bool]:
    """Per disk, the bytes the folders on it will receive (`need`: folder -> bytes) against the space free there:
    one line each (`notes` added to the first, e.g. how rough the figure is), and whether any disk is short."""
    by_disk: dict[int, list[Path]] = {}
    for folder, nbytes in need.items():
        if nbytes > 0:
            by_disk.setdefault(_device(folder), []).append(Path(folder))
    lines, short = [], False
    extra = "; ".join(notes)
    for folders in by_disk.values():
        total, free = sum(need[f] for f in folders), free_bytes(folders[0])
        where = ", ".join(f"{f}/" for f in folders)
        lacking = free is not None and total > free
        short |= lacking
        lines.append(f"disk: about {human_bytes(total)} to write under {where}, "
                     f"{'an unknown amount' if free is None else human_bytes(free)} free there"
                     + (f" ({extra})" if extra and not lines else "")
                     + (": not enough, the run will stop when the disk fills (exit code 3); free space first "
                        "(make_submission.py --clean-cache) or pass --runs, --ensemble-dir, --out on another disk"
                        if lacking else ""))
    return lines, short
