"""What a run leaves on disk and what the next one will cost: disk use of the outputs and caches, `--clean-cache`,
and the per-stage estimates `--dry-run` prints, from throughput measured by earlier runs on this machine.

Throughput is recorded in ``{runs}/throughput.json`` after every stage that did work (units per second: images for
data and features, runs for training, matrices for scoring); until a stage has run once here, the estimate uses the
figures measured on the kit's reference machine (2 CPU cores), and says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kinret.io import write_text_atomic
from kinret.log import minutes

# units per second of the default run on the reference machine (2 cores, `benchmarks/bench_pipeline.py`, see
# DEVELOPERS.md): 4,707 photos generated in 13 s, their SFace features in 60 s, 9 head runs in 41 s, 165 score
# matrices in 11 s. Scoring grows faster than the matrix count with the gallery (the re-scorings cluster it): at the
# real size 165 matrices took 156 s, which a run there records for the next estimate.
REFERENCE_RATES = {"data": 360.0, "features": 78.0, "train": 0.22, "score": 15.0}
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


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


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


def read_rates(runs: Path) -> dict[str, float]:
    path = Path(runs) / THROUGHPUT_FILE
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in found.items() if k in REFERENCE_RATES and isinstance(v, (int, float)) and v > 0}


def record_rate(runs: Path, stage: str, units: float, seconds: float) -> None:
    """Remember `units / seconds` for `stage` (only when the stage did measurable work)."""
    if units <= 0 or seconds < 0.5:
        return
    rates = read_rates(runs)
    rates[stage] = units / seconds
    Path(runs).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(runs) / THROUGHPUT_FILE, json.dumps(rates, indent=1, sort_keys=True) + "\n")


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
