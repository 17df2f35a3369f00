"""Experiment files: each defines `cfg` (and optionally `GRID`) from `kinret.config.TrainConfig`."""
