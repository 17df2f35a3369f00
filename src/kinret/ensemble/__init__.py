"""The ensemble stage: which variants a run has (`discovery`), scoring them all on every split and choosing
(`run`), the choice itself (`selection`: per-probe results, greedy blend weights, the cross-fitted comparison),
blending (`blend`), the variant table (`tables`) and the command (`cli`, ``python -m kinret.ensemble``).

May import: kinret's base modules, `data`, `models`, `features`, `scoring`, `train` (experiments, grid, run folders).
"""
