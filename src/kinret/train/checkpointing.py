"""A run's files in ``runs/{experiment}/fold{k}/``: ``checkpoint.pt`` (weights, optimizer and progress, enough to
resume or to score the run), ``summary.csv`` (one row per finished epoch, columns `SUMMARY_FIELDS`) and
``state.json`` (how far the run got). Each is written to a temporary name and renamed, so a run killed mid-write
leaves the previous complete file, never half of one.

The checkpoint is an epoch's one commit point: it holds the summary rows, and `summary.csv` and `state.json` are
derived from it (`write_derived`), after it; a run killed between the writes has derived files that lag behind
its checkpoint, which `kinret.train.runs.run_status` reports as partial and a resume rewrites.

Each is checked as it is read (`kinret.readback`): a damaged state or summary is rewritten from the checkpoint (one
warning); a damaged checkpoint raises `DamagedFile`, which `kinret.train.runs.run_status` turns into retraining."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from kinret.io import atomic_path, write_text_atomic
from kinret.readback import DamagedFile, read_json, read_table, read_torch, rebuilt

SUMMARY_FIELDS = ("epoch", "lr", "train_loss", "images_per_s", "seconds", "pair_auc_cos", "pair_auc_fc", "mAP",
                  "rank1", "rank5", "average")
CHECKPOINT_KEYS = ("model", "epoch", "step", "rows", "config", "fold", "data_config")  # what every checkpoint holds
STATE_KEYS = ("epoch", "epochs", "finished")


def save_checkpoint(run_dir: Path, ckpt: dict) -> None:
    """`ckpt` as ``run_dir/checkpoint.pt``, written whole or not at all; through a file object, so the archive's
    records are named "archive/..." and not after the temporary file (equal contents, equal bytes)."""
    with atomic_path(Path(run_dir) / "checkpoint.pt", suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(run_dir: Path, device: str | torch.device = "cpu", mmap: bool = False, verify: bool = False
                    ) -> dict:
    """The run's checkpoint, checked (`DamagedFile` when it is not one); with `mmap` its tensors are not read, with
    `verify` the checksum of every record is checked (`kinret.readback.read_torch`)."""
    return read_torch(Path(run_dir) / "checkpoint.pt", CHECKPOINT_KEYS, mmap=mmap, map_location=device, verify=verify)


def write_summary(run_dir: Path, rows: Sequence[dict]) -> None:
    """One line per epoch row; NaN (no held-out families, or no FC score) is written "nan", as a reader expects."""
    frame = pd.DataFrame(list(rows), columns=list(SUMMARY_FIELDS))
    write_text_atomic(Path(run_dir) / "summary.csv", frame.to_csv(index=False, lineterminator="\n", na_rep="nan"))


def read_summary(run_dir: Path) -> pd.DataFrame:
    """The run's summary.csv, checked: the columns `SUMMARY_FIELDS`, every line complete, numbers (`DamagedFile`)."""
    return read_table(Path(run_dir) / "summary.csv", SUMMARY_FIELDS, numeric=True)


def _checkpoint_stamp(run_dir: Path) -> list[int] | None:
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def write_state(run_dir: Path, epoch: int, epochs: int, rows: Sequence[dict]) -> None:
    """The run's progress; `finished` is what decides that a later command has nothing left to train. It names the
    checkpoint it was derived from (size, mtime), written just before it."""
    state = {"epoch": epoch, "epochs": epochs, "finished": epoch >= epochs, "last": rows[-1] if rows else None,
             "checkpoint": _checkpoint_stamp(run_dir)}
    write_text_atomic(Path(run_dir) / "state.json", json.dumps(state, indent=2) + "\n")


def read_state(run_dir: Path) -> dict | None:
    """The run's state.json (None when there is none), checked: an object with `STATE_KEYS` (`DamagedFile`)."""
    path = Path(run_dir) / "state.json"
    if not path.is_file():
        return None
    state = read_json(path, dict, STATE_KEYS)
    if not isinstance(state["epoch"], int) or not isinstance(state["finished"], bool):
        raise DamagedFile(path, f"epoch {state['epoch']!r} and finished {state['finished']!r} are not an epoch and "
                                "a yes or no")
    return state


def checkpoint_progress(run_dir: Path) -> tuple[int, int]:
    """(epochs done, epochs planned) as the checkpoint records them; memory-mapped, so its tensors are not read."""
    ckpt = load_checkpoint(run_dir, mmap=True)
    return int(ckpt["epoch"]), int(ckpt["config"]["epochs"])


def _check_summary(run_dir: Path, state: dict) -> None:
    """`DamagedFile` unless the summary is whole and ends at the state's epoch."""
    epochs = read_summary(run_dir)["epoch"]
    if len(epochs) and epochs.iloc[-1] != state["epoch"]:
        raise DamagedFile(Path(run_dir) / "summary.csv", f"its last epoch is {epochs.iloc[-1]:g}, state.json says "
                                                         f"{state['epoch']}")


def _rewrite_derived(run_dir: Path, damage: DamagedFile) -> dict | None:
    """Summary and state written again from the checkpoint, after a warning naming the damaged one."""
    ckpt = load_checkpoint(run_dir, mmap=True)
    rebuilt(damage, "written again from the run's checkpoint")
    write_derived(run_dir, ckpt["rows"], int(ckpt["epoch"]), int(ckpt["config"]["epochs"]))
    return read_state(run_dir)


def derived_state(run_dir: Path) -> dict | None:
    """The run's state when it and the summary describe the checkpoint beside them, else None (a run killed after
    its checkpoint's rename and before its state's). A state naming another checkpoint file (a copied folder has
    new times) is checked against the epoch the checkpoint itself records. A damaged state or summary is written
    again from the checkpoint (one warning); a damaged checkpoint raises `DamagedFile`."""
    try:
        state = read_state(run_dir)
        if state is None or not (Path(run_dir) / "summary.csv").is_file():
            return None
        if state.get("checkpoint") != _checkpoint_stamp(run_dir) and state["epoch"] != checkpoint_progress(run_dir)[0]:
            return None  # it lags behind its checkpoint (and so may its summary): a resume rewrites both
        _check_summary(run_dir, state)
        return state
    except DamagedFile as exc:
        if Path(exc.path).name == "checkpoint.pt":
            raise
        return _rewrite_derived(run_dir, exc)


def write_derived(run_dir: Path, rows: Sequence[dict], epoch: int, epochs: int) -> None:
    """Summary, then state, from what the checkpoint holds: a state that says finished has its summary beside it."""
    write_summary(run_dir, rows)
    write_state(run_dir, epoch, epochs, rows)


def save_run(run_dir: Path, ckpt: dict, rows: Sequence[dict], epoch: int, epochs: int) -> None:
    """Checkpoint (the commit point), then the files derived from it."""
    save_checkpoint(run_dir, ckpt)
    write_derived(run_dir, rows, epoch, epochs)
