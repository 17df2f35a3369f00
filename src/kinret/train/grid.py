"""Train every variant an experiment file lists: ``python -m kinret.grid -C <experiment> [--jobs N]``.

The experiment's ``GRID = {"backbone": [...], "loss": [...], "combination": [...], "fold": [...]}`` is expanded
as a product (a list of such dicts: the union of their products); each variant trains into
``runs/{experiment}/{variant}/fold{k}/`` (the variant named by its grid values, e.g. ``bce-comb1``; an experiment
without a GRID trains ``runs/{experiment}/fold{k}/``, the folder ``python -m kinret.train -C`` uses). Finished
runs are skipped, interrupted ones resumed (with the thread count they started with), stale ones (their training data
changed) trained again; runs go to joblib worker processes with the cores shared between them, and the workers end
with the grid's process, killed or not. Head-only variants of one backbone share one feature cache, built once
before the parallel part so that workers never race to compute it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kinret.cli import parser, run_command
from kinret.errors import KinretInputError
from kinret.io import write_text_atomic
from kinret.log import progress
from kinret.models.config import TrainConfig, apply_overrides
from kinret.train.experiments import expand, load_experiment
from kinret.train.runs import run_status

log = logging.getLogger("kinret.grid")
_WATCHED: list[int] = []  # the parent a watch thread follows (platforms without PR_SET_PDEATHSIG)


def _train(argv: list[str]) -> int:
    from kinret.train.cli import main  # imported in the worker process

    return main(argv)


def end_with_parent(parent: int) -> None:
    """Make this worker process end when `parent` (the grid's process) does, even by kill -9: on Linux the kernel
    sends it SIGKILL (prctl PR_SET_PDEATHSIG), elsewhere a daemon thread watches the parent's pid."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    elif not _WATCHED:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
        _WATCHED.append(parent)
    if os.getppid() != parent:  # the parent died before this process asked to follow it
        os._exit(1)


def _train_in_worker(argv: list[str], parent: int) -> int:
    end_with_parent(parent)
    return _train(argv)


def _indexed(i: int, argv: list[str], parent: int) -> tuple[int, int]:
    return i, _train_in_worker(argv, parent)


def _train_rest(rest: list[int], argv, jobs: int, cores: int) -> dict[int, int]:
    """Exit code of every run in `rest`: `jobs` worker processes sharing the cores (progress over finished runs shown
    here), or one after another in this process."""
    if jobs > 1 and len(rest) > 1:
        from joblib import Parallel, delayed

        threads = max(1, cores // jobs)
        work = Parallel(n_jobs=jobs, return_as="generator_unordered")(
            delayed(_indexed)(i, argv(i, threads, worker=True), os.getpid()) for i in rest)
        return dict(progress(work, desc=f"grid ({jobs} processes)", total=len(rest), unit="run"))
    return {i: _train(argv(i, cores)) for i in progress(rest, desc="grid", unit="run")}


def summary_table(jobs: list[tuple[TrainConfig, int, list[str]]]) -> pd.DataFrame:
    """The last epoch of each run that has one: the grid's results at a glance."""
    cols = ["average", "mAP", "rank5", "pair_auc_cos", "pair_auc_fc"]
    rows = []
    for cfg, fold, _ in jobs:
        state = cfg.run_dir(fold) / "state.json"
        last = json.loads(state.read_text())["last"] if state.is_file() else None
        if last:
            rows.append({"variant": cfg.name, "fold": fold, "epochs": last["epoch"]} | {k: last[k] for k in cols})
    return pd.DataFrame(rows, columns=["variant", "fold", "epochs", *cols])


def build_parser() -> argparse.ArgumentParser:
    p = parser("python -m kinret.grid", __doc__)
    p.add_argument("-C", "--config", required=True, help="experiment name or .py file defining cfg and GRID")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--jobs", type=int, default=1, help="parallel training processes")
    p.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                   help="only these folds of every variant (default: the grid's folds)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), args)


def run(args: argparse.Namespace) -> int:
    cfg, grid = load_experiment(args.config)
    cfg = apply_overrides(cfg, args.set)
    all_jobs = expand(cfg, grid)
    jobs = [j for j in all_jobs if args.folds is None or j[1] in args.folds]
    if not jobs:
        raise KinretInputError(None, f"no run of {args.config} has fold {args.folds} (its folds: "
                                     f"{sorted({f for _, f, _ in all_jobs})})")
    fingerprints: dict = {}  # one walk of the data for the whole sweep
    found = [run_status(c, f, fingerprints) for c, f, _ in jobs]
    states = [s for s, _ in found]
    for (c, f, _), s in zip(jobs, states, strict=True):
        print(f"{s:>8}  {c.run_dir(f)}")
    for s, detail in found:
        if s == "stale":
            log.warning("%s; it will be trained again from the start", detail)
    conflicts = [detail for s, detail in found if s == "conflict"]
    if conflicts:
        raise KinretInputError(None, f"{len(conflicts)} run folder(s) hold another config, e.g. {conflicts[0]}")
    todo = [(c, f, sets) for (c, f, sets), s in zip(jobs, states, strict=True) if s != "finished"]
    print(f"{len(jobs)} runs: {len(jobs) - len(todo)} finished, {len(todo)} to train")
    if args.dry_run or not todo:
        return 0
    cores = os.cpu_count() or 1
    passed = (["--quiet"] if args.quiet else []) + (["--verbose"] if args.verbose else [])

    def argv(i: int, threads: int, worker: bool = False) -> list[str]:
        _, fold, sets = todo[i]
        overrides = [*args.set, *sets, f"threads={threads}"]
        # a worker's own bars would interleave: it is quiet, and this process shows the grid's progress instead
        return ["-C", args.config, "--fold", str(fold), "--resume", *(["--quiet"] if worker else passed),
                *itertools.chain.from_iterable(("--set", s) for s in overrides)]

    # the first head-only run of each backbone builds the shared feature cache, with every core, before the
    # parallel part; it runs in this process with this process's own verbosity
    first: dict[tuple, int] = {}
    for i, (c, _, _) in enumerate(todo):
        if c.mode == "head":
            first.setdefault((c.backbone, c.weights, c.pretrained, c.input_size, c.gem_p, c.data_root), i)
    codes = {i: _train(argv(i, cores)) for i in first.values()}
    rest = [i for i in range(len(todo)) if i not in codes]
    codes.update(_train_rest(rest, argv, args.jobs, cores))
    failed = [todo[i][0].run_dir(todo[i][1]) for i, code in codes.items() if code != 0]
    table = summary_table(all_jobs).to_csv(index=False, float_format="%.4f", na_rep="nan", lineterminator="\n")
    write_text_atomic(Path(cfg.out_root) / cfg.name / "grid_summary.csv", table)
    print(table, end="")
    if failed:
        log.error("%d run(s) failed: %s", len(failed), ", ".join(map(str, failed)))
        return 1
    return 0
