"""Score matrices read from the store when asked for, never all held: the chosen scores of each split (a single
variant's matrix, or the blend combined from its variants' matrices one at a time) and one variant's matrices on
the splits the choice is made on (what `kinret.ensemble.selection.select` takes).

On a split the choice is not made on, a blend is kept combined (`keep_blend`): one matrix, `{scores}/chosen/
{split}.npy`, in float16 where that ranks every probe's gallery as float32 does (what the submission reads), instead
of one matrix per blended variant; its key covers the blended variants' own keys, the weights and the
normalisation, so a changed choice or source is never read back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from kinret.ensemble.selection import Selection, combine
from kinret.io import write_text_atomic
from kinret.readback import DamagedFile, read_json, rebuilt
from kinret.scoring.ranking import float16_ranks_alike
from kinret.scoring.store import cached_scores, ids_path, save_scores, stored_key
from kinret.scoring.variants import SplitScores, group_key, score_path
from kinret.versions import code_version

CHOSEN_DIR = "chosen"
CHOICE_FILE = "choice.json"  # the last choice and the key of what it was made from


def matrix_keys(scores: SplitScores, variants: Sequence[str]) -> list[str] | None:
    """Each variant's name and the key its matrix on `scores`' split is stored under; None where an external matrix
    is among them (it has no key of its own)."""
    out = []
    for v in variants:
        group, kind = scores.where(v)
        if kind is None:
            return None
        out += [v, group_key(group, kind, scores.sd)]
    return out


def choice_key(scores: Mapping[str, SplitScores], chooser: Sequence[str], variants: Sequence[str],
               settings: Mapping[str, object]) -> str | None:
    """What a choice is made from: the code that makes it, the `settings` it is made with, the families of every
    split it is made on, and the key of every variant's matrix there; None where an external matrix is among them
    (no key of its own: chosen afresh)."""
    parts = [code_version("kinret.ensemble.selection", "kinret.ensemble.blend", "kinret.ensemble.bootstrap"),
             json.dumps(dict(settings), sort_keys=True, default=str)]
    for name in chooser:
        labels, keys = scores[name].sd.labels, matrix_keys(scores[name], variants)
        if keys is None:
            return None
        parts += [name, *map(str, labels.probe_fids), "|", *map(str, labels.gallery_fids), *keys]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_choice(scores_dir: Path, key: str | None) -> Selection | None:
    """The choice recorded under `key` (`write_choice`), or None: none recorded, another key, or a damaged record
    (named in one warning; the choice is made again and recorded)."""
    path = Path(scores_dir) / CHOICE_FILE
    if key is None or not path.is_file():
        return None
    try:
        data = read_json(path, dict, ("key", "selection"))
        if data["key"] != key:
            return None
        found = data["selection"]
        if not isinstance(found, dict) or set(found) != {f.name for f in fields(Selection)}:
            raise DamagedFile(path, "its selection is not a recorded choice")
        return Selection(**found)
    except DamagedFile as exc:
        rebuilt(exc, "the choice is made again")
        return None


def write_choice(scores_dir: Path, key: str | None, sel: Selection) -> None:
    """Record `sel` under `key`, so a rerun with the same matrices and settings reads the choice back."""
    if key is None:
        return
    write_text_atomic(Path(scores_dir) / CHOICE_FILE, json.dumps({"key": key, "selection": asdict(sel)}) + "\n")


def blend_store(scores: SplitScores, sel: Selection) -> tuple[Path, str] | None:
    """(where a blend's combined scores on `scores`' split are kept, their key); None for a single variant, or a
    blend with an external matrix among its variants (their matrices are kept instead)."""
    if len(sel.weights) < 2:
        return None
    keys = matrix_keys(scores, list(sel.weights))
    if keys is None:
        return None
    parts = [sel.normalisation, *keys, *(repr(float(w)) for w in sel.weights.values())]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return scores.scores_dir / CHOSEN_DIR / f"{scores.sd.name}.npy", key


def blend_kept(scores: SplitScores, sel: Selection) -> bool:
    """Whether the chosen blend is kept combined on `scores`' split under its current key."""
    found = blend_store(scores, sel)
    return found is not None and stored_key(found[0]) == found[1]


def _write_blend(path: Path, key: str, combined: np.ndarray, scores: SplitScores) -> None:
    sd = scores.sd
    half = float16_ranks_alike(combined)
    save_scores(path, combined, sd.probe_ids, sd.gallery_ids, key, np.float16 if half else np.float32)


def keep_blend(scores: SplitScores, sel: Selection) -> bool:
    """Keep the chosen blend of `scores`' split combined, and remove its variants' matrices there (their per-probe
    results stay); True when it is kept so (already, or now), False where `blend_store` keeps none."""
    found = blend_store(scores, sel)
    if found is None:
        return False
    path, key = found
    if stored_key(path) != key:
        _write_blend(path, key, combine(scores, sel), scores)
    for v in sel.weights:
        group, kind = scores.where(v)
        matrix = score_path(scores.scores_dir, group, kind, scores.sd)
        for stale in (matrix, ids_path(matrix)):
            stale.unlink(missing_ok=True)
    return True


class ChosenScores(Mapping):
    """split -> the chosen (P, N) scores, combined from the store when asked for (`combine`); the last split asked
    for is held (the table, the report and the submission ask for test in turn), no other. A split whose scores came
    from elsewhere (the final fit's test scores) is set with `with_scores`."""

    def __init__(self, scores: Mapping[str, Mapping[str, np.ndarray]], selection: Selection,
                 given: Mapping[str, np.ndarray] | None = None):
        self.scores, self.selection, self.given = scores, selection, dict(given or {})
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, split: str) -> np.ndarray:
        if split in self.given:
            return self.given[split]
        if self._last is None or self._last[0] != split:
            self._last = None  # released before the next is read
            self._last = (split, self._read(split))
        return self._last[1]

    def _read(self, split: str) -> np.ndarray:
        """The kept combined blend when there is one under its key (one found damaged is combined again and kept
        again), else the matrices combined."""
        scores = self.scores[split]
        found = blend_store(scores, self.selection) if isinstance(scores, SplitScores) else None
        if found is None or stored_key(found[0]) != found[1]:
            return combine(scores, self.selection)
        kept = cached_scores(found[0], scores.sd.probe_ids, scores.sd.gallery_ids)
        if kept is None:  # damaged (named in one warning): combined from its variants, computed again, and kept
            kept = combine(scores, self.selection)
            _write_blend(found[0], found[1], kept, scores)
        return kept

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __contains__(self, split: object) -> bool:  # without combining, as Mapping's would
        return split in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def with_scores(self, split: str, scores: np.ndarray) -> ChosenScores:
        return ChosenScores(self.scores, self.selection, {**self.given, split: scores})


class ByVariant(Mapping):
    """split -> one variant's scores, read when asked for: what `select` takes per variant."""

    def __init__(self, scores: Mapping[str, Mapping[str, np.ndarray]], variant: str, names: Sequence[str]):
        self.scores, self.variant, self.names = scores, variant, list(names)

    def __getitem__(self, split: str) -> np.ndarray:
        if split not in self.names:
            raise KeyError(split)
        return self.scores[split][self.variant]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, split: object) -> bool:
        return split in self.names

    def __len__(self) -> int:
        return len(self.names)
