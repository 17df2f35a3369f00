"""The paper's pair training at CPU scale: resnet18 from scratch at 64 px, BCE or focal on comb1/comb2 pairs."""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="resnet18", input_size=64, loss="bce", combination="comb1",
              head_widths=(128,), pairs_per_epoch=2500, batch_size=64, epochs=8, lr=0.05)
GRID = {"loss": ["bce", "focal"], "combination": ["comb1", "comb2"]}
