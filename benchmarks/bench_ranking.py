"""Score -> rank -> CSV + zip -> evaluate: the kit's real submission path against two per-probe reference loops, on
the same inputs, side by side in one run, with the ratios printed.

The kit path is the code make_submission.py runs: the score matrix of a cosine variant from
`kinret.scoring.similarity.probe_scores` (`cosine_variant`, which the ensemble scores with, plus the unreadable-image
rules; "meanemb" = cosine of the mean embedding, "max" = max of the per-image cosines), then
`kinret.submission.predictions.submit`, which ranks a block of probes (`kinret.scoring.ranking.rank_gallery`),
writes its CSV lines and scores both APs before the next block, then zips the CSV (zipfile, deflate level 1, a chunk
at a time): the kit's rank, write and evaluate stages are one pass, timed under "rank". The references:

- "naive", a numpy loop in the style of the public RFIW solutions: per probe, normalise and score its images, fuse
  them (mean of the cosines for "meanemb", the same order as the mean embedding's; max for "max"), argsort, both
  APs in numpy, one CSV line; then the CSV zipped with zipfile (deflate level 1);
- "public", the RFIW 2021 winner's test loop (TeamCNU, Track3/test.py) without its network: per probe the gallery
  in batches of 20, scores turned into Python lists of [index, score], sorted with a key function, each row
  appended with csv.writer, AP summed in a Python loop over the ranking; then the same zip.

Test scale is 190 probes, 1,487 probe faces, 3,897 gallery faces, 512-d features (10x: 1,900 / 14,870 / 38,970),
drawn from a seed with a planted family structure, so AP means something. Stages: score, rank, write (the CSV and
its zip), evaluate (both APs); total is the wall time of the whole path. Each (scale, fusion, path) runs in a fresh
process with `--threads` BLAS threads; the fastest of `--repeats` runs is kept; memory is that process's peak RSS
during the path. Before any number is printed, each reference must agree with the kit: the same ranking (rows may
differ only by swapping scores within 1e-5 of each other, as the paths add in a different float order), CSV lines
byte for byte identical (line ends aside: csv.writer ends them in CRLF) exactly where the rankings are, and mAP
within 1e-4.

    python benchmarks/bench_ranking.py                         # scales 1 and 10, both fusions
    python benchmarks/bench_ranking.py --scale 1 --fusion meanemb --repeats 1
    python benchmarks/bench_ranking.py --scale 10 --naive-probes 400   # time 400 probes of the loop, extrapolate

At 10x the public loop is timed on its first `--public-probes` probes (default 200) and extrapolated linearly; the
table says so. The targets (10x within 5 s and 2 GiB on 2 cores; the kit >= 20x faster than each loop) are printed
as met or MISSED; no timing or memory figure is asserted, here or in tests/test_bench_ranking.py.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import multiprocessing
import os
import resource
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kinret.metrics import AP_VARIANTS
from kinret.scoring.ranking import rank_gallery
from kinret.scoring.similarity import probe_scores
from kinret.submission.predictions import CSV_NAME, submit

TEST_SCALE = (190, 1487, 3897)  # probes, probe faces, gallery faces
DIM = 512
FUSIONS = ("meanemb", "max")
STAGES = ("score", "rank", "write", "evaluate")  # write: predictions.csv and its zip
TARGET_S, TARGET_GIB, TARGET_RATIO = 5.0, 2.0, 20.0
REFERENCES = ("naive", "public")  # the two per-probe loops the kit is compared with
PATHS = ("kit", *REFERENCES)
ZIP_NAME = "submission.zip"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Inputs:
    probe_feats: np.ndarray  # (M, D) float32
    owner: np.ndarray  # (M,) probe of each image
    gallery_feats: np.ndarray  # (N, D) float32
    probe_fids: list[str]
    gallery_fids: list[str]

    @property
    def n_probes(self) -> int:
        return len(self.probe_fids)


def make_inputs(n_probes: int, n_images: int, n_gallery: int, dim: int = DIM, seed: int = 0,
                signal: float = 0.3) -> Inputs:
    """Probe p belongs to family p; gallery faces to one of n_probes * 5/4 families (a fifth are strangers to every
    probe, and a probe may have no relative). A face is its family's centre times `signal` plus N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    n_fam = n_probes + n_probes // 4
    centres = rng.standard_normal((n_fam, dim), dtype=np.float32) * np.float32(signal)
    owner = rng.permutation(np.concatenate([np.arange(n_probes), rng.integers(0, n_probes, n_images - n_probes)]))
    gallery_fam = rng.integers(0, n_fam, n_gallery)
    probe_feats = centres[owner] + rng.standard_normal((n_images, dim), dtype=np.float32)
    gallery_feats = centres[gallery_fam] + rng.standard_normal((n_gallery, dim), dtype=np.float32)
    return Inputs(probe_feats, owner, gallery_feats, [f"F{i:05d}" for i in range(n_probes)],
                  [f"F{i:05d}" for i in gallery_fam])


def scaled_inputs(scale: int, seed: int = 0) -> Inputs:
    return make_inputs(*(n * scale for n in TEST_SCALE), seed=seed)


def kit_scores(x: Inputs, how: str) -> np.ndarray:
    """The kit's (P, N) float32 scores of the inputs, every image readable."""
    ok_p, ok_g = np.ones(len(x.owner), bool), np.ones(len(x.gallery_feats), bool)
    return probe_scores(x.probe_feats, ok_p, x.owner, x.n_probes, x.gallery_feats, ok_g, how)


@dataclass
class Result:
    ranking: np.ndarray | None
    ap: dict[str, np.ndarray]  # per-probe AP by variant
    times: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    csv_bytes: int = 0
    scores: np.ndarray | None = None  # the kit's, to rank for the agreement check once the peak is read


def kit_path(x: Inputs, out_dir: Path, how: str = "meanemb", keep_ranking: bool = True) -> Result:
    """The kit's submission path: probe_scores, then `submit` (rank, write the CSV, score both APs a block of probes
    at a time, then zip the CSV), timed as "score" and "rank" (write and evaluate run inside it, block by block).
    The ranking the agreement check needs is computed after the timed path (`keep_ranking`), so that it counts in
    neither the time nor, in `measure`, the peak."""
    t0 = time.perf_counter()
    scores = kit_scores(x, how)
    t1 = time.perf_counter()
    split = SimpleNamespace(probes=x.probe_fids, gallery=x.gallery_fids, labelled=False, describe=lambda: "bench")
    truth = SimpleNamespace(probes=x.probe_fids, gallery=x.gallery_fids, probe_fids=x.probe_fids,
                            gallery_fids=x.gallery_fids)
    sub = submit(scores, split, out_dir, truth, ZIP_NAME)
    t2 = time.perf_counter()
    times = {"score": t1 - t0, "rank": t2 - t1, "write": 0.0, "evaluate": 0.0}
    result = Result(None, {v: sub.scores[v].per_probe_ap for v in AP_VARIANTS}, times, t2 - t0,
                    (out_dir / CSV_NAME).stat().st_size, scores)
    if keep_ranking:
        result.ranking = rank_gallery(scores)
    return result


def _add_stages(times: dict[str, float], *marks: float) -> None:
    """Add the gaps between five time marks of a loop's probe to its score, rank, evaluate and write stages."""
    for stage, t0, t1 in zip(("score", "rank", "evaluate", "write"), marks[:-1], marks[1:], strict=True):
        times[stage] += t1 - t0


def _zip_csv(out_dir: Path, times: dict[str, float]) -> None:
    """The reference loops' zip: zipfile at deflate level 1, counted in the write stage."""
    t0 = time.perf_counter()
    with zipfile.ZipFile(out_dir / ZIP_NAME, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.write(out_dir / CSV_NAME, CSV_NAME)
    times["write"] += time.perf_counter() - t0


def naive_path(x: Inputs, out_dir: Path, how: str = "meanemb", n_probes: int | None = None) -> Result:
    """A public-solution loop over the first `n_probes` probes: per probe, cosine of each of its images against the
    gallery, mean (for "meanemb": the same order as the mean embedding's cosine) or max, argsort, both APs in numpy,
    one CSV line; then the CSV zipped."""
    n = x.n_probes if n_probes is None else min(n_probes, x.n_probes)
    times = dict.fromkeys(STAGES, 0.0)
    start = time.perf_counter()
    gallery = x.gallery_feats / np.linalg.norm(x.gallery_feats, axis=1, keepdims=True)
    gallery_fids = np.array(x.gallery_fids)
    ranking = np.empty((n, len(gallery_fids)), dtype=np.int64)
    ap = {"standard": np.zeros(n), "trapezoid": np.zeros(n)}
    times["score"] += time.perf_counter() - start
    with open(out_dir / CSV_NAME, "w") as f:
        for p in range(n):
            t0 = time.perf_counter()
            feats = x.probe_feats[x.owner == p]
            cos = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ gallery.T
            s = cos.mean(axis=0) if how == "meanemb" else cos.max(axis=0)
            t1 = time.perf_counter()
            order = np.argsort(-s, kind="stable")
            ranking[p] = order
            t2 = time.perf_counter()
            ranks = np.flatnonzero(gallery_fids[order] == x.probe_fids[p])
            if ranks.size:
                c = np.arange(1, ranks.size + 1)
                p_at = c / (ranks + 1)
                p_before = np.where(ranks > 0, (c - 1) / np.maximum(ranks, 1), 1.0)
                ap["standard"][p] = p_at.mean()
                ap["trapezoid"][p] = ((p_before + p_at) / 2).mean()
            t3 = time.perf_counter()
            f.write(",".join(map(str, order)) + "\n")
            t4 = time.perf_counter()
            _add_stages(times, t0, t1, t2, t3, t4)
    _zip_csv(out_dir, times)
    return Result(ranking, ap, times, time.perf_counter() - start, (out_dir / CSV_NAME).stat().st_size)


def public_path(x: Inputs, out_dir: Path, how: str = "meanemb", n_probes: int | None = None, batch: int = 20
                ) -> Result:
    """The RFIW 2021 winner's Track-3 test loop (TeamCNU, Track3/test.py) on precomputed features: for each probe,
    the gallery in batches of `batch`, cosine of every probe photo with every face, mean (or max) over the photos,
    [index, score] rows as Python lists sorted by score (stable, so ties keep the lower index), the row appended to
    the CSV with csv.writer (its lines end in CRLF); then AP in a Python loop over the ranking (their scoring ran on
    Codalab) and the zip."""
    n = x.n_probes if n_probes is None else min(n_probes, x.n_probes)
    times = dict.fromkeys(STAGES, 0.0)
    start = time.perf_counter()
    gallery = x.gallery_feats / np.linalg.norm(x.gallery_feats, axis=1, keepdims=True)
    ranking = np.empty((n, len(gallery)), dtype=np.int64)
    ap = {"standard": np.zeros(n), "trapezoid": np.zeros(n)}
    csv_path = out_dir / CSV_NAME
    for p in range(n):
        t0 = time.perf_counter()
        feats = x.probe_feats[x.owner == p]
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        rows: list[list[float]] = []
        for a in range(0, len(gallery), batch):
            cos = gallery[a:a + batch] @ feats.T
            score = cos.mean(axis=1) if how == "meanemb" else cos.max(axis=1)
            rows.extend(np.column_stack([np.arange(a, a + len(score)), score]).tolist())
        t1 = time.perf_counter()
        rows.sort(key=lambda r: r[1], reverse=True)
        order = [int(r[0]) for r in rows]
        t2 = time.perf_counter()
        hits, std, trap = 0, 0.0, 0.0
        for r, j in enumerate(order):
            if x.gallery_fids[j] == x.probe_fids[p]:
                hits += 1
                p_at = hits / (r + 1)
                std += p_at
                trap += ((hits - 1) / r if r > 0 else 1.0) / 2 + p_at / 2
        if hits:
            ap["standard"][p], ap["trapezoid"][p] = std / hits, trap / hits
        t3 = time.perf_counter()
        with open(csv_path, "a+", newline="") as f:
            csv.writer(f).writerow([str(v) for v in order])
        t4 = time.perf_counter()
        ranking[p] = order
        _add_stages(times, t0, t1, t2, t3, t4)
    _zip_csv(out_dir, times)
    return Result(ranking, ap, times, time.perf_counter() - start, csv_path.stat().st_size)


def csv_line_digests(path: Path) -> np.ndarray:
    """One 64-bit digest per line of a CSV, its line end (LF or CRLF) left out, read a line at a time: equal
    digests mean byte-identical rows, without keeping CSVs of hundreds of MB for the check."""
    with open(path, "rb") as f:
        digests = b"".join(hashlib.blake2b(line.rstrip(b"\r\n"), digest_size=8).digest() for line in f)
    return np.frombuffer(digests, dtype=np.uint64)


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> str:
    """Reset the kernel's peak-RSS mark (Linux clear_refs) and say how peaks are read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after clear_refs"
    except OSError:
        return "ru_maxrss (peak since process start)"


def _peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(scale: int, path: str, how: str, naive_probes: int | None, save_dir: str, repeats: int = 1,
            public_probes: int | None = None) -> dict:
    """One path at one scale in this process: inputs, reset the peak, run `repeats` times (once for a loop run
    over 20 s) keeping the fastest, save its ranking, AP and CSV line digests for the agreement check."""
    x = scaled_inputs(scale)
    gc.collect()
    base = _status_kib("VmRSS") or 0
    method = _reset_peak()
    best, lines = None, None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            if path == "kit":
                r = kit_path(x, Path(out), how, keep_ranking=False)
            elif path == "public":
                r = public_path(x, Path(out), how, public_probes if scale > 1 else None)
            else:
                r = naive_path(x, Path(out), how, naive_probes)
            if best is None or r.wall < best.wall:
                best = r
                lines = csv_line_digests(Path(out) / CSV_NAME)  # a line at a time: no mark on the peak
        del r
        if path in REFERENCES and best.wall > 20:
            break
    peak = _peak_kib()
    if best.ranking is None:  # the kit's: ranked for the check after the peak was read
        best.ranking = rank_gallery(best.scores)
    np.save(Path(save_dir) / f"{path}_{how}_ranking.npy", best.ranking)
    np.save(Path(save_dir) / f"{path}_{how}_lines.npy", lines)
    np.savez(Path(save_dir) / f"{path}_{how}_ap.npz", **best.ap)
    return dict(times=best.times, wall=best.wall, peak_mib=peak / 1024, base_mib=base / 1024, method=method,
                n_timed=len(best.ranking), csv_mb=best.csv_bytes / 1e6)


def check_agreement(x: Inputs, how: str, kit: np.ndarray, ref: np.ndarray, kit_ap: dict, ref_ap: dict,
                    kit_lines: np.ndarray | None = None, ref_lines: np.ndarray | None = None,
                    scores: np.ndarray | None = None, atol: float = 1e-5, ap_tol: float = 1e-4
                    ) -> tuple[int, dict[str, float]]:
    """Assert the reference rows (the first len(ref) probes) are the kit's ranking up to the order of scores within
    `atol` (the paths fuse in a different float order, so near-ties may swap), that, given CSV line digests, the
    two CSVs have byte-identical lines exactly where the rankings have identical rows, and that mAP over those
    probes agrees within `ap_tol`. `scores` are the kit's (computed when not given). Returns the number of
    identical rows and the mAP difference per variant."""
    n = len(ref)
    scores = kit_scores(x, how) if scores is None else scores
    equal = np.empty(n, dtype=bool)
    for a in range(0, n, 256):
        b = min(a + 256, n)
        k, v = np.asarray(kit[a:b]), np.asarray(ref[a:b])
        equal[a:b] = (k == v).all(axis=1)
        if not equal[a:b].all():
            bad = ~equal[a:b]
            assert (np.sort(v[bad], axis=1) == np.arange(v.shape[1])).all(), "reference row is not a permutation"
            in_ref_order = np.take_along_axis(scores[a:b][bad], v[bad], axis=1)
            worst = float(np.diff(in_ref_order, axis=1).max())
            assert worst <= atol, f"{how}: reference order breaks the kit's score order by {worst:.2e} > {atol}"
    if kit_lines is not None and ref_lines is not None:
        assert len(ref_lines) == n, f"{how}: reference CSV has {len(ref_lines)} lines for {n} probes"
        same_line = np.asarray(kit_lines[:n]) == np.asarray(ref_lines)
        wrong = np.flatnonzero(same_line != equal)
        assert not wrong.size, (f"{how}: CSV line {wrong[0]} is {'' if same_line[wrong[0]] else 'not '}byte-identical "
                                f"while the ranking rows are {'' if equal[wrong[0]] else 'not '}identical")
    diff = {ap: float(abs(kit_ap[ap][:n].mean() - ref_ap[ap].mean())) for ap in ref_ap}
    for ap, d in diff.items():
        assert d <= ap_tol, f"{how}: {ap} mAP differs by {d:.2e} > {ap_tol}"
    return int(equal.sum()), diff


def _run(isolate: bool, threads: int, *args) -> dict:
    """`measure` in a fresh spawned process whose BLAS uses `threads` threads (or here, as is, without isolate)."""
    if not isolate:
        return measure(*args)
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, str(threads)))  # read by the child's numpy at import
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            return ex.submit(measure, *args).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_scale(scale: int, hows: list[str], threads: int, naive_probes: int | None, repeats: int = 1,
                isolate: bool = True, public_probes: int | None = 200) -> list[dict]:
    """Every path for each fusion at one scale, the references checked against the kit; one dict per fusion."""
    rows = []
    with tempfile.TemporaryDirectory() as save:
        res = {(path, how): _run(isolate, threads, scale, path, how, naive_probes, save, repeats, public_probes)
               for how in hows for path in PATHS}
        x = scaled_inputs(scale)
        for how in hows:
            load = {p: (np.load(Path(save) / f"{p}_{how}_ranking.npy", mmap_mode="r"),
                        dict(np.load(Path(save) / f"{p}_{how}_ap.npz")),
                        np.load(Path(save) / f"{p}_{how}_lines.npy")) for p in PATHS}
            row = dict(scale=scale, how=how, kit=res["kit", how],
                       kit_map={ap: float(v.mean()) for ap, v in load["kit"][1].items()})
            scores = kit_scores(x, how)
            for ref in REFERENCES:
                same, diff = check_agreement(x, how, load["kit"][0], load[ref][0], load["kit"][1], load[ref][1],
                                             load["kit"][2], load[ref][2], scores=scores)
                m = res[ref, how]
                factor = x.n_probes / m["n_timed"]  # the loop and its CSV (hence the zip) grow with probes
                m["wall_est"] = m["wall"] * factor
                m["times"] = {k: v * factor for k, v in m["times"].items()}
                row[ref] = m
                row[f"{ref}_check"] = dict(same=same, diff=diff, extrapolated=m["n_timed"] < x.n_probes,
                                           ratio=m["wall_est"] / row["kit"]["wall"])
            del scores
            rows.append(row)
    return rows


def print_table(rows: list[dict], threads: int) -> list[str]:
    """Print one line per path and the verdict per target; returns the verdict lines."""
    print(f"BLAS threads={threads}; stage columns: seconds; write: CSV + zip; kit: rank, write and evaluate in one "
          "blockwise pass, under rank; total: wall (fastest run); peak: "
          f"{rows[0]['kit']['method']}, one fresh process per path; +MiB: peak minus RSS at start (interpreter, "
          "numpy, inputs); kit: make_submission.py's path; naive: a numpy per-probe loop; public: the 2021 "
          "winner's loop")
    print(f"{'scale':>5} {'fusion':>7} {'path':>6} " + " ".join(f"{s:>9}" for s in STAGES)
          + f" {'total s':>8} {'peak MiB':>9} {'+MiB':>6} {'ref/kit':>8}")
    for r in rows:
        for path in PATHS:
            m = r[path]
            stages = " ".join(f"{m['times'].get(s, 0):9.3f}" for s in STAGES)
            line = (f"{r['scale']:>4}x {r['how']:>7} {path:>6} {stages} "
                    f"{m.get('wall_est', m['wall']):8.2f} {m['peak_mib']:9.0f} {m['peak_mib'] - m['base_mib']:6.0f}")
            if path in REFERENCES:
                c = r[f"{path}_check"]
                line += f" {c['ratio']:7.1f}x"
                if c["extrapolated"]:
                    line += f"  (EXTRAPOLATED from {m['n_timed']} probes; peak measured on those)"
            print(line)
        for ref in REFERENCES:
            c = r[f"{ref}_check"]
            print(f"      {ref} agrees: {c['same']}/{r[ref]['n_timed']} rows identical, CSV lines byte-identical "
                  f"on those, the rest differ only within 1e-5 score ties; |kit - {ref}| mAP "
                  f"{max(c['diff'].values()):.1e}")
        print(f"      mAP kit {r['kit_map']['standard']:.4f} std / {r['kit_map']['trapezoid']:.4f} trap; CSV "
              f"{r['kit']['csv_mb']:.1f} MB")
    verdicts = []
    for r in rows:
        tag = f"{r['scale']}x {r['how']}"
        for ref in REFERENCES:
            c = r[f"{ref}_check"]
            verdicts.append(f"{tag}: {ref}/kit {c['ratio']:.1f}x >= {TARGET_RATIO:.0f}x: "
                            f"{'met' if c['ratio'] >= TARGET_RATIO else 'MISSED'}")
        if r["scale"] >= 10:
            k = r["kit"]
            verdicts.append(f"{tag}: kit {k['wall']:.2f} s <= {TARGET_S:.0f} s: "
                            f"{'met' if k['wall'] <= TARGET_S else 'MISSED'}; peak {k['peak_mib'] / 1024:.2f} GiB "
                            f"<= {TARGET_GIB:.0f} GiB: {'met' if k['peak_mib'] <= TARGET_GIB * 1024 else 'MISSED'}")
    print("\n".join(verdicts))
    return verdicts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, nargs="+", default=[1, 10], help="multiples of the test scale")
    p.add_argument("--fusion", nargs="+", default=list(FUSIONS), choices=FUSIONS,
                   help="meanemb: cosine of the mean embedding; max: max of the per-image cosines")
    p.add_argument("--threads", type=int, default=2,
                   help="BLAS threads of every path (OMP/OPENBLAS/MKL_NUM_THREADS of its fresh process)")
    p.add_argument("--naive-probes", type=int, default=None,
                   help="time only this many probes of the naive loop and extrapolate linearly (printed as such)")
    p.add_argument("--public-probes", type=int, default=200,
                   help="above 1x, time this many probes of the public loop and extrapolate (printed as such)")
    p.add_argument("--repeats", type=int, default=3, help="runs per path, fastest kept (loops: once if over 20 s)")
    args = p.parse_args(argv)
    rows = [r for s in args.scale for r in bench_scale(s, args.fusion, args.threads, args.naive_probes, args.repeats,
                                                       public_probes=args.public_probes)]
    print_table(rows, args.threads)


if __name__ == "__main__":
    main()
