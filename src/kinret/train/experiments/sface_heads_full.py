"""The full head-only grid on frozen SFace, as the default was before it was trimmed: BCE and focal losses on
comb1, comb2 and absdiff, CosFace and SupCon, five folds (40 runs), features with the mirror image. Add `--fc-all`
to make_submission.py (or python -m kinret.ensemble) to also score the pair heads' FC similarity over every
probe-photo x gallery pair."""
from dataclasses import replace

from kinret.train.experiments import load_experiment

cfg = replace(load_experiment("sface_heads")[0], name="sface_heads_full", n_folds=5, flip_views=True)
GRID = [
    {"loss": ["bce", "focal"], "combination": ["comb1", "comb2", "absdiff"]},
    {"loss": ["cosface", "supcon"]},
]
