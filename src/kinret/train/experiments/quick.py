"""The notebooks' experiment: a resnet18 at 64 px trained from scratch on CPU with a margin softmax over training
families, 4 epochs, 2 folds (about a minute a fold on 2 cores on the synthetic default). Small on purpose: it shows
the workflow, not the best score (the default `sface_heads` grid does better)."""
from dataclasses import replace

from kinret.train.experiments import load_experiment

cfg = replace(load_experiment("resnet18_cosface")[0], name="quick", epochs=4, n_folds=2)
