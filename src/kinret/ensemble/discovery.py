"""Which variants a run has: the runs of each experiment's grid on this data folder, the fold plan they share, and
the groups of variants they yield (raw pixels, each frozen backbone's poolings, each trained variant's fold models,
external embeddings or score matrices in ensemble/external/), optionally narrowed to some names.

Every source's main embedding (raw pixels, a frozen backbone's native embedding or else its average pooling, a
trained variant's or an external file's "emb") also gets the transductive re-scorings of its cosine
(`kinret.scoring.transductive.RESCORINGS`). The FC head over every probe-photo x gallery pair (`fc-mean`, `fc-max`,
`fc-meanemb`) is listed only with `fc_all`; otherwise it is scored only when named (`filter_groups`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from kinret.errors import KinretInputError
from kinret.features.sources import BackboneSource, CheckpointSource, ExternalEmbeddings, RawPixelSource
from kinret.models.config import TrainConfig, apply_overrides
from kinret.models.losses import trains_pair_head
from kinret.models.networks import pool_names
from kinret.scoring.variants import Group, Similarity, similarities
from kinret.train.experiments import load_experiment
from kinret.train.grid import expand

log = logging.getLogger("kinret.ensemble")
DEFAULT_EXPERIMENTS = ("sface_heads",)


def experiment_jobs(name: str, root: Path, runs: Path) -> list[tuple[TrainConfig, int, list[str]]]:
    """The (config, fold, overrides) runs of an experiment's grid, on this data folder and runs folder."""
    cfg, grid = load_experiment(name)
    return expand(apply_overrides(cfg, [f"data_root={root}", f"out_root={runs}"]), grid)


def fold_plan(jobs: Sequence[tuple[TrainConfig, int, list[str]]]) -> tuple[int, int]:
    """(n_folds, fold_seed) every experiment agrees on, so out-of-fold protocols are the same for all variants;
    n_folds 0 when there are no trained variants."""
    plans = {(c.n_folds, c.fold_seed) for c, _, _ in jobs}
    if len(plans) > 1:
        raise KinretInputError(None, f"the experiments use different folds {sorted(plans)} (n_folds, fold_seed): "
                                     "out-of-fold scores are only comparable on one fold plan")
    return plans.pop() if plans else (0, TrainConfig.fold_seed)  # no fold models: build_splits picks the folds


def main_pooling(backbone: str) -> str:
    """The pooling a frozen backbone's transductive variants re-score: its own embedding layer when it has one
    (SFace's "native"), else the average pooling."""
    names = pool_names(backbone)
    return "native" if "native" in names else "avg"


def _group(name: str, embs: Sequence[str], has_fc: bool, top_n: int, fc_all: bool, main: str | None,
           sources: dict, rescore_listed: bool = True) -> Group:
    """A group listing its variants (FC over all pairs only with `fc_all`; the default re-scorings of `main` unless
    `rescore_listed` is False) and holding the rest on request, scored when named."""
    listed = similarities(embs, has_fc, top_n, fc_all, main if rescore_listed else None)
    every = similarities(embs, has_fc, top_n, True, main, every_rescoring=True)
    return Group(name, listed, sources, on_request=[s for s in every if s not in listed])


def discover_groups(jobs: Sequence[tuple[TrainConfig, int, list[str]]], cache_dir: Path, external_dir: Path | None,
                    raw_pixels: bool = True, top_n: int = 100, fc_all: bool = False) -> list[Group]:
    """Every group of variants: raw pixels, each frozen backbone behind head-only runs, each trained variant (its
    fold models), and each folder of ``external_dir`` (``embeddings.npz``, or ``{split}.npy`` score matrices).
    `fc_all` lists the FC-over-all-pairs variants of pair-loss runs; without it they are available by name."""
    backbones: dict = {}
    groups: list[Group] = []
    if raw_pixels:
        groups.append(_group("raw_pixels", ["pixels"], False, top_n, fc_all, "pixels",  # a baseline, kept plain
                             {None: RawPixelSource(cache_dir)}, rescore_listed=False))
    seen_backbones = set()
    by_variant: dict[str, Group] = {}
    for cfg, fold, _ in jobs:
        if cfg.mode == "head" and (cfg.backbone, cfg.weights) not in seen_backbones:
            seen_backbones.add((cfg.backbone, cfg.weights))
            src = BackboneSource(cfg, cache_dir, backbones)
            groups.append(_group(src.name, pool_names(cfg.backbone), False, top_n, fc_all, main_pooling(cfg.backbone),
                                 {None: src}))
        if cfg.name not in by_variant:
            embs = ["emb"]
            if cfg.mode == "e2e":  # every pooling of the fine-tuned backbone, but the one equal to the embedding
                embs += [p for p in pool_names(cfg.backbone) if not (p == cfg.pool and cfg.neck == "none")]
            by_variant[cfg.name] = _group(cfg.name, embs, trains_pair_head(cfg.loss), top_n, fc_all, "emb", {})
            groups.append(by_variant[cfg.name])
        by_variant[cfg.name].sources[fold] = CheckpointSource(cfg.run_dir(fold), cache_dir, backbones)
    if external_dir is not None and Path(external_dir).is_dir():
        for folder in sorted(p for p in Path(external_dir).iterdir() if p.is_dir()):
            if (folder / "embeddings.npz").is_file():
                groups.append(_group(folder.name, ["emb"], False, top_n, fc_all, "emb",
                                     {None: ExternalEmbeddings(folder / "embeddings.npz", folder.name)}))
            elif any(folder.glob("*.npy")):
                groups.append(Group(folder.name, [], scores_dir=folder))
            else:
                log.warning("%s holds neither embeddings.npz nor {split}.npy score matrices: ignored", folder)
    _check_names(groups, external_dir)
    return groups


def _check_names(groups: list[Group], external_dir: Path | None) -> None:
    """A group's name and its variants' names (those on request included) are all taken once."""
    seen: set[str] = set()
    for g in groups:
        for v in dict.fromkeys([g.name, *g.variants, *(g.variant(s) for s in g.on_request)]):
            if v in seen:
                where = Path(external_dir) / g.name if external_dir and g.name in _external(external_dir) else None
                raise KinretInputError(where, f"variant {v!r} is named twice: rename one of them")
            seen.add(v)


def _external(external_dir: Path | None) -> set[str]:
    if external_dir is None or not Path(external_dir).is_dir():
        return set()
    return {p.name for p in Path(external_dir).iterdir() if p.is_dir()}


def filter_groups(groups: list[Group], keep: Sequence[str] | None) -> list[Group]:
    """Only the variants named in `keep` (exact names, those on request included, or a group name for all its listed
    variants); none named twice."""
    if not keep:
        return groups
    dup = sorted({k for k in keep if list(keep).count(k) > 1})
    if dup:
        raise KinretInputError(None, f"variant {dup[0]!r} is named twice in --variants")
    known = {v for g in groups for v in g.variants} | {g.name for g in groups}
    on_request = {g.variant(s) for g in groups for s in g.on_request}
    unknown = [k for k in keep if k not in known | on_request]
    if unknown:
        raise KinretInputError(None, f"unknown variant {unknown[0]!r}; the run has: {', '.join(sorted(known))} "
                                     f"(and on request: {', '.join(sorted(on_request)) or 'none'})")
    out = []
    for g in groups:
        if g.name in keep:
            out.append(g)
            continue
        sims: list[Similarity] = [s for s in [*g.sims, *g.on_request] if g.variant(s) in keep]
        if sims:
            out.append(Group(g.name, sims, g.sources, g.scores_dir))
    return out
