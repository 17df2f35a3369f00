"""A small backbone trained from scratch on CPU: resnet18 at 64 px with a margin softmax over training families.

On the synthetic default this learns (see DEVELOPERS.md); on real faces start from pretrained weights instead
(`--set pretrained=true` online, or `--set weights=FILE`)."""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="resnet18", input_size=64, loss="cosface", margin=0.2, scale=30.0,
              batch_size=64, images_per_family=4, epochs=8, optimizer="adamw", lr=2e-3, weight_decay=5e-4,
              warmup_epochs=1.0)
