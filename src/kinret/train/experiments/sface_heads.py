"""Head-only training on the bundled SFace face network (frozen; features computed once and cached).

Pair losses train the FC head over a combination (and a residual neck that starts as the identity); family losses
train the neck on the embedding that cosine similarity compares. Every variant × fold of this grid shares one
feature cache, which is what makes the whole grid affordable on a CPU.
"""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="sface", mode="head", pool="native", neck="residual", loss="bce",
              combination="comb1", head_widths=(128,), dropout=0.1, epochs=10, batch_size=128, lr=1e-2,
              weight_decay=1e-4, pairs_per_epoch=5000)
GRID = [
    {"loss": ["bce", "focal"], "combination": ["comb1", "comb2", "absdiff"]},
    {"loss": ["cosface", "supcon"]},
]
