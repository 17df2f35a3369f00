"""A seconds-long end-to-end run for tests and smoke checks: timm's 0.4M-parameter test_resnet at 32 px."""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="test_resnet", input_size=32, pairs_per_epoch=64, batch_size=32, epochs=2,
              n_folds=2, eval_pairs=50, head_widths=(16,), lr=0.05, threads=1)
