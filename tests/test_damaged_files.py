"""Files the kit wrote, found damaged on the next run: rebuilt with one warning naming the file, or one line naming
it and exit code 2, never a traceback.

The table below is every kind of file a run reads back, each damaged as a disk error, an interrupted copy or a hand
edit leaves it: cut in half, overwritten with random bytes, or of the right format holding the wrong thing (another
fold's checkpoint, JSON of another type, another CSV, a cache of other images, an archive missing an array, a matrix
of another shape, the ids of another split). One small finished run (tests/damage_driver.py, `tiny` on the small
set) is copied for each case, damaged and run again with the same command, every run a forked child of one driver
process. A healed case ends with the reference's predictions.csv and every score matrix equal to the reference's; a
stopped one ends with one line naming the file, and the same command after doing what the line says heals it.

Below the table: the readers of `kinret.readback` on each damage, a damaged part of a cache being built, and the
outputs of a frozen pass (a unit cut a fine-tune reads, its ids file, a pass's saved chunks), which the tiny run does
not make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_image
from damage_driver import case_name
from torch import nn

from kinret.features.cache import build_in_chunks
from kinret.features.frozen import Cut, FrozenPass
from kinret.models.units import UnitChain
from kinret.readback import DamagedFile, check_ids, read_json, read_npy, read_npz, read_table, read_torch

HEALED, QUIET, STOPS = "healed, one warning", "healed, no warning", "exit 2 naming it"
ALL = ("cut in half", "random bytes", "wrong thing")
CASES = [
    *[("checkpoint", d, HEALED) for d in (*ALL, "garbled block")],  # the run is trained again
    *[(k, d, HEALED) for k in ("config.json", "state.json", "summary.csv") for d in ALL],  # from the checkpoint
    *[("data.json", d, STOPS) for d in ALL],  # the data the run was trained on: unknown without training it again
    *[(k, d, HEALED) for k in ("embeddings", "raw-pixel cache") for d in (*ALL, "missing key")],
    ("raw-pixel cache", "garbled block", HEALED),  # an archive's checksum
    *[(k, d, HEALED) for k in ("cache chunk", "pixel caches", "score matrix") for d in ALL],
    *[("score ids", d, HEALED) for d in (*ALL, "missing key")],
    ("score ids", "other split", QUIET),  # another split's key: stale, so computed again as after a data change
    *[(k, d, HEALED) for k in ("throughput.json", "run.json", "report key", "choice record")
      for d in ("random bytes", "wrong thing")],  # the choice made again and recorded
    ("selection.json", "random bytes", QUIET),  # written by a run, never read back by one
]
# what each case used to give before these checks (2026-12-07, the same command on the same folders; the four)
BEFORE = {("checkpoint", "cut in half"): "exit 1: RuntimeError: PytorchStreamReader failed reading zip archive",
          ("config.json", "cut in half"): "exit 1: json.decoder.JSONDecodeError: Unterminated string",
          ("state.json", "random bytes"): "exit 1: UnicodeDecodeError: 'utf-8' codec can't decode byte",
          ("score ids", "random bytes"): "exit 1: ValueError: This file contains pickled (object) data"}


@pytest.fixture(scope="module")
def driven(small_data, tmp_path_factory):
    """The driver run once for every case: (its results, the folder holding each case's run)."""
    root = tmp_path_factory.mktemp("damaged")
    plan = {"data": str(small_data), "root": str(root), "results": str(root / "results.json"),
            "cases": [[k, d] for k, d, _ in CASES], "argv": ["--experiments", "tiny", "--jobs", "1", "--quiet"]}
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "KINRET_EMBED_CHUNK": "16"}  # as damage_driver.CHUNK: a cache has several parts
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "damage_driver.py"), str(root / "plan.json")],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    assert results["reference"]["code"] == 0, (root / "reference" / "output.log").read_text()[-3000:]
    print(f"\n{len(CASES)} damaged-file cases: {time.perf_counter() - t0:.1f} s in all (the reference run "
          f"{results['reference']['seconds']:.1f} s)")
    return results, root


def same_outputs(work: Path, reference: Path) -> None:
    """The same predictions.csv and every score matrix equal to the reference's, bit for bit."""
    assert (work / "sub" / "predictions.csv").read_bytes() == (reference / "sub" / "predictions.csv").read_bytes()
    mine, theirs = (sorted(p.relative_to(w) for p in (w / "ens" / "scores").rglob("*.npy")) for w in (work, reference))
    assert mine == theirs
    for rel in mine:
        assert np.array_equal(np.load(work / rel), np.load(reference / rel)), rel
    assert not list(work.rglob(".*.tmp*")), "temporaries left behind"


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "damage", "expect"), CASES, ids=[f"{k}-{d}" for k, d, _ in CASES])
def test_a_damaged_file_is_rebuilt_or_named_never_a_traceback(driven, kind, damage, expect):
    results, root = driven
    case, work = results[case_name(kind, damage)], root / case_name(kind, damage)
    log = (work / ("stopped.log" if case["code"] == 2 else "output.log")).read_text()
    print(f"{kind} {damage}: exit {case['code']} in {case['seconds']:.1f} s; before: "
          f"{BEFORE.get((kind, damage), 'not tried')}")
    assert "Traceback" not in log, log[-3000:]
    damaged = [str(work / p) for p in case["damaged"]]
    warned = [ln for ln in log.splitlines() if "WARNING" in ln and "damaged" in ln]
    if expect == STOPS:
        last = log.strip().splitlines()[-1]
        assert case["code"] == 2 and "damaged" in last and any(p in last for p in damaged), log[-2000:]
        assert "delete" in last
        assert case["after_advice"] == 0  # doing what the line says: the same command trains it again
    else:
        assert case["code"] == 0, log[-3000:]
        if expect == HEALED:
            assert warned, log[-2000:]
            for p in damaged:  # each damaged file read is named by one warning, which says what the kit did
                assert sum(p + ":" in ln for ln in warned) <= 1, warned
            assert all(any(p + ":" in ln for p in damaged) for ln in warned), warned
            if kind != "pixel caches":  # each of them is healed when it is read, and not every one is read here
                assert not case["unchanged"], f"left damaged: {case['unchanged']}"
        else:
            assert not warned, warned
    same_outputs(work, root / "reference")


# ---- the readers ---------------------------------------------------------------------------------------------------
def test_each_reader_names_the_file_and_the_damage(tmp_path):
    good = tmp_path / "x.json"
    good.write_text('{"a": 1}')
    assert read_json(good, dict, ("a",)) == {"a": 1}
    for text, reason in (('{"a": ', "not JSON"), (b"\x82\xff", "not UTF-8"), ("[1]", "holds a JSON list"),
                         ("{}", "has no 'a'")):
        good.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(DamagedFile, match=reason) as info:
            read_json(good, dict, ("a",))
        assert str(info.value).startswith(f"{good}: damaged (")
    arrays = tmp_path / "a.npz"
    np.savez(arrays, ids=np.array(["p", "q"]), x=np.ones((1, 2, 300)))
    assert set(read_npz(arrays, ("ids",))) == {"ids", "x"}
    raw = arrays.read_bytes()
    mid = len(raw) // 2  # inside x's values: the archive's checksum of x no longer holds
    for data, reason in ((raw[:mid], "unreadable .npz"), (raw[:mid] + bytes(64) + raw[mid + 64:], "CRC"),
                         (b"\x93" + os.urandom(len(raw)), "not an .npz archive"), (b"", "empty")):
        arrays.write_bytes(data)
        with pytest.raises(DamagedFile, match=reason):
            read_npz(arrays)
    np.savez(arrays, ids=np.array(["p"]))
    with pytest.raises(DamagedFile, match="has no array 'x'"):
        read_npz(arrays, ("x",))
    with pytest.raises(DamagedFile, match="row 1 is 'r', 'q' expected"):
        check_ids(arrays, np.array(["p", "r"]), ["p", "q"])
    matrix = tmp_path / "m.npy"
    np.save(matrix, np.zeros((3, 4), np.float32))
    assert read_npy(matrix, (3, None), np.float32, mmap=True).shape == (3, 4)
    with pytest.raises(DamagedFile, match=r"shape \(3, 4\), \(2, any\) expected"):
        read_npy(matrix, (2, None))
    with pytest.raises(DamagedFile, match="float32 values, uint8 expected"):
        read_npy(matrix, dtype=np.uint8)
    matrix.write_bytes(matrix.read_bytes()[:100])
    for mmap in (False, True):
        with pytest.raises(DamagedFile, match="unreadable .npy"):
            read_npy(matrix, mmap=mmap)
    ckpt = tmp_path / "c.pt"
    torch.save({"model": {}, "epoch": 1}, ckpt)
    assert read_torch(ckpt, ("model",), mmap=True)["epoch"] == 1
    with pytest.raises(DamagedFile, match="has no 'rows'"):
        read_torch(ckpt, ("rows",))
    torch.save([1, 2], ckpt)
    with pytest.raises(DamagedFile, match="holds a list"):
        read_torch(ckpt)
    torch.save({"model": {"w": torch.zeros(1000)}}, ckpt)
    raw = ckpt.read_bytes()
    at = raw.index(bytes(4000))  # inside the tensor's values: torch.load reads them without a check
    ckpt.write_bytes(raw[:at] + b"\x01" * 64 + raw[at + 64:])
    assert read_torch(ckpt)["model"]["w"].max() > 0
    with pytest.raises(DamagedFile, match="fails its CRC-32 check"):
        read_torch(ckpt, verify=True)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    with pytest.raises(DamagedFile, match="unreadable by torch.load: PytorchStreamReader failed"):
        read_torch(ckpt, mmap=True)
    ckpt.write_bytes(b"\x80\x02" + os.urandom(300))  # a pickle's start: torch's older format, never the kit's
    with pytest.raises(DamagedFile, match="not a checkpoint"):
        read_torch(ckpt)
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n3,nan\n")
    assert read_table(table, ("a", "b"), numeric=True)["b"].isna().tolist() == [False, True]
    for text, reason in (("a,b\n1,2\n3,", "cut short"), ("a,c\n1,2\n", "header"), ("a,b\n1\n", "line 2 has 1"),
                         ("a,b\n1,x\n", "not a number")):
        table.write_text(text)
        with pytest.raises(DamagedFile, match=reason):
            read_table(table, ("a", "b"), numeric=True)
    with pytest.raises(FileNotFoundError):  # absent is not damaged: each caller knows what absent means
        read_json(tmp_path / "none.json")


def test_a_damaged_cache_or_part_is_computed_again_with_one_warning(tmp_path, caplog):
    ids = np.array([f"img{i}" for i in range(7)])
    calls = []

    def compute(a, b):
        calls.append((a, b))
        return {"x": np.arange(a, b, dtype=np.float32)[None, :, None] * np.ones((2, 1, 3))}

    cache = tmp_path / "feats.npz"
    want = build_in_chunks(cache, ids, compute, chunk=3, keys=("x",))["x"]
    raw = cache.read_bytes()
    for bad in (raw[:len(raw) // 2], os.urandom(len(raw))):
        cache.write_bytes(bad)
        calls.clear()
        assert np.array_equal(build_in_chunks(cache, ids, compute, chunk=3, keys=("x",))["x"], want)
        assert calls == [(0, 3), (3, 6), (6, 7)] and cache.read_bytes() != bad
    np.savez(cache, ids=ids, y=want)  # an array missing
    assert np.array_equal(build_in_chunks(cache, ids, compute, chunk=3, keys=("x",))["x"], want)
    cache.unlink()
    parts = tmp_path / "feats.npz.parts"  # a killed build's parts: one garbled, one of other rows
    parts.mkdir()
    (parts / "rows000000000-000000003.npz").write_bytes(b"PK\x03\x04" + os.urandom(40))
    np.savez(parts / "rows000000003-000000006.npz", ids=ids[:3], x=want[:, :3])
    calls.clear()
    caplog.clear()
    assert np.array_equal(build_in_chunks(cache, ids, compute, chunk=3, keys=("x",))["x"], want)
    assert sorted(calls) == [(0, 3), (3, 6), (6, 7)] and not parts.exists()
    named = [r.getMessage() for r in caplog.records if ": damaged (" in r.getMessage()]
    assert len(named) == 2 and all("computed again" in m for m in named), named


# ---- the outputs of a frozen pass ---------------------------------------------------------------------------------
class Chain(UnitChain):
    """A two-unit network written as a chain of units, as a cut of a frozen pass needs one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.units = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
        self.num_features = 4

    def chain_units(self) -> nn.Sequential:
        return self.units

    def forward_prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        return self.units[:cut](x)

    def forward_rest(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        return self.units[cut:](h)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


def _pass(**kw) -> FrozenPass:
    net = Chain().eval()
    data_cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    return FrozenPass(net, "chain-weights", data_cfg, "chain", flip=True, channels_last=False, **kw)


@pytest.mark.parametrize("damage", ["cut in half", "random bytes", "another shape", "ids cut", "ids of other images"])
def test_a_damaged_output_of_a_frozen_pass_is_computed_again(tmp_path, damage, caplog):
    paths = [write_image(tmp_path / "img" / f"{i}.jpg", i) for i in range(5)]
    cut, cache = Cut(1, "float32"), tmp_path / "cache"
    want = np.array(_pass().outputs(paths, cache, [cut])[cut.name])
    folder = _pass().folder(paths, cache)
    target, ids_file = folder / f"{cut.name}.npy", folder / "ids.npy"
    victim = ids_file if damage.startswith("ids") else target
    raw = victim.read_bytes()
    if damage in ("cut in half", "ids cut"):
        victim.write_bytes(raw[:len(raw) // 2])
    elif damage == "random bytes":
        victim.write_bytes(os.urandom(len(raw)))
    elif damage == "another shape":
        np.save(victim, np.zeros((2, 4, 4, 8, 8), np.float32))
    else:
        np.save(victim, np.array([str(p) for p in reversed(paths)]))
    assert np.array_equal(np.array(_pass().outputs(paths, cache, [cut])[cut.name]), want)
    named = [r.getMessage() for r in caplog.records if ": damaged (" in r.getMessage()]
    assert len(named) == 1 and str(victim) in named[0], named
    assert read_npy(target, (2, 5, 4, 8, 8), np.float32) is not None  # written again, whole


def test_a_damaged_saved_chunk_of_a_pass_is_computed_again(tmp_path, caplog, monkeypatch):
    paths = [write_image(tmp_path / "img" / f"{i}.jpg", i) for i in range(6)]
    cut, cache = Cut(1, "float32"), tmp_path / "cache"
    want = np.array(_pass(chunk=3).outputs(paths, tmp_path / "reference", [cut])[cut.name])
    real, calls, kill = FrozenPass._compute, [], [True]

    def killed(self, paths, start, stop, *rest):
        calls.append(start)
        if start == 3 and kill[0]:
            raise KeyboardInterrupt  # killed while computing the second chunk
        return real(self, paths, start, stop, *rest)

    monkeypatch.setattr(FrozenPass, "_compute", killed)
    with pytest.raises(KeyboardInterrupt):
        _pass(chunk=3).outputs(paths, cache, [cut])
    (part,) = _pass().folder(paths, cache).glob("parts-*/rows000000000-000000003.npz")
    part.write_bytes(part.read_bytes()[:100])  # the saved first chunk, cut short
    calls.clear()
    kill[0] = False
    assert np.array_equal(np.array(_pass(chunk=3).outputs(paths, cache, [cut])[cut.name]), want)
    assert calls == [0, 3]  # the damaged chunk is computed again, not trusted
    named = [r.getMessage() for r in caplog.records if ": damaged (" in r.getMessage()]
    assert len(named) == 1 and str(part) in named[0], named


# ---- the synthetic data set's own records ---------------------------------------------------------------------------
def test_a_damaged_synthetic_record_regenerates_or_names_itself(tmp_path, caplog):
    from kinret.data.synth import SynthConfig, generate, made_from
    from kinret.scoring.signal import print_shares

    cfg = SynthConfig(seed=3, n_train=4, n_val=0, n_test=2, size=32, max_members=3, max_images=2)
    root = generate(tmp_path / "synthetic", cfg, jobs=1)
    faces = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}
    (root / "synth_config.json").write_bytes(os.urandom(64))
    assert not made_from(root, cfg)
    assert any("synth_config.json: damaged (not UTF-8 text): the data set is generated again" in r.getMessage()
               for r in caplog.records)
    generate(root, cfg, jobs=1)
    assert made_from(root, cfg) and {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")} == faces
    latents = root / "latents.npz"
    latents.write_bytes(latents.read_bytes()[:100])
    with pytest.raises(DamagedFile, match="latents.npz: damaged .*python -m kinret.synth --force"):
        print_shares(root, None)
