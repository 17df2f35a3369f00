"""The data stage: a data folder read once (`layout`: `DataLayout`), FIW family folders and mid.csv (`fiw`), the
Codalab index and labelled lists (`lists`), image decoding (`images`), pixel arrays cached per input size (`pixels`),
a Track-3 split, its Codalab layout and the protocol builder (`track3`), the synthetic default in the FIW layout
(`synth`, `synth_faces`, `synth_photo`), figures of a data folder (`figures`), its check (`check`), and where a
data set's runs, tables and submissions live (`workspace`).

May import: kinret's base modules.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from kinret.errors import KinretInputError

DEFAULT_ROOT = Path("data") / "synthetic"  # the embedded default: the synthetic dataset, generated on first use
ALL_TRAIN = -1  # the fold of a fit on every training family, evaluated on DATA/val (``--fold -1``)
FINAL_FIT = -2  # the fold of a final fit: every labelled family (train and val) trained on, nothing held out


class Fit(Enum):
    """What a run trains on and is evaluated on, by its fold number: fold k >= 0 of the training families, or one of
    the two fits on whole splits (`ALL_TRAIN`, `FINAL_FIT`). The one place that gives the negative folds a meaning."""

    FOLD = "a fold of the training families"  # k >= 0: trains on the other folds, evaluated on fold k's families
    ALL_TRAIN = "every training family"  # -1: evaluated on DATA/val's families (or its labelled lists)
    FINAL = "every labelled family"  # -2: trains on DATA/train and DATA/val, evaluated on nothing

    @classmethod
    def of(cls, fold: int) -> Fit:
        if fold >= 0:
            return cls.FOLD
        if fold == ALL_TRAIN:
            return cls.ALL_TRAIN
        if fold == FINAL_FIT:
            return cls.FINAL
        raise KinretInputError(None, f"--fold {fold}: a fold is 0..n_folds-1, {ALL_TRAIN} (every training family, "
                                     f"scored on val) or {FINAL_FIT} (a final fit on train and val)")

    @property
    def reads_val(self) -> bool:
        """DATA/val takes part in the run (held out or trained on)."""
        return self is not Fit.FOLD

    @property
    def trains_on_val(self) -> bool:
        return self is Fit.FINAL

    @property
    def evaluates_on_val(self) -> bool:
        return self is Fit.ALL_TRAIN
