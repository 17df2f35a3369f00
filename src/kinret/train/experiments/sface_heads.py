"""Head-only training on the bundled SFace face network (frozen; features computed once and cached): the default.

A family loss (CosFace) trains a residual neck, started as the identity, on the embedding that cosine similarity
compares; the paper's pair loss (BCE on comb2) trains an FC head whose shortlist re-rank is scored beside
its cosine. Every variant x fold shares one feature cache; three folds give three out-of-fold protocols, each fold
model trained on two thirds of the families; one view per image (no mirror). Why this grid and not more:
docs/decisions.md ("The default grid", "The mirror view"); the full grid is `sface_heads_full`.
"""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="sface", mode="head", pool="native", neck="residual", loss="bce",
              combination="comb2", head_widths=(128,), dropout=0.1, epochs=10, batch_size=128, lr=1e-2,
              weight_decay=1e-4, pairs_per_epoch=5000, n_folds=3, class_init="means", flip_views=False)
GRID = [
    {"loss": ["cosface"]},
    {"loss": ["bce"], "combination": ["comb2"]},
]
