"""SFace fine-tuned end to end with a margin softmax over training families (the best recipe measured on real
family photos, see DEVELOPERS.md): AdamW 1e-4, the first blocks frozen, BatchNorm statistics kept as shipped."""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="sface", mode="e2e", pool="native", neck="none", loss="cosface",
              optimizer="adamw", lr=1e-4, weight_decay=1e-4, warmup_epochs=0.2, epochs=2, batch_size=32,
              images_per_family=4, freeze=tuple(f"net.body.{i}." for i in range(6)))
