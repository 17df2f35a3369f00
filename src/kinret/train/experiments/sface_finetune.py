"""SFace fine-tuned end to end with a margin softmax over the training families, on a CPU in the default run.

The recipe starts where the pretrained network is and only improves on it: CosFace (s 32, m 0.2) whose class weights
start at the normalised mean embedding of each family (`class_init="means"`: the epoch-0 held-out score is the
zero-shot one), the class weights at lr 1e-3 and the network at 1e-4 (AdamW), batches of 64 images drawn at random,
BatchNorm statistics kept as shipped. The first 24 units (through conv_13_dw) stay frozen: their output (512x7x7) is
what the frozen feature pass already computes for every image, so training and embedding run only the rest
(conv_13, conv_14 and the embedding layers). One view per image (the feature pass's), so no flip augmentation;
three folds, the default grid's fold plan, so its fold models are scored out of fold beside the heads. Why one epoch
and this cut: docs/decisions.md ("The fine-tune in the default").
"""
from dataclasses import replace

from kinret.models.config import TrainConfig

cfg = replace(TrainConfig(), backbone="sface", mode="e2e", pool="native", neck="none", loss="cosface", scale=32.0,
              margin=0.2, class_init="means", optimizer="adamw", lr=1e-4, classifier_lr=1e-3, weight_decay=1e-4,
              warmup_epochs=0.2, epochs=1, batch_size=64, batching="random", freeze_bn=True, freeze_units=24,
              cache_prefix=True, flip_views=False, flip_p=0.0, color_jitter=0.0, affine_degrees=0.0,
              affine_translate=0.0, affine_scale=0.0, n_folds=3)
