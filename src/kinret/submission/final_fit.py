"""The final fit: once the out-of-fold choice is made, every chosen trained variant is trained again on every
labelled family (train and val: fold `kinret.data.FINAL_FIT`, in ``runs/{data set}/{experiment}/{variant}/full/``),
and the test split is scored by those models with the chosen similarity and re-scoring; training-free variants (frozen
features, raw pixels, external files) keep their scores, and a blend keeps its weights. The choice and its
out-of-fold figures stay the fold models'; `selection.json` records which models the submitted test scores come from
(`final_fit`)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from kinret.data import FINAL_FIT
from kinret.ensemble.run import EnsembleResult
from kinret.ensemble.selection import combine
from kinret.errors import KinretInputError
from kinret.features.sources import CheckpointSource
from kinret.log import stage
from kinret.scoring.variants import Group, group_scores
from kinret.submission.options import Options
from kinret.train.experiments import Run
from kinret.train.grid import plan_text, train_grid
from kinret.train.runs import run_states

log = logging.getLogger("kinret.submission")


def refit_runs(result: EnsembleResult, groups: list[Group], runs: list[Run]) -> dict[str, Run]:
    """chosen variant -> the final-fit run of its trained variant, for every chosen variant that has fold models."""
    kinds = {g.variant(k): g for g in groups for k in g.kinds}
    configs = {r.cfg.name: r.cfg for r in runs}
    return {v: Run(configs[kinds[v].name], FINAL_FIT) for v in result.selection.weights
            if v in kinds and None not in kinds[v].sources and kinds[v].name in configs}


def train_refits(todo: list[Run], jobs: int | None, quiet: bool, verbose: bool) -> None:
    found = run_states(todo)
    conflicts = [detail for state, detail in found if state == "conflict"]
    if conflicts:
        raise KinretInputError(None, f"a final-fit folder holds another config: {conflicts[0]}")
    left = [r for r, (state, _) in zip(todo, found, strict=True) if state != "finished"]
    if not left:
        return
    with stage("final fit", f"{len(left)} run(s) on every labelled family (train and val), "
                            f"{plan_text(left, jobs)}"):
        codes = train_grid(left, jobs, quiet, verbose)
    if 2 in codes.values():
        raise KinretInputError(None, "the final fit stopped on bad input; see the log above")
    if any(codes.values()):
        raise RuntimeError("the final fit failed; see the log above")


def final_fit(result: EnsembleResult, groups: list[Group], runs: list[Run], opts: Options) -> EnsembleResult:
    """`result` with its chosen test scores from the chosen variants refit on every labelled family (see the
    module docstring); unchanged, with a warning, when the choice holds no trained variant."""
    refits = refit_runs(result, groups, runs)
    if not refits:
        log.warning("final fit: the chosen %s holds no trained variant; the submission is the same without it",
                    result.selection.name)
        return result
    t0 = time.perf_counter()
    train_refits(list(dict.fromkeys(refits.values())), opts.jobs, opts.quiet, opts.verbose)
    kinds = {g.variant(k): (g, k) for g in groups for k in g.kinds}
    test, backbones = result.splits["test"], {}
    scores = {v: result.scores["test"][v] for v in result.selection.weights if v not in refits}  # read once each
    for v, run in refits.items():
        group, kind = kinds[v]
        full = Group(group.name, [kind], {None: CheckpointSource(run.run_dir, opts.dirs.runs / "_cache", backbones)})
        scores.update(group_scores(full, test, opts.dirs.ensemble / "scores_final"))
    info = {"trained_on": "every labelled family (train and val)", "refit": {v: str(r.run_dir) for v, r in
                                                                            refits.items()},
            "kept": [v for v in result.selection.weights if v not in refits], "seconds": round(time.perf_counter()
                                                                                              - t0, 1)}
    chosen = combine(scores, result.selection)
    return replace(result, selection=replace(result.selection, final_fit=info),
                   chosen=result.chosen.with_scores("test", chosen))
