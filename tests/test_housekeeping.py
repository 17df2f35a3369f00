"""Disk use, --clean-cache (caches go, checkpoints stay) and the --dry-run estimates from measured throughput."""

from __future__ import annotations

import json

from kinret.submission import make as submit
from kinret.submission.housekeeping import (
    REFERENCE_RATES,
    cache_paths,
    clean_cache,
    disk_line,
    estimate_lines,
    human_bytes,
    read_rates,
    record_rate,
    tree_bytes,
)


def layout(tmp_path):
    runs, ens = tmp_path / "runs", tmp_path / "ens"
    files = {runs / "_cache" / "features_sface_x.npz": 1000, runs / "exp" / "v" / "fold0" / "checkpoint.pt": 300,
             runs / "exp" / "v" / "fold0" / "embeddings" / "test_k.npz": 200, ens / "scores" / "v" / "test.npy": 50,
             ens / "variants.md": 7}
    for path, size in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    return runs, ens


def test_clean_cache_removes_caches_and_keeps_checkpoints(tmp_path):
    runs, ens = layout(tmp_path)
    assert tree_bytes(runs) == 1500 and tree_bytes(ens) == 57
    assert sorted(p.name for p in cache_paths(runs, ens)) == ["_cache", "embeddings", "scores"]
    assert "1.2 KB of it caches" in disk_line(runs, ens)
    assert clean_cache(runs, ens) == 1250
    assert (runs / "exp" / "v" / "fold0" / "checkpoint.pt").is_file() and (ens / "variants.md").is_file()
    assert cache_paths(runs, ens) == [] and clean_cache(runs, ens) == 0


def test_make_submission_clean_cache_prints_what_it_freed(tmp_path, capsys):
    runs, ens = layout(tmp_path)
    assert submit.main(["--clean-cache", "--runs", str(runs), "--ensemble-dir", str(ens)]) == 0
    assert capsys.readouterr().out.startswith("freed 1.2 KB")
    assert not (runs / "_cache").exists()


def test_human_bytes():
    assert [human_bytes(n) for n in (5, 2048, 3 * 1024 ** 2, 5 * 1024 ** 3)] == ["5 B", "2.0 KB", "3.0 MB", "5.0 GB"]


def test_estimates_use_measured_rates_once_recorded(tmp_path):
    runs = tmp_path / "runs"
    lines = estimate_lines(runs, {"features": REFERENCE_RATES["features"] * 120, "train": 0, "score": 0})
    assert lines[0].startswith("estimate features") and "(reference machine): ~2.0 min" in lines[0]
    assert lines[-1] == "estimate total    ~2.0 min"
    record_rate(runs, "features", 600, 10.0)  # 60 images/s measured here
    record_rate(runs, "train", 5, 0.1)  # too short to measure: ignored
    assert read_rates(runs) == {"features": 60.0}
    lines = estimate_lines(runs, {"features": 3600, "train": 4})
    assert "at 60/s (measured here): ~60 s" in lines[0] and "(reference machine)" in lines[1]
    (runs / "throughput.json").write_text("not json")
    assert read_rates(runs) == {}
    (runs / "throughput.json").write_text(json.dumps({"features": -1, "bogus": 3}))
    assert read_rates(runs) == {} and estimate_lines(runs, {}) == ["estimate: nothing to build"]
