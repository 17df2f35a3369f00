"""Which variants a run has: the runs of each experiment's grid on this data folder, the fold plan they share, and
the groups of variants they yield (raw pixels, each frozen backbone's poolings, each trained variant's fold models,
external embeddings or score matrices in ensemble/external/), optionally narrowed to some names.

Each group is described by a `GroupSpec` (its embeddings, its main embedding, whether it has a trained FC pair head)
and gets every variant the kinds of `kinret.scoring.variant_kinds` offer for it: every source's main embedding (raw
pixels, a frozen backbone's native embedding or else its average pooling, a trained variant's or an external file's
"emb") also gets the transductive re-scorings of its cosine (`kinret.scoring.transductive.RESCORINGS`). The FC head
over every probe-photo x gallery pair (`fc-mean`, `fc-max`, `fc-meanemb`) is listed only with `fc_all`; otherwise it
is scored only when named (`filter_groups`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from kinret.errors import KinretInputError
from kinret.features.feeds import feed_class
from kinret.features.sources import BackboneSource, CheckpointSource, ExternalEmbeddings, RawPixelSource
from kinret.models.config import TrainConfig
from kinret.models.losses import trains_pair_head
from kinret.models.networks import pool_names
from kinret.scoring.variant_kinds import GroupSpec, VariantKind, offered_variants
from kinret.scoring.variants import Group
from kinret.train.experiments import Run

log = logging.getLogger("kinret.ensemble")


def fold_plan(jobs: Sequence[Run]) -> tuple[int, int]:
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


def _group(name: str, spec: GroupSpec, sources: dict) -> Group:
    """A group listing the variants `spec` lists and holding the rest on request, scored when named."""
    listed, on_request = offered_variants(spec)
    return Group(name, listed, sources, on_request=on_request)


def _frozen_sources(jobs: Sequence[Run], cache_dir: Path, backbones: dict) -> dict[tuple, BackboneSource]:
    """One zero-shot source per frozen pass the runs' feeds read (by `features_key`, first come first named), each
    asked for every unit cut the fine-tunes on that pass read, so one pass computes them all. A fine-tune whose
    network already has a zero-shot source under other views adds no group (its own pass is computed when read)."""
    first: dict[tuple, TrainConfig] = {}
    cuts: dict[tuple, list] = {}
    for cfg, _, _ in jobs:
        feed = feed_class(cfg)
        if not feed.zero_shot(cfg):
            continue
        same = any(c.backbone_key == cfg.backbone_key for c in first.values())
        if cfg.features_key not in first and (feed.cuts(cfg) == () or not same):
            first[cfg.features_key] = cfg
        cuts.setdefault(cfg.features_key, [])
        cuts[cfg.features_key] += [c for c in feed.cuts(cfg) if c not in cuts[cfg.features_key]]
    return {key: BackboneSource(cfg, cache_dir, backbones, cuts=tuple(cuts[key])) for key, cfg in first.items()}


def discover_groups(jobs: Sequence[Run], cache_dir: Path, external_dir: Path | None, raw_pixels: bool = True,
                    top_n: int = 100, fc_all: bool = False) -> list[Group]:
    """Every group of variants: raw pixels, each frozen backbone behind head-only runs, each trained variant (its
    fold models), and each folder of ``external_dir`` (``embeddings.npz``, or ``{split}.npy`` score matrices).
    `fc_all` lists the FC-over-all-pairs variants of pair-loss runs; without it they are available by name."""
    backbones: dict = {}
    groups: list[Group] = []
    if raw_pixels:
        plain = GroupSpec(("pixels",), "pixels", top_n=top_n, fc_all=fc_all, rescore_listed=False)  # a baseline
        groups.append(_group("raw_pixels", plain, {None: RawPixelSource(cache_dir)}))
    frozen = _frozen_sources(jobs, cache_dir, backbones)
    by_variant: dict[str, Group] = {}
    for cfg, fold, _ in jobs:
        source = frozen.pop(cfg.features_key, None)  # its zero-shot group, listed where its first run is
        if source is not None:
            spec = GroupSpec(tuple(pool_names(source.cfg.backbone)), main_pooling(source.cfg.backbone), top_n=top_n,
                             fc_all=fc_all)
            groups.append(_group(source.name, spec, {None: source}))
        if cfg.name not in by_variant:
            feed = feed_class(cfg)
            spec = GroupSpec(tuple(feed.embeddings(cfg)), "emb", trains_pair_head(cfg.loss), top_n, fc_all)
            by_variant[cfg.name] = _group(cfg.name, spec, {})
            groups.append(by_variant[cfg.name])
        by_variant[cfg.name].sources[fold] = CheckpointSource(cfg.run_dir(fold), cache_dir, backbones)
    if external_dir is not None and Path(external_dir).is_dir():
        for folder in sorted(p for p in Path(external_dir).iterdir() if p.is_dir()):
            if (folder / "embeddings.npz").is_file():
                spec = GroupSpec(("emb",), "emb", top_n=top_n, fc_all=fc_all)
                groups.append(_group(folder.name, spec,
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
        kinds: list[VariantKind] = [k for k in [*g.kinds, *g.on_request] if g.variant(k) in keep]
        if kinds:
            out.append(Group(g.name, kinds, g.sources, g.scores_dir))
    return out
