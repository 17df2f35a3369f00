"""Disk use and --clean-cache (caches go, checkpoints stay, every data set's or one's), and the dry run's estimates
from what runs recorded: the machine's own record first, then the kit's reference run, then a labelled guess."""

from __future__ import annotations

import json

from kinret.io import human_bytes
from kinret.submission import make as submit
from kinret.submission.disk import cache_paths, clean_cache, disk_line, tree_bytes
from kinret.submission.estimate import RECORD_FILE, Work, estimate, estimate_lines, read_record, record


def layout(tmp_path, data_set: str = ""):
    runs, ens = tmp_path / "runs" / data_set, tmp_path / "ens" / data_set
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


def test_clean_cache_of_the_folders_above_the_data_sets_finds_every_data_sets_caches(tmp_path):
    for name in ("synthetic", "small-3fa2c1"):
        layout(tmp_path, name)
    found = cache_paths(tmp_path / "runs", tmp_path / "ens")
    assert len(found) == 6 and {p.relative_to(tmp_path).parts[1] for p in found} == {"synthetic", "small-3fa2c1"}
    assert clean_cache(tmp_path / "runs", tmp_path / "ens") == 2 * 1250


def test_make_submission_clean_cache_prints_what_it_freed(tmp_path, capsys):
    runs, ens = layout(tmp_path)
    assert submit.main(["--clean-cache", "--runs", str(runs), "--ensemble-dir", str(ens)]) == 0
    assert capsys.readouterr().out.startswith("freed 1.2 KB")
    assert not (runs / "_cache").exists()


def test_human_bytes():
    assert [human_bytes(n) for n in (5, 2048, 3 * 1024 ** 2, 5 * 1024 ** 3)] == ["5 B", "2.0 KB", "3.0 MB", "5.0 GB"]


def test_estimates_come_from_the_record_here_then_the_reference_then_a_labelled_guess(tmp_path):
    here = tmp_path / "runs"
    reference = {"features:sface+prefix24": {"units": 1000, "seconds": 20.0, "bytes": 5e7, "network": "sface"},
                 "train:sface_heads": {"units": 6, "seconds": 12.0, "bytes": 6e6, "runs": 6, "network": "sface",
                                       "mode": "head", "prefix": 0}}
    work = Work("features:sface+prefix24", 4000, "features sface", like={"network": "sface"})
    found = estimate(work, read_record(here), reference)
    assert (found.seconds, found.nbytes, found.basis) == (80.0, 2e8, "the kit's reference run")
    record(here, "features:sface+prefix24", 500, 5.0, 1e7, network="sface", prefix=24)  # 100 views/s here
    record(here, "train:x", 5, 0.1, 10)  # too short to time: not recorded
    assert set(read_record(here)) == {"features:sface+prefix24"}
    found = estimate(work, read_record(here), reference)
    assert (found.seconds, found.nbytes, found.basis) == (40.0, 8e7, "measured here")
    # the same network without the prefix: its time from the pass that also kept one, said to be a guess
    plain = estimate(Work("features:sface", 4000, like={"network": "sface"}), read_record(here), reference)
    assert plain.seconds == 40.0 and plain.basis.startswith("a guess") and "features:sface+prefix24" in plain.basis
    # another network's head runs: bytes per run from a head run, time not pretended
    other = Work("train:mine", 3, "train mine", runs=3, like={"network": "onnx-x", "mode": "head", "prefix": 0})
    guess = estimate(other, {}, reference)
    assert guess.seconds is None and guess.nbytes == 3e6 and "train:sface_heads" in guess.basis
    lines = estimate_lines([found, guess])
    assert "estimate total ~40 s + train mine (not measured)" in lines and "time unknown" in lines[1]
    assert lines[-1].startswith("(the kit's reference run: the default run")  # where the guess's figures come from
    # an end-to-end run of a network nothing knows: its checkpoints from the network's size
    e2e = Work("train:big", 300, "train big", runs=3, like={"network": "iresnet100", "mode": "e2e"},
               size=(2.6e8, "65.1M parameters x 4 bytes a run"))
    assert estimate(e2e, {}, reference).nbytes == 3 * 2.6e8


def test_an_unreadable_record_is_named_and_ignored_then_written_again(tmp_path, caplog):
    here = tmp_path / "runs"
    here.mkdir()
    (here / RECORD_FILE).write_text("not json")
    assert read_record(here) == {} and f"{here / RECORD_FILE}: damaged (not JSON" in caplog.text
    assert not (here / RECORD_FILE).exists()  # removed: read once, named once
    (here / RECORD_FILE).write_text(json.dumps({"stages": {"score": {"units": -1, "seconds": 1, "bytes": 2},
                                                           "data": 3}}))
    assert read_record(here) == {}
    record(here, "score", 100, 2.0, 400)
    assert read_record(here) == {"score": {"units": 100, "seconds": 2.0, "bytes": 400.0}}
