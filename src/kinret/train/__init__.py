"""Training: experiment files and their loader (`experiments`), kin/non-kin pair and family batch sampling with
batched augmentation (`sampling`), the training loop (`trainer`), the cached frozen prefix of a fine-tune
(`prefix`), evaluation on held-out families and pair scores of a trained run (`evaluation`), checkpoint, summary
and state files (`checkpointing`), run folders and their states (`runs`), the grid of an experiment (`grid`), and
the command (`cli`, ``python -m kinret.train``).

May import: kinret's base modules, `data`, `models`, `features`, `scoring`.
"""
