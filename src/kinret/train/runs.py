"""Run folders (``runs/{data set}/{experiment}/fold{k}/``): what state a run is in, and the refusal to overwrite another
config's trained weights.

A run is its config (less how and where it runs) and the content of its training data: ``data.json`` records the
families and the SHA-1 of every image it was trained on, so a run whose data changed is 'stale' and trained again,
while a relative and an absolute path to the same data are the same run. Its checkpoint is the commit point of an
epoch: ``state.json`` and ``summary.csv`` are derived from it, and a run whose derived files lag behind its
checkpoint (killed between the writes) is 'partial' until a resume rewrites them.

Each file is checked as it is read (`kinret.readback`): a damaged checkpoint is deleted and its run trained again
from the start; a damaged config.json, state.json or summary.csv is written again from the checkpoint; a damaged
data.json stops the run (the record of what the run was trained on cannot be rebuilt without training it again).
Each repair is one warning naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from kinret.data import Fit
from kinret.data.layout import DataLayout
from kinret.data.pixels import content_hashes
from kinret.errors import KinretInputError
from kinret.io import write_text_atomic
from kinret.models.checkpoint import saved_config
from kinret.models.config import TrainConfig, config_from_dict
from kinret.readback import DamagedFile, read_json, rebuilt
from kinret.train.checkpointing import derived_state, load_checkpoint, read_state
from kinret.train.experiments import Run

log = logging.getLogger("kinret.train")
RUNTIME_FIELDS = {"threads", "device", "eval_batch_size"}  # how a run executes, not what it computes
_CHECKED: dict[tuple[str, int, int], dict] = {}  # checkpoints found whole: (path, size, mtime) -> fold and config
PLACE_FIELDS = {"data_root", "out_root"}  # where its data and outputs are: the data is known by its content
HOW_TO_PROCEED = ("to keep it, train this config under another experiment name (a new experiment file, or --set "
                  "name=NEW with python -m kinret.train / kinret.grid) or into another runs folder "
                  "(make_submission.py --runs DIR, or --set out_root=DIR); to replace it, delete {run_dir} "
                  "(python -m kinret.train ... --restart does that)")


def data_fingerprint(cfg: TrainConfig, fold: int) -> dict | None:
    """The families a run reads (DATA/train; with --fold -1 also DATA/val and its lists) and the SHA-1 of each of
    their images, by path relative to the data root. None when DATA/train does not exist (nothing to compare)."""
    root = Path(cfg.data_root)
    layout = DataLayout.of(root) if root.is_dir() else None
    if layout is None or layout.train is None:
        return None
    families, names = layout.training_files(with_val=Fit.of(fold).reads_val)
    prefix = f"{root}{os.sep}"
    hashes = content_hashes([prefix + n for n in names])
    return {"families": sorted(families), "files": dict(zip(names, hashes, strict=True))}


def _count(n: int, noun: str, plural: str) -> str:
    return f"{n} {noun if n == 1 else plural}"


def describe_change(saved: dict, now: dict) -> str:
    """'' when the fingerprints match, else what changed: families added or removed, images and lists changed."""
    if saved == now:
        return ""
    parts = []
    for names, verb in ((sorted(set(now["families"]) - set(saved["families"])), "added"),
                        (sorted(set(saved["families"]) - set(now["families"])), "removed")):
        if names:
            more = ", ..." if len(names) > 4 else ""
            parts.append(f"{_count(len(names), 'family', 'families')} {verb} ({', '.join(names[:4])}{more})")
    old, new = saved["files"], now["files"]
    lists = sorted(k for k in old.keys() | new.keys() if k.endswith(".csv") and old.get(k) != new.get(k))
    old, new = ({k: v for k, v in d.items() if not k.endswith(".csv")} for d in (old, new))
    for n, verb in ((sum(old[k] != v for k, v in new.items() if k in old), "changed"),
                    (len(new.keys() - old.keys()), "added"), (len(old.keys() - new.keys()), "removed")):
        if n:
            parts.append(f"{_count(n, 'image', 'images')} {verb}")
    return ", ".join(parts + [f"{k} changed" for k in lists])


def data_change(cfg: TrainConfig, fold: int, fingerprints: dict | None = None) -> str:
    """Why the run folder's recorded training data is not the data now ('' when it is, or cannot be checked).
    `fingerprints` shares the data's fingerprint between the runs of one status sweep."""
    memo = {} if fingerprints is None else fingerprints
    key = (str(Path(cfg.data_root).resolve()), Fit.of(fold).reads_val)
    if key not in memo:
        memo[key] = data_fingerprint(cfg, fold)
    now = memo[key]
    if now is None:
        return ""  # no data to compare against: training or scoring will say so
    path = cfg.run_dir(fold) / "data.json"
    if not path.is_file():
        return "it has no record of the data it was trained on (no data.json: trained by an older kit)"
    try:
        saved = read_json(path, dict, ("families", "files"))
        if not isinstance(saved["families"], list) or not isinstance(saved["files"], dict):
            raise DamagedFile(path, "its families are not a list or its files not a table of hashes")
    except DamagedFile as exc:
        raise exc.advise(f"it recorded the data this run was trained on, and without it the kit cannot tell whether "
                         f"the run fits the data now: delete {cfg.run_dir(fold)} to train it again (python -m "
                         "kinret.train ... --restart does that)") from None
    change = describe_change(saved, now)
    return f"the training data changed since it was trained: {change}" if change else ""


def save_data_fingerprint(cfg: TrainConfig, fold: int) -> None:
    fingerprint = data_fingerprint(cfg, fold)
    if fingerprint is not None:
        write_text_atomic(cfg.run_dir(fold) / "data.json", json.dumps(fingerprint, indent=0, sort_keys=True) + "\n")


def config_conflict(cfg: TrainConfig, run_dir: Path, ckpt: dict | None = None) -> str:
    """'' or why the run folder holds another config's run (and how to proceed): its config.json, or the config
    its checkpoint `ckpt` holds, differs from `cfg`."""
    now = cfg.to_dict()
    for where, found in (("config.json", saved_config(run_dir)), ("checkpoint.pt", ckpt and ckpt["config"])):
        if found is None:
            continue
        diff = [f"{k} {v!r} saved, {now[k]!r} now" for k, v in config_from_dict(found).to_dict().items()
                if v != now[k] and k not in RUNTIME_FIELDS | PLACE_FIELDS]
        if diff:
            return (f"{run_dir} holds a run of another config (its {where}: {'; '.join(diff)}): "
                    + HOW_TO_PROCEED.format(run_dir=run_dir))
    return ""


def checked_checkpoint(run_dir: Path, fold: int) -> dict | None:
    """The run's checkpoint's fold and config (its metadata and checksums checked once per process while its size
    and mtime stay), or None after a damaged one (unreadable, garbled, or holding another fold) was deleted with a
    warning: its run is trained again from the start."""
    path = run_dir / "checkpoint.pt"
    try:
        st = path.stat()
        seen = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if seen not in _CHECKED:
            ckpt = load_checkpoint(run_dir, mmap=True, verify=True)
            _CHECKED[seen] = {"fold": ckpt["fold"], "config": ckpt["config"]}
        ckpt = _CHECKED[seen]
        if ckpt["fold"] != fold:
            raise DamagedFile(path, f"holds a checkpoint of fold {ckpt['fold']}, not of fold {fold}")
        return ckpt
    except FileNotFoundError:  # another process (torchrun's) found it damaged first
        return None
    except DamagedFile as exc:
        try:
            finished = bool((read_state(run_dir) or {}).get("finished"))
        except DamagedFile:
            finished = False
        rebuilt(exc, "deleted; this " + ("finished run is trained again from the start: its training is lost" if
                                         finished else "run is trained again from the start"))
        path.unlink(missing_ok=True)
        return None


def run_status(cfg: TrainConfig, fold: int, fingerprints: dict | None = None) -> tuple[str, str]:
    """('todo' | 'partial' | 'finished' | 'stale' | 'conflict', detail) for the run folder of (cfg, fold).

    'conflict': the folder holds trained weights of another config; nothing may overwrite them silently.
    'stale': it holds a run trained on other data (or on data it has no record of); it is trained again.
    'partial': unfinished, or finished but killed before its state was written; a resume completes it.
    A status sweep over many runs of one data folder passes one `fingerprints` dict to all its calls, so the data
    is walked and checked once (a data change after the sweep's first call is seen by the next sweep).
    """
    run_dir = cfg.run_dir(fold)
    if not (run_dir / "checkpoint.pt").is_file():
        return "todo", ""
    ckpt = checked_checkpoint(run_dir, fold)
    if ckpt is None:
        return "todo", ""
    conflict = config_conflict(cfg, run_dir, ckpt)
    if conflict:
        return "conflict", conflict
    change = data_change(cfg, fold, fingerprints)
    if change:
        return "stale", f"{run_dir}: {change}"
    state = derived_state(run_dir)
    if state is None:
        return "partial", f"{run_dir}: its state and summary lag behind its checkpoint: resume it"
    return ("finished", "") if state["finished"] else ("partial", "")


def run_states(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """`run_status` of every run, the data of each folder walked once for the whole sweep."""
    fingerprints: dict = {}
    return [run_status(r.cfg, r.fold, fingerprints) for r in runs]


def unfinished(runs: Sequence[Run]) -> list[tuple[Run, str]]:
    """The runs not finished, each with its state (todo, partial, stale or conflict): what is left to train."""
    return [(r, state) for r, (state, _) in zip(runs, run_states(runs), strict=True) if state != "finished"]


def stale_note(runs: Sequence[Run], found: Sequence[tuple[str, str]], dry_run: bool = False) -> str:
    """One line for every stale run of a sweep (`found`: their `run_states`), '' when none: how many, of which
    experiments, what changed (said once: every run of one data folder sees the same change) and what happens (or,
    on a dry run, would happen)."""
    stale = [(r, detail) for r, (state, detail) in zip(runs, found, strict=True) if state == "stale"]
    if not stale:
        return ""
    names = ", ".join(dict.fromkeys(r.cfg.name.split("/")[0] for r, _ in stale))
    change = stale[0][1].split(": ", 1)[-1]
    return (f"{_count(len(stale), 'run', 'runs')} of {names} ({stale[0][0].run_dir}{', ...' if len(stale) > 1 else ''})"
            f": {change}; {'they would be' if dry_run else 'they are'} trained again from the start")


def clear_stale(cfg: TrainConfig, fold: int) -> None:
    """Remove the outputs of a stale run (trained on other data), so that it trains again from the start."""
    shutil.rmtree(cfg.run_dir(fold), ignore_errors=True)


def prepare_run_dir(cfg: TrainConfig, fold: int, resume: bool, restart: bool) -> str:
    """'fresh', 'resume' or 'finished'; refuses to overwrite another run's outputs silently. A stale run (its data
    changed) is deleted and trained again from the start, never resumed on the new data."""
    run_dir = cfg.run_dir(fold)
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    status, detail = run_status(cfg, fold)
    if status == "conflict":
        raise KinretInputError(None, detail)
    if status == "stale":
        log.warning("%s; training it again from the start", detail)
        clear_stale(cfg, fold)
        status = "todo"
    if status == "partial" and not resume:
        raise KinretInputError(run_dir, "holds an unfinished run: pass --resume to continue it or --restart")
    if status == "todo":
        for name in ("state.json", "summary.csv", "data.json"):  # a run killed before its first checkpoint
            (run_dir / name).unlink(missing_ok=True)
    return {"todo": "fresh", "partial": "resume", "finished": "finished"}[status]


def fixed_runtime(cfg: TrainConfig, fold: int, status: str) -> TrainConfig:
    """The settings that change a run's numbers although they are not what it computes, fixed when it starts: a
    fresh run's thread count resolved (0: the count torch uses now) and saved in its config.json; a resumed run
    gets the thread count and eval batch size it started with, whatever the command line (or the grid's --jobs)
    says now, so it ends with the weights of an uninterrupted run."""
    saved = saved_config(cfg.run_dir(fold)) if status == "resume" else None
    if saved is not None:
        fixed = replace(cfg, threads=saved.get("threads", cfg.threads),
                        eval_batch_size=saved.get("eval_batch_size", cfg.eval_batch_size))
        if fixed != cfg:
            log.info("%s: resumed with the thread count %d and eval batch size %d it started with",
                     cfg.run_dir(fold), fixed.threads, fixed.eval_batch_size)
        cfg = fixed
    return cfg if cfg.threads else replace(cfg, threads=torch.get_num_threads())
