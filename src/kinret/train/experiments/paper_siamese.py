"""The seed paper's grid: resnet50 and SE-ResNet50 × BCE and focal loss × comb1 and comb2, end to end on pairs.

As published: SGD, lr 1e-2, 5,000 kin + 5,000 non-kin pairs an epoch, 120 epochs, average pooling, from weights
pretrained on faces. Meant for a GPU (`torchrun --nproc_per_node N -m kinret.grid ...` or one run per GPU) with
`--set weights=FILE` (e.g. VGGFace2 weights) or `--set pretrained=true` when the hub is reachable.
"""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="resnet50", pretrained=True, pool="avg", combination="comb1", loss="bce",
              head_widths=(512, 128), dropout=0.2, epochs=120, batch_size=64, lr=1e-2, momentum=0.9,
              pairs_per_epoch=5000)
GRID = {"backbone": ["resnet50", "seresnet50"], "loss": ["bce", "focal"], "combination": ["comb1", "comb2"]}
