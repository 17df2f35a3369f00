"""Score matrices read from the store when asked for, never all held: the chosen scores of each split (a single
variant's matrix, or the blend combined from its variants' matrices one at a time) and one variant's matrices on
the splits the choice is made on (what `kinret.ensemble.selection.select` takes)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from kinret.ensemble.selection import Selection, combine


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
            self._last = (split, combine(self.scores[split], self.selection))
        return self._last[1]

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
