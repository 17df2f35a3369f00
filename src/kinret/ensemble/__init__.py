"""The ensemble stage: what the choice depends on (`settings`), which variants a run has (`discovery`), scoring them
all on every split and choosing (`run`), the choice itself (`selection`: per-probe results, the blend weight search,
the cross-fitted comparison), paired-bootstrap intervals of differences in Average (`bootstrap`), blending
(`blend`), the variant table (`tables`) and the command (`cli`, ``python -m kinret.ensemble``).

May import: kinret's base modules, `data`, `models`, `features`, `scoring`, `train` (experiments, grid, run folders).
"""
