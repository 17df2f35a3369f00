"""Training: experiment files, their loader and their runs (`experiments`), the training loop (`trainer`), a run's
inputs rebuilt the same way by the trainer and a later scorer (`inputs`), evaluation on held-out families and pair
scores of a trained run (`heldout`), checkpoint, summary and state files (`checkpointing`), run folders and their
states (`runs`), training one run into its folder (`fit`), the grid of an experiment (`grid`), and the command
(`cli`, ``python -m kinret.train``). Batches are drawn by the losses (`kinret.models.losses`); what a model consumes
and how its inputs are augmented are the feeds' (`kinret.features.feeds`, `kinret.features.augment`).

May import: kinret's base modules, `data`, `models`, `features`, `scoring`.
"""
