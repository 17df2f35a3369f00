"""What a run leaves on disk and what the next one will cost: disk use of the outputs and caches, `--clean-cache`,
and the per-stage estimates of time and disk space that `--dry-run` (and, for space, the start of a run) gives, from
what earlier runs measured on this machine.

Throughput is recorded in ``{runs}/throughput.json`` after every stage that did work (units per second: images for
data and features, runs for training, matrices for scoring), and so are the bytes a unit left on disk
(``{stage}_bytes``); until a stage has run once here, the estimate uses the figures measured on the kit's reference
machine (2 CPU cores), and says so. A score matrix's size follows from its split (probes x gallery x 4 bytes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kinret.io import free_bytes, human_bytes, write_text_atomic
from kinret.log import minutes

# units per second of the default run on the reference machine (2 cores, `benchmarks/bench_pipeline.py`, see
# DEVELOPERS.md): 4,707 photos generated in 13 s, their SFace features in 60 s, 9 head runs in 41 s, 165 score
# matrices in 11 s. Scoring grows faster than the matrix count with the gallery (the re-scorings cluster it): at the
# real size 165 matrices took 156 s, which a run there records for the next estimate.
REFERENCE_RATES = {"data": 360.0, "features": 78.0, "train": 0.22, "score": 15.0}
# bytes a unit leaves on disk in the default run (2026-12-03): 21.7 MB of photos for 4,707 images, 120 MB of frozen
# features and pixel caches for them, 5.7 MB for 9 head runs (checkpoints, summaries)
REFERENCE_BYTES = {"data": 4_600.0, "features": 25_500.0, "train": 650_000.0}
SCORE_OVERHEAD = 1.5  # a score matrix's ids file and the embedding caches behind it, on top of its P x N x 4 bytes
UNITS = {"data": "images", "features": "images", "train": "runs", "score": "matrices"}
THROUGHPUT_FILE = "throughput.json"


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when absent); links are not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_paths(runs: Path, ensemble_dir: Path) -> list[Path]:
    """What `--clean-cache` removes: frozen-feature and pixel caches, each run's embedding caches, score matrices.
    Checkpoints, configs and summaries stay: everything removed is rebuilt from them on the next run."""
    runs, ensemble_dir = Path(runs), Path(ensemble_dir)
    found = [runs / "_cache", ensemble_dir / "scores"]
    if runs.is_dir():
        found += sorted(p for p in runs.rglob("embeddings") if p.is_dir())
    return [p for p in found if p.exists()]


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


def _recorded(runs: Path) -> dict:
    try:
        found = json.loads((Path(runs) / THROUGHPUT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _record(runs: Path, key: str, value: float) -> None:
    found = _recorded(runs)
    found[key] = value
    Path(runs).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(runs) / THROUGHPUT_FILE, json.dumps(found, indent=1, sort_keys=True) + "\n")


def _positive(found: dict, keys: dict, suffix: str = "") -> dict[str, float]:
    return {k: float(found[k + suffix]) for k in keys
            if isinstance(found.get(k + suffix), (int, float)) and found[k + suffix] > 0}


def read_rates(runs: Path) -> dict[str, float]:
    return _positive(_recorded(runs), REFERENCE_RATES)


def record_rate(runs: Path, stage: str, units: float, seconds: float) -> None:
    """Remember `units / seconds` for `stage` (only when the stage did measurable work)."""
    if units > 0 and seconds >= 0.5:
        _record(runs, stage, units / seconds)


def read_sizes(runs: Path) -> dict[str, float]:
    """Bytes per unit measured here, by stage."""
    return _positive(_recorded(runs), REFERENCE_BYTES, "_bytes")


def record_size(runs: Path, stage: str, units: float, nbytes: float) -> None:
    """Remember the bytes a unit of `stage` left on disk (when it did work and wrote something)."""
    if units > 0 and nbytes > 0:
        _record(runs, f"{stage}_bytes", nbytes / units)


def disk_need(runs: Path, work: dict[str, float], score_bytes: float = 0.0) -> dict[str, float]:
    """Bytes each stage with work to do will write: its units times the bytes per unit measured here (else the
    reference's); the score stage from its matrices' sizes (`score_bytes`, P x N x 4 each) and their overhead."""
    sizes = REFERENCE_BYTES | read_sizes(runs)
    need = {stage: units * sizes[stage] for stage, units in work.items() if stage in sizes and units > 0}
    if score_bytes > 0:
        need["score"] = score_bytes * SCORE_OVERHEAD
    return need


def _device(folder: Path) -> int:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def space_lines(need: dict[Path, float]) -> tuple[list[str], bool]:
    """Per disk, the bytes the folders on it will receive (`need`: folder -> bytes) against the space free there:
    one line each, and whether any disk is short."""
    by_disk: dict[int, list[Path]] = {}
    for folder, nbytes in need.items():
        if nbytes > 0:
            by_disk.setdefault(_device(folder), []).append(Path(folder))
    lines, short = [], False
    for folders in by_disk.values():
        total, free = sum(need[f] for f in folders), free_bytes(folders[0])
        where = ", ".join(f"{f}/" for f in folders)
        lacking = free is not None and total > free
        short |= lacking
        lines.append(f"disk: about {human_bytes(total)} to write under {where}, "
                     f"{'an unknown amount' if free is None else human_bytes(free)} free there"
                     + (": not enough, the run will stop when the disk fills (exit code 3); free space first "
                        "(make_submission.py --clean-cache) or pass --runs, --ensemble-dir, --out on another disk"
                        if lacking else ""))
    return lines, short


def estimate_lines(runs: Path, work: dict[str, float]) -> list[str]:
    """One line per stage with work to do: its units, the rate used (measured here or the reference) and the
    estimated wall time; then the total."""
    measured = read_rates(runs)
    lines, total = [], 0.0
    for stage, units in work.items():
        if units <= 0:
            continue
        rate = measured.get(stage, REFERENCE_RATES[stage])
        seconds = units / rate
        total += seconds
        source = "measured here" if stage in measured else "reference machine"
        lines.append(f"estimate {stage:<9} {units:>8,.0f} {UNITS[stage]:<8} at {rate:.3g}/s ({source}): "
                     f"~{minutes(seconds)}")
    lines.append(f"estimate total    ~{minutes(total)}" if lines else "estimate: nothing to build")
    return lines


def expected_images(cfg) -> float:
    """The number of images a synthetic config makes, on average (members and photos drawn uniformly)."""
    families = cfg.n_train + cfg.n_val + cfg.n_test
    return families * (cfg.min_members + cfg.max_members) / 2 * (cfg.min_images + cfg.max_images) / 2
