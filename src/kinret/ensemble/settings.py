"""What the ensemble stage's choice depends on: one frozen settings object, built by the command lines from their
options and saved as is in `selection.json` beside the submission it produced."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kinret.ensemble.bootstrap import N_BOOT
from kinret.ensemble.selection import POOL

DEFAULT_EXPERIMENTS = ("sface_heads", "sface_finetune")
EVERY_VARIANT_PAIRS = 25_000_000  # --score-others auto: every variant on a split of at most this many pairs
SCORE_OTHERS = ("auto", "every", "chosen")


@dataclass(frozen=True)
class EnsembleSettings:
    """The experiments whose variants are scored, which variants, how the choice is made, and the data it ran on.

    experiments: experiment names or files whose grids are trained and scored (empty: training-free variants only)
    overrides: ``[EXPERIMENT:]key=value`` config overrides of those experiments (`--set`), unscoped ones for all
    variants: only these variants or groups of variants (None: all listed ones)
    raw_pixels: score the raw-pixel baseline
    choose: auto | best | blend; normalise: z | rank (per probe, for blends); max_steps: greedy blend steps;
    blend_pool: variants a blend is searched over; bootstrap: paired resamples behind every interval;
    reference: the variant every interval is taken against (None: zero-shot SFace, else raw pixels)
    top_n: the cosine shortlist a pair head re-ranks; fc_all: list FC over every pair for every pair head
    protocol_seed: seed of the protocols drawn from labelled folders
    score_others: which variants are scored on a labelled split the choice is not made on (val, test): every one,
    the chosen ones and the reference, or auto: every one on a split of at most `EVERY_VARIANT_PAIRS` probe x
    gallery pairs, the chosen ones and the reference on a larger one
    data_root: the data folder; data_seed: the synthetic default's seed when it ran on the default (else None)
    """

    experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS
    overrides: tuple[str, ...] = ()
    variants: tuple[str, ...] | None = None
    raw_pixels: bool = True
    choose: str = "auto"
    normalise: str = "z"
    max_steps: int = 10
    blend_pool: int = POOL
    bootstrap: int = N_BOOT
    reference: str | None = None
    top_n: int = 100
    fc_all: bool = False
    protocol_seed: int = 0
    score_others: str = "auto"
    data_root: str = ""
    data_seed: int | None = None

    def scores_every_variant(self, probes: int, gallery: int) -> bool:
        """Whether every variant is scored on a split (of `probes` x `gallery` faces) the choice is not made on."""
        return self.score_others == "every" or (self.score_others == "auto"
                                                and probes * gallery <= EVERY_VARIANT_PAIRS)

    def to_dict(self) -> dict[str, object]:
        """The settings as saved in selection.json (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
