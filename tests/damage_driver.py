"""The process behind tests/test_damaged_files.py: `python tests/damage_driver.py PLAN.json`.

It imports make_submission.py's code once (`fault_driver.load_kit`), runs the finished reference run in a forked
child, then for each case copies the reference's folders, damages one kind of file the kit wrote (`damage`), removes
what would spare the rerun from reading it (`FILES`: a cached score matrix is read instead of the caches behind it),
and runs the same command again in a forked child (`fault_driver.run`). What each rerun did is written to the plan's
`results` file for the test to check: its exit code, the files damaged, and its output's tail.

PLAN.json: {"data": DIR, "root": DIR, "results": FILE, "argv": [...], "cases": [[kind, damage], ...]}; the reference
writes under root/reference/, each case under root/<kind>__<damage>/ (runs/, ens/, sub/, output.log).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fault_driver import load_kit, run  # noqa: E402

RUN = "runs/tiny/fold0"
CHUNK = 16  # KINRET_EMBED_CHUNK the test sets: the images per saved part of a cache
SCORES = "ens/scores/*"  # the chosen variant's folder: a test matrix is kept for what is submitted
# kind -> (its file(s) under a run's folders, what is removed so that the rerun reads them)
FILES = {
    "checkpoint": (f"{RUN}/checkpoint.pt", ()),
    "config.json": (f"{RUN}/config.json", ()),
    "state.json": (f"{RUN}/state.json", ()),
    "summary.csv": (f"{RUN}/summary.csv", ()),
    "data.json": (f"{RUN}/data.json", ()),
    "embeddings": (f"{RUN}/embeddings/test_*.npz", ("ens/scores",)),
    "raw-pixel cache": ("runs/_cache/raw_pixels_test_*.npz", ("ens/scores",)),
    "cache chunk": ("runs/_cache/raw_pixels_test_*.npz.parts/rows000000000-000000016.npz", ("ens/scores",)),
    "pixel caches": ("runs/_cache/pixels_*.npy", ("ens/scores", "runs/tiny/fold0/embeddings",
                                                   "runs/tiny/fold1/embeddings")),
    "score matrix": (f"{SCORES}/test.npy", ()),
    "score ids": (f"{SCORES}/test.ids.npz", ()),
    "throughput.json": ("runs/throughput.json", ()),
    "run.json": ("sub/run.json", ()),
    "report key": ("sub/report/.report_key", ()),
    "selection.json": ("sub/selection.json", ()),
    "choice record": ("ens/scores/choice.json", ()),
}


def case_name(kind: str, damage: str) -> str:
    return f"{kind}__{damage}".replace(" ", "_").replace(".", "_")


def _npz_like(path: Path, drop: str = "", **changes) -> None:
    """Rewrite the archive `path` as np.savez would, without the array `drop`, with `changes` replacing arrays."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != drop} | changes
    with open(path, "wb") as f:  # the kit's own file name: np.savez would add .npz to a temporary name
        np.savez(f, **arrays)


def _wrong_thing(kind: str, path: Path, work: Path) -> None:
    """A file of the right format holding the wrong thing, for each kind."""
    if kind == "checkpoint":  # another fold's checkpoint
        shutil.copyfile(work / "runs/tiny/fold1/checkpoint.pt", path)
    elif kind in ("config.json", "data.json", "throughput.json", "run.json", "selection.json", "choice record"):
        path.write_text("[]\n")  # JSON of the wrong type
    elif kind == "state.json":
        path.write_text(json.dumps({"epoch": "two", "epochs": 2, "finished": "yes"}))
    elif kind == "summary.csv":  # another CSV of the kit
        shutil.copyfile(work / "runs/tiny/grid_summary.csv", path)
    elif kind in ("embeddings", "raw-pixel cache"):  # the same cache of another image set
        other = path.name.rsplit("_", 1)[0].replace("test", "val")
        shutil.copyfile(next(path.parent.glob(f"{other}_*.npz")), path)
    elif kind == "cache chunk":  # the ids of other rows
        with np.load(path) as data:
            ids = data["ids"]
        _npz_like(path, ids=np.roll(ids, 1))
    elif kind == "pixel caches":  # another shape
        np.save(path, np.zeros((2, 32, 32, 3), np.uint8))
    elif kind == "score matrix":  # another shape
        np.save(path, np.zeros((2, 2), np.float32))
    elif kind == "score ids":  # another split's ids, this split's key kept
        with np.load(path.with_name("oof0.ids.npz")) as other:
            _npz_like(path, probe_ids=other["probe_ids"], gallery_ids=other["gallery_ids"])
    elif kind == "report key":
        path.write_text(json.dumps({"key": 1, "files": "cmc.png"}))
    else:
        raise KeyError(kind)


def damage(kind: str, how: str, path: Path, work: Path) -> None:
    raw = path.read_bytes()
    if how == "cut in half":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "garbled block":  # 64 bytes zeroed in the middle, as a bad disk block leaves them
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + bytes(64) + raw[mid + 64:])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(len(raw)).bytes(max(len(raw), 64)))
    elif how == "wrong thing":
        _wrong_thing(kind, path, work)
    elif how == "missing key":  # an archive without one of its arrays
        _npz_like(path, drop={"score ids": "gallery_ids", "embeddings": "emb"}.get(kind, "pixels"))
    elif how == "other split":  # a whole ids file of another split: another key, so the matrix is stale
        shutil.copyfile(path.with_name("oof0.ids.npz"), path)
    else:
        raise KeyError(how)


def _make_chunk(work: Path) -> None:
    """The first saved part of the raw-pixel cache of the test images, as a killed build leaves it."""
    cache = next((work / "runs/_cache").glob("raw_pixels_test_*.npz"))
    with np.load(cache) as data:
        part = {k: (data[k][:CHUNK] if k == "ids" else data[k][:, :CHUNK]) for k in data.files}
    parts = cache.with_name(cache.name + ".parts")
    parts.mkdir()
    with open(parts / f"rows{0:09d}-{CHUNK:09d}.npz", "wb") as f:
        np.savez(f, **part)
    cache.unlink()


def prepare(kind: str, how: str, reference: Path, work: Path) -> list[str]:
    """`work` as a copy of the reference with `kind` damaged `how`; the damaged files, relative to `work`."""
    shutil.copytree(reference, work, symlinks=True, ignore=shutil.ignore_patterns("output.log", "writes.log"))
    pattern, spare = FILES[kind]
    if kind == "cache chunk":
        _make_chunk(work)
    targets = sorted(work.glob(pattern))
    if not targets:
        raise FileNotFoundError(f"{kind}: no {pattern} under {work}")
    for target in targets:
        damage(kind, how, target, work)
    for gone in spare:
        shutil.rmtree(work / gone, ignore_errors=True)
    return [str(t.relative_to(work)) for t in targets]


def printing(main):
    """`main` with an exception it lets through printed with its traceback, as the command line would show it (a
    forked child ends with os._exit, which prints nothing)."""
    def run_main(argv: list[str]) -> int:
        try:
            return main(argv)
        except BaseException:
            traceback.print_exc()
            return 1

    return run_main


def drive(plan: dict) -> dict:
    main = printing(load_kit())
    root, argv = Path(plan["root"]), ["--data-root", plan["data"], *plan["argv"]]
    reference = root / "reference"
    t0 = time.perf_counter()
    results = {"reference": {"code": run(main, reference, argv), "seconds": time.perf_counter() - t0}}
    if results["reference"]["code"] != 0:
        return results
    for kind, how in plan["cases"]:
        work = root / case_name(kind, how)
        t0 = time.perf_counter()
        damaged = prepare(kind, how, reference, work)
        before = {p: (work / p).read_bytes() for p in damaged}
        out = results[work.name] = {"damaged": damaged, "code": run(main, work, argv)}
        out["unchanged"] = [p for p in damaged if (work / p).is_file() and (work / p).read_bytes() == before[p]]
        if out["code"] == 2:  # stopped: do what its line says (delete the run folder), then the same command
            (work / "output.log").rename(work / "stopped.log")
            shutil.rmtree(work / RUN)
            out["after_advice"] = run(main, work, argv)
        out["seconds"] = time.perf_counter() - t0
    return results


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["results"]).write_text(json.dumps(drive(spec), indent=1))
