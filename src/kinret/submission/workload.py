"""What a run still has to build, counted in the units its stages record (`kinret.submission.estimate`): the
synthetic images to generate, the image views each frozen network's pass computes, each experiment's unfinished runs,
the score-matrix cells still missing and the submission's cells; also before the default data exists, from the
synthetic settings (expected sizes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from kinret.data.synth import SynthConfig
from kinret.ensemble.cli import network_name
from kinret.ensemble.run import choice_splits, pending_embeddings
from kinret.ensemble.selection import POOL
from kinret.features.feeds import feed_class
from kinret.features.sources import BackboneSource
from kinret.scoring.protocols import SplitData
from kinret.scoring.variants import Group, missing_scores
from kinret.submission.estimate import Work
from kinret.train.experiments import Run

PARAMETER_BYTES = 4  # a finished checkpoint holds float32 weights (no optimizer state)


def expected_images(cfg: SynthConfig, families: int | None = None) -> float:
    """Images a synthetic config makes on average (members and photos drawn uniformly), for all its families or
    `families` of them."""
    n = cfg.n_train + cfg.n_val + cfg.n_test if families is None else families
    return n * (cfg.min_members + cfg.max_members) / 2 * (cfg.min_images + cfg.max_images) / 2


def data_work(cfg: SynthConfig) -> Work:
    n = expected_images(cfg)
    return Work("data", n, "data", shown=f"{n:,.0f} images")


def _cut(source: BackboneSource) -> int:
    """The deepest unit cut a frozen network's pass keeps for the fine-tunes that read it (0: none)."""
    return max((c.units for c in source.cuts), default=0)


def feature_key(source: BackboneSource) -> str:
    cut = _cut(source)
    return f"features:{source.name}" + (f"+prefix{cut}" if cut else "")


def feature_work(images: Mapping[int, tuple[BackboneSource, float]]) -> list[Work]:
    """One piece of work per frozen network: `images` maps id(source) -> (source, images through it)."""
    out = []
    for source, n in images.values():
        views = (2 if source.cfg.flip_views else 1) * n
        cut = _cut(source)
        out.append(Work(feature_key(source), views, f"features {source.name}", shown=f"{views:,.0f} image views",
                        like={"network": source.name, "prefix": cut}))
    return out


def pending_feature_images(todo: Sequence[tuple]) -> dict[int, tuple[BackboneSource, float]]:
    """id(source) -> (source, images) of the frozen-feature work `todo` ((BackboneSource, ImageSet) pairs): an
    out-of-fold set is rows of the training set, counted once."""
    sets: dict[int, tuple[BackboneSource, dict[str, int]]] = {}
    for source, images in todo:
        root = images.parent or images
        sets.setdefault(id(source), (source, {}))[1][root.label] = len(root.paths)
    return {i: (src, float(sum(n.values()))) for i, (src, n) in sets.items()}


def run_units(cfg, n_train: float) -> float:
    """A run's units of training work: 1 for a head-only run (its cost is mostly fixed: start-up, pairs drawn, the
    held-out evaluation), the training images times the epochs for one that trains its network."""
    return n_train * cfg.epochs if feed_class(cfg).trains_backbone else 1.0


def experiment_of(run: Run) -> str:
    return run.cfg.name.split("/")[0]


def run_kind(cfg) -> dict[str, object]:
    """What kind of run a config trains, as its training record says: network, mode ("e2e" when it trains its
    network, else "head") and the prefix cut its feed reads."""
    feed = feed_class(cfg)
    return {"network": network_name(cfg), "mode": "e2e" if feed.trains_backbone else "head",
            "prefix": max((c.units for c in feed.cuts(cfg)), default=0)}


def _checkpoint_size(cfg, built: dict) -> tuple[float, str] | None:
    """(bytes, how found) of an end-to-end run's finished checkpoint: its network's parameters, 4 bytes each."""
    if not feed_class(cfg).trains_backbone:
        return None
    from kinret.models.checkpoint import shared_backbone

    backbone, _ = shared_backbone(replace(cfg, pretrained=False), built)  # its size, not its weights
    n = sum(p.numel() for p in backbone.parameters())
    return PARAMETER_BYTES * n, f"{n / 1e6:.1f}M parameters x {PARAMETER_BYTES} bytes a run"


def train_work(todo: Sequence[Run], n_train: float, known: Mapping[str, dict] | None = None) -> list[Work]:
    """One piece of work per experiment among the unfinished runs `todo`: its runs and their units (`run_units`).
    An experiment with no record in `known` gets its checkpoints' size from its network (built, not loaded)."""
    by_exp: dict[str, list[Run]] = {}
    for run in todo:
        by_exp.setdefault(experiment_of(run), []).append(run)
    out, built = [], {}
    for exp, runs in by_exp.items():
        cfg = runs[0].cfg
        units = sum(run_units(r.cfg, n_train) for r in runs)
        passes = f" x {units / len(runs):,.0f} image passes" if feed_class(cfg).trains_backbone else ""
        shown = f"{len(runs)} runs{passes}"
        size = None if known is None or f"train:{exp}" in known else _checkpoint_size(cfg, built)
        out.append(Work(f"train:{exp}", units, f"train {exp}", len(runs), run_kind(cfg), size, shown))
    return out


def embedding_units(groups: Sequence[Group], splits: Mapping[str, SplitData], scores_dir: Path) -> float:
    """Image embeddings the scoring computes and caches: every image set of a missing matrix through each source
    that writes a cache of its own (raw pixels, trained models; a frozen network's come from its feature cache)."""
    todo = pending_embeddings(list(groups), dict(splits), scores_dir)
    return float(sum(len(images.paths) for source, images in todo if not isinstance(source, BackboneSource)))


def score_work(groups: Sequence[Group], splits: Mapping[str, SplitData], scores_dir: Path,
               untrained: set[str]) -> list[Work]:
    """The score-matrix cells still to build and keep (every variant of an untrained group; kept: every matrix of a
    split the choice is made on, elsewhere a blend's at most), the embeddings behind them and the submission's cells."""
    cells, matrices, chooser = 0.0, 0, choice_splits(dict(splits))
    for sd in splits.values():
        n = sum(len(g.variants) if g.name in untrained else len(missing_scores(g, sd, scores_dir)) for g in groups)
        matrices += n
        cells += float(n if sd.name in chooser else min(n, POOL)) * len(sd.split.probes) * len(sd.split.gallery)
    test = splits["test"].split
    embedded = embedding_units([g for g in groups if g.name not in untrained], splits, scores_dir)
    embedded += sum(_trained_embeddings(g, [(len(sd.images.paths), sd.fold is None) for sd in splits.values()])
                    for g in groups if g.name in untrained)
    return score_lines(cells, matrices, float(len(test.probes) * len(test.gallery)), embedded)


def _trained_embeddings(group: Group, sets: Sequence[tuple[float, bool]], folds: int = 0) -> float:
    """Image embeddings a trained group not yet trained will compute: each fold model its held-out set, and every
    fold model val and test (`sets`: (images, shared by all models) per split)."""
    models = folds or sum(1 for k in group.sources if k is not None) or 1
    return sum(n * (models if shared else 1) for n, shared in sets)


def score_lines(cells: float, matrices: int, test_cells: float, embedded: float = 0.0) -> list[Work]:
    """The scoring stage (its time follows the image embeddings it computes, most of its work; its bytes are their
    caches), its score matrices (bytes only) and, when anything is scored (a new choice), the submission's work."""
    if cells <= 0:
        return []
    return [Work("embed", embedded, "score and choose", shown=f"{embedded:,.0f} image embeddings"),
            Work("score", cells, "score matrices", shown=f"{matrices:,} matrices, {cells / 1e6:,.2f}M cells",
                 timed=False),
            Work("submit", test_cells, "submission and report", shown=f"{test_cells / 1e6:,.2f}M cells")]


def synthetic_splits(cfg: SynthConfig, n_folds: int) -> list[tuple[float, float]]:
    """(probes, gallery faces) each split of a synthetic config is expected to have: one probe member a family, the
    gallery every photo of the others; the out-of-fold protocols over the training families' folds."""
    members, photos = (cfg.min_members + cfg.max_members) / 2, (cfg.min_images + cfg.max_images) / 2
    sizes = [cfg.n_train / n_folds] * n_folds if n_folds > 1 else []
    sizes += [n for n in (cfg.n_val, cfg.n_test) if n]
    return [(n, n * (members - 1) * photos) for n in sizes]


def synthetic_work(cfg: SynthConfig, runs: Sequence[Run], groups: Sequence[Group], n_folds: int,
                   known: Mapping[str, dict]) -> list[Work]:
    """Everything a run on synthetic data not yet generated builds: the data, each frozen network's pass over every
    image, every run, every variant's matrix on every split, the submission."""
    images = expected_images(cfg)
    frozen = {id(s): (s, images) for g in groups if isinstance(s := g.sources.get(None), BackboneSource)}
    splits = synthetic_splits(cfg, n_folds)
    variants = sum(len(g.variants) for g in groups)
    oof = n_folds if n_folds > 1 else 0  # the splits the choice is made on keep every matrix, the others a blend's
    cells = variants * sum(p * n for p, n in splits[:oof]) + min(variants, POOL) * sum(p * n for p, n in splits[oof:])
    sets = [(expected_images(cfg, cfg.n_train), False)] + [(expected_images(cfg, n), True)
                                                            for n in (cfg.n_val, cfg.n_test) if n]
    trained = {r.cfg.name for r in runs}

    def embeddings(g: Group) -> float:  # a frozen network's come from its feature cache: nothing new on disk
        if g.name in trained:
            return _trained_embeddings(g, sets, n_folds)
        return 0.0 if isinstance(g.sources.get(None), BackboneSource) else images

    embedded = sum(embeddings(g) for g in groups)
    return [data_work(cfg), *feature_work(frozen), *train_work(runs, expected_images(cfg, cfg.n_train), known),
            *score_lines(cells, variants * len(splits), splits[-1][0] * splits[-1][1], embedded)]
