"""Train every variant an experiment file lists: ``python -m kinret.grid -C <experiment> [--jobs N]``.

The experiment's ``GRID = {"backbone": [...], "loss": [...], "combination": [...], "fold": [...]}`` is expanded
as a product (a list of such dicts: the union of their products); each variant trains into
``runs/{data set}/{experiment}/{variant}/fold{k}/`` (the data set's runs folder, `kinret.data.workspace`, or
``--set out_root=DIR``; the variant named by its grid values, e.g. ``bce-comb1``; an experiment without a GRID
trains ``{experiment}/fold{k}/``, the folder ``python -m kinret.train -C`` uses). Finished
runs are skipped, interrupted ones resumed (with the thread count they started with), stale ones (their training data
changed) trained again; runs go to joblib worker processes with the cores shared between them (`--jobs 0`: head-only
runs two at a time, end-to-end runs one at a time with every core unless they are large, see `schedule`), and the
workers end with the grid's process, killed or not. Head-only variants of one backbone share one feature cache,
built once before the parallel part so that workers never race to compute it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from kinret.cli import parser, run_command
from kinret.errors import KinretInputError
from kinret.io import DiskFullError, write_text_atomic
from kinret.log import progress
from kinret.models.config import TrainConfig, apply_overrides, config_from_dict
from kinret.readback import DamagedFile
from kinret.train.checkpointing import read_state
from kinret.train.experiments import Run, check_weights, expand, load_experiment, own_runs_folder
from kinret.train.runs import clear_stale, run_states, stale_note

log = logging.getLogger("kinret.grid")
_WATCHED: list[int] = []  # the parent a watch thread follows (platforms without PR_SET_PDEATHSIG)


def train_in_process(cfg: dict, fold: int, quiet: bool, verbose: bool) -> int:
    """Train one run from its serialised config with the CLI's logging and exit-code rule (0, 2 on bad input): what
    a grid worker runs, and the grid's own process for the runs it trains itself."""
    from kinret.train.fit import train_run  # imported in the worker process

    def body() -> None:
        train_run(config_from_dict(cfg), fold, resume=True)

    # Ctrl-C and a full disk end the whole grid, reported once by the command that runs it
    return run_command(body, argparse.Namespace(quiet=quiet, verbose=verbose),
                       propagate=(KeyboardInterrupt, DiskFullError))


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


def _in_worker(i: int, cfg: dict, fold: int, parent: int) -> tuple[int, int]:
    end_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the grid's process stops us
    return i, train_in_process(cfg, fold, quiet=True, verbose=False)


def _train_rest(rest: list[Run], jobs: int, cores: int, quiet: bool, verbose: bool) -> dict[int, int]:
    """Exit code of every run in `rest` (by position): `jobs` worker processes sharing the cores (progress over
    finished runs shown here; a worker's own lines would interleave, so it is quiet), or one after another in this
    process."""
    if jobs > 1 and len(rest) > 1:
        from joblib import Parallel, delayed, parallel_config

        threads = max(1, cores // jobs)
        with parallel_config(backend="loky", idle_worker_timeout=WORKER_IDLE_SECONDS):
            work = Parallel(n_jobs=jobs, return_as="generator_unordered")(
                delayed(_in_worker)(i, replace(r.cfg, threads=threads).to_dict(), r.fold, os.getpid())
                for i, r in enumerate(rest))
            return dict(progress(work, desc=f"grid ({jobs} processes)", total=len(rest), unit="run"))
    return {i: train_in_process(replace(r.cfg, threads=cores).to_dict(), r.fold, quiet, verbose)
            for i, r in progress(list(enumerate(rest)), desc="grid", unit="run")}


# A worker idle this long ends by itself: kept, each would hold its memory through the stages after training (2.1 GB
# of the process tree during scoring at ten times the test split); joblib's default keeps it 300 s.
WORKER_IDLE_SECONDS = 5


def default_jobs() -> int:
    """Worker processes for head-only runs when none are asked for: two, or one on a single core."""
    return max(1, min(2, os.cpu_count() or 1))


# End-to-end runs whose epochs see at least this many training images share the cores as one-thread workers after
# the runs that do not divide evenly among them; smaller ones train one at a time with every core (the measurements
# behind it: docs/decisions.md, "large end-to-end runs split between the process and workers").
LARGE_RUN_IMAGES = 4000


def epoch_images(run: Run, layouts: dict | None = None) -> int:
    """Training images a run's epochs see: its fold's training families' images times its epochs (read from its
    data folder; `layouts` memoises the folders read)."""
    from kinret.data.layout import DataLayout

    layouts = {} if layouts is None else layouts
    root = run.cfg.data_root
    if root not in layouts:
        layouts[root] = DataLayout.of(root)
    families = layouts[root].fold_families(run.cfg.n_folds, run.cfg.fold_seed, run.fold)[0]
    return sum(f.n_images for f in families) * run.cfg.epochs


def trains_backbone(run: Run) -> bool:
    """Whether a run trains (part of) its network rather than a head on cached features: its feed says."""
    from kinret.features.feeds import feed_class  # torch: imported when there is work

    return feed_class(run.cfg).trains_backbone


@dataclass(frozen=True)
class Slot:
    """Runs that `train_grid` trains together: their positions in the grid, the processes they share (1: one after
    another in this process with every core), what they are and how they train, in words."""

    positions: list[int]
    processes: int
    kind: str
    words: str


def schedule(runs: Sequence[Run], jobs: int | None) -> list[Slot]:
    """How `train_grid` spreads `runs`, in the order they train. An explicit `jobs` puts every run in `jobs`
    processes; `jobs` None or 0 puts head-only runs in `default_jobs()` processes (their fixed costs, start-up and
    evaluation, overlap), and runs that train their network one after another in this process, except large ones
    (`LARGE_RUN_IMAGES`): the remainder of their count by the worker count here first, the rest in the workers."""
    cores = os.cpu_count() or 1
    if jobs:
        return [Slot(list(range(len(runs))), jobs, "", f"{jobs} at a time")]
    e2e = [i for i, r in enumerate(runs) if trains_backbone(r)]
    heads = [i for i in range(len(runs)) if i not in e2e]
    workers = default_jobs()
    slots = [Slot(heads, workers, "head-only", f"{workers} at a time" if workers > 1 else
                  f"one at a time with {cores} core(s)")] if heads else []
    large = workers > 1 and len(e2e) >= workers and all(epoch_images(runs[i], {}) >= LARGE_RUN_IMAGES for i in e2e)
    if large:
        alone = len(e2e) % workers
        if alone:
            slots.append(Slot(e2e[:alone], 1, "end to end", f"{alone} alone with {cores} core(s)"))
        return slots + [Slot(e2e[alone:], workers, "end to end", f"{workers} at a time")]
    return slots + ([Slot(e2e, 1, "end to end", f"one at a time with {cores} core(s)")] if e2e else [])


def plan_text(runs: Sequence[Run], jobs: int | None) -> str:
    """How `train_grid` spreads `runs` over processes, in words: "2 at a time", "one at a time with 2 core(s)",
    "head-only 2 at a time, end to end 1 alone with 2 core(s), then 2 at a time"."""
    by_kind: dict[str, list[str]] = {}
    for slot in schedule(runs, jobs):
        by_kind.setdefault(slot.kind, []).append(slot.words)
    if len(by_kind) == 1:
        return ", then ".join(next(iter(by_kind.values())))
    return ", ".join(f"{kind} {', then '.join(texts)}" for kind, texts in by_kind.items())


def train_grid(runs: Sequence[Run], jobs: int | None = None, quiet: bool = False, verbose: bool = False
               ) -> dict[int, int]:
    """Train `runs` (none of them finished) and return each one's exit code by position (0, or 2 on bad input).
    The frozen feature cache each head-only backbone's runs share is built (or found) first, here, with every core;
    then the runs train as `schedule` says."""
    cores = os.cpu_count() or 1
    shared: dict[tuple, Run] = {}
    for r in runs:
        if not trains_backbone(r):
            shared.setdefault((r.cfg.features_key, r.cfg.data_root), r)
    for r in shared.values():
        _shared_features(r, cores)
    codes: dict[int, int] = {}
    for slot in schedule(runs, jobs):
        done = _train_rest([runs[i] for i in slot.positions], slot.processes, cores, quiet, verbose)
        codes.update({slot.positions[j]: code for j, code in done.items()})
    return codes


def _shared_features(run: Run, cores: int) -> None:
    from kinret.dist import resolve_device
    from kinret.train.inputs import shared_features  # torch and the backbones: imported when there is work

    before = torch_threads(cores)
    try:
        shared_features(replace(run.cfg, threads=cores), run.fold, resolve_device(run.cfg.device))
    finally:
        torch_threads(before)


def torch_threads(n: int) -> int:
    """Set torch's thread count to `n` and return the one it had."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def write_grid_summary(cfg: TrainConfig, runs: Sequence[Run]) -> str:
    """`grid_summary.csv` of an experiment (the last epoch of each of its runs), written and returned."""
    table = summary_table(runs).to_csv(index=False, float_format="%.4f", na_rep="nan", lineterminator="\n")
    write_text_atomic(Path(cfg.out_root) / cfg.name / "grid_summary.csv", table)
    return table


def train_experiment(cfg: TrainConfig, runs: Sequence[Run], folds: Sequence[int] | None = None, jobs: int | None = 1,
                     quiet: bool = False, verbose: bool = False, dry_run: bool = False, announce_stale: bool = True
                     ) -> dict[Path, int]:
    """Train an experiment's unfinished runs (`cfg` is the experiment's config, `runs` its grid; only `folds` when
    given): print each run's state, say once what changed for the stale ones (unless the caller said it:
    `announce_stale` False), refuse folders that hold another config, train, write grid_summary.csv.
    Returns the exit code of every run that failed (2: bad input), by run folder."""
    chosen = [r for r in runs if folds is None or r.fold in folds]
    if not chosen:
        raise KinretInputError(None, f"no run of {cfg.name} has fold {list(folds or [])} (its folds: "
                                     f"{sorted({r.fold for r in runs})})")
    found = run_states(chosen)
    for r, (state, _) in zip(chosen, found, strict=True):
        print(f"{state:>8}  {r.run_dir}")
    note = stale_note(chosen, found, dry_run)
    if note and announce_stale:
        log.warning("%s", note)
    conflicts = [detail for state, detail in found if state == "conflict"]
    if conflicts:
        raise KinretInputError(None, f"{len(conflicts)} run folder(s) hold another config, e.g. {conflicts[0]}")
    todo = [r for r, (state, _) in zip(chosen, found, strict=True) if state != "finished"]
    print(f"{len(chosen)} runs: {len(chosen) - len(todo)} finished, {len(todo)} to train")
    if dry_run or not todo:
        return {}
    for r, (state, _) in zip(chosen, found, strict=True):
        if state == "stale":  # said above, once for all of them: its run starts fresh without a second warning
            clear_stale(r.cfg, r.fold)
    codes = train_grid(todo, jobs, quiet, verbose)
    print(write_grid_summary(cfg, runs), end="")
    failed = {todo[i].run_dir: code for i, code in sorted(codes.items()) if code != 0}
    if failed:
        log.error("%d run(s) failed: %s", len(failed), ", ".join(map(str, failed)))
    return failed


def summary_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The last epoch of each run that has one: the grid's results at a glance."""
    cols = ["average", "mAP", "rank5", "pair_auc_cos", "pair_auc_fc"]
    rows = []
    for cfg, fold, _ in runs:
        try:
            last = (read_state(cfg.run_dir(fold)) or {}).get("last")
        except DamagedFile:  # a run's status check writes it again from the checkpoint
            last = None
        if last:
            rows.append({"variant": cfg.name, "fold": fold, "epochs": last["epoch"]} | {k: last[k] for k in cols})
    return pd.DataFrame(rows, columns=["variant", "fold", "epochs", *cols])


def build_parser() -> argparse.ArgumentParser:
    p = parser("python -m kinret.grid", __doc__)
    p.add_argument("-C", "--config", required=True, help="experiment name or .py file defining cfg and GRID")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--jobs", type=int, default=1,
                   help="parallel training processes (0: head-only runs 2 at a time, end-to-end runs one at a time "
                        "with every core, as make_submission.py does)")
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
    cfg = own_runs_folder(cfg, args.set)
    for run_cfg in dict.fromkeys(r.cfg for r in expand(cfg, grid)):
        check_weights(run_cfg)
    failed = train_experiment(cfg, expand(cfg, grid), args.folds, args.jobs or None, args.quiet, args.verbose,
                              args.dry_run)
    return 1 if failed else 0
