"""The ensemble run: score every variant on the splits the choice is made on (their matrices kept: the blend's
search reads them), choose the best variant or a blend, then score every variant on the other splits (evaluated on
the labelled ones, only the chosen variants' matrices kept), and write the variant table; plus the dry-run plan of
what is still to build. One matrix is held at a time (`kinret.scoring.variants.score_group`); the choice, the blend,
the report and the submission read back what they need (`EnsembleResult.scores`, `.chosen`)."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kinret.data.layout import DataLayout
from kinret.data.track3 import write_labelled
from kinret.ensemble.bootstrap import average_terms, paired_intervals
from kinret.ensemble.chosen import (
    ByVariant,
    ChosenScores,
    blend_kept,
    choice_key,
    keep_blend,
    read_choice,
    write_choice,
)
from kinret.ensemble.discovery import discover_groups, filter_groups, fold_plan
from kinret.ensemble.selection import Scorer, Selection, pooled, select
from kinret.ensemble.settings import EnsembleSettings
from kinret.ensemble.tables import CHANCE_ROW, to_csv, variant_table, variants_markdown
from kinret.errors import KinretInputError
from kinret.features.sources import ExternalEmbeddings, ImageSet
from kinret.io import atomic_path, write_text_atomic
from kinret.log import progress
from kinret.metrics import chance_level
from kinret.readback import DamagedFile, read_npz
from kinret.scoring.protocols import SplitData, build_splits, split_group
from kinret.scoring.store import load_scores, safe_name, write_kept
from kinret.scoring.variant_kinds import Cosine
from kinret.scoring.variants import Group, Keep, SplitScores, missing_scores, score_group, variant_name
from kinret.train.experiments import Run, experiment_runs, scoped_overrides

log = logging.getLogger("kinret.ensemble")
CHOICE_SETTINGS = ("choose", "normalise", "max_steps", "blend_pool", "bootstrap")  # what `select` is given
REFERENCES = (variant_name("sface", Cosine("native", "meanemb")),  # zero-shot SFace
              variant_name("raw_pixels", Cosine("pixels", "meanemb")))  # else raw pixels


@dataclass
class EnsembleResult:
    splits: dict[str, SplitData]
    scores: Mapping[str, Mapping[str, np.ndarray]]  # split -> variant -> (P, N), read from the store when asked for
    selection: Selection
    table: pd.DataFrame  # one row per variant (and the chosen, cross-fitted and chance lines), metrics per split group
    chosen: Mapping[str, np.ndarray]  # split -> the chosen (P, N) scores, combined when asked for
    settings: EnsembleSettings = EnsembleSettings()  # the options the choice was made with
    per_probe: pd.DataFrame = field(default_factory=pd.DataFrame)  # every variant's per-probe results, every split
    chance: pd.DataFrame = field(default_factory=pd.DataFrame)  # each labelled split's size and chance level
    key: str = "oof"  # the split group the choice was made on
    narrowed: tuple[str, ...] = ()  # labelled splits where only the chosen variants and the reference were scored

    @property
    def table_md(self) -> str:
        """The variant table with its interval column, legend and the splits' chance levels, as markdown."""
        return variants_markdown(self.table, self.chance, self.selection.reference, self.key, self.settings.bootstrap,
                                 self.narrowed)


def choice_splits(splits: dict[str, SplitData]) -> list[str]:
    """The splits the choice is made on: the out-of-fold protocols, else val when labelled, else none."""
    return [n for n in splits if splits[n].fold is not None] or [
        n for n in ("val",) if n in splits and splits[n].labels is not None]


def score_splits(groups: list[Group], splits: dict[str, SplitData], names: Sequence[str], scores_dir: Path,
                 scorers: dict[str, Scorer], keep: Keep) -> dict[str, dict[str, pd.DataFrame]]:
    """Every variant scored on the splits `names`, one matrix at a time (`score_group`), evaluated on the labelled
    ones and kept as `keep` says; returns variant -> split -> per-probe results. A progress line at least once a
    minute counts the matrices."""
    work = [(g, splits[n]) for g in groups for n in names]
    stream = ((sd.name, v, results) for g, sd in work
              for v, results in score_group(g, sd, scores_dir, scorers[sd.name].per_probe if sd.name in scorers
                                            else None, keep))
    found: dict[str, dict[str, pd.DataFrame]] = {}
    desc = f"score {', '.join(names)}"
    for name, v, results in progress(stream, desc=desc, total=sum(len(g.variants) for g, _ in work),
                                     unit="matrix"):
        if results is not None:
            found.setdefault(v, {})[name] = results
    return found


def others_by_scope(groups: list[Group], splits: dict[str, SplitData], chooser: Sequence[str],
                    settings: EnsembleSettings, wanted: Sequence[str]) -> list[tuple[list[str], list[str] | None]]:
    """The splits the choice is not made on, by what is scored there: (names, None) every variant; (names, the
    variants) where `settings.score_others` narrows a labelled split to `wanted` (the chosen and the reference)."""
    every, few = [], []
    for name, sd in splits.items():
        if name in chooser:
            continue
        probes, gallery = len(sd.split.probes), len(sd.split.gallery)
        if sd.labels is None or settings.scores_every_variant(probes, gallery):
            every.append(name)
            continue
        few.append(name)
        n = sum(len(g.variants) for g in groups)
        log.info("%s: %d probes x %s gallery faces (%.1f million pairs, --score-others %s): scoring the chosen "
                 "variant(s) and the reference there, not all %d variants (--score-others every scores them all)",
                 name, probes, f"{gallery:,}", probes * gallery / 1e6, settings.score_others, n)
    scored = list(dict.fromkeys(v for v in wanted if v))
    return [(names, s) for names, s in ((every, None), (few, scored)) if names]


def pending_embeddings(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path
                       ) -> list[tuple[object, ImageSet]]:
    """(source, image set) of every embedding a missing score matrix needs, each pair once, in one fixed order."""
    out, seen = [], set()
    for g in groups:
        for sd in splits.values():
            if missing_scores(g, sd, scores_dir):
                for source in g.sources_for(sd):
                    if (id(source), sd.images.label) not in seen:
                        seen.add((id(source), sd.images.label))
                        out.append((source, sd.images))
    return out


def embed_missing(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path) -> None:
    """Compute the embeddings behind every missing score matrix, source by source in one fixed order: run by every
    process under torchrun, each computing its share of each cache's chunks."""
    for source, images in pending_embeddings(groups, splits, scores_dir):
        source.embeddings(images)


def chance_table(splits: dict[str, SplitData]) -> pd.DataFrame:
    """Every labelled split's probes, gallery faces and the mAP, Rank@5 and Average a random ranking expects; and,
    with several out-of-fold protocols, their pool "oof" (probe-weighted means: the expectations are per probe)."""
    rows = []
    for name, sd in splits.items():
        if sd.labels is not None:
            c = chance_level(sd.labels.probe_fids, sd.labels.gallery_fids, (5,))
            rows.append({"split": name, "probes": len(sd.labels.probes), "gallery": len(sd.labels.gallery),
                         "mAP": c["mAP"], "rank5": c["rank@5"], "average": c["average"]})
    table = pd.DataFrame(rows, columns=["split", "probes", "gallery", "mAP", "rank5", "average"])
    oof = table[table["split"].map(split_group) == "oof"]
    if len(oof) > 1:
        weights = oof["probes"] / oof["probes"].sum()
        pool = {"split": "oof", "probes": int(oof["probes"].sum()), "gallery": "/".join(map(str, oof["gallery"]))}
        pool |= {m: float((oof[m] * weights).sum()) for m in ("mAP", "rank5", "average")}
        table = pd.concat([table, pd.DataFrame([pool])], ignore_index=True)
    return table


def pick_reference(variants: Sequence[str], asked: str | None, fallback: str) -> str:
    """The variant every other is compared with: `asked` (must be a variant), else zero-shot SFace, else the
    raw-pixel baseline, else `fallback`."""
    if asked:
        if asked not in variants:
            raise KinretInputError(None, f"--reference {asked!r} is not a variant of this run; it has "
                                         f"{', '.join(list(variants)[:8])}{', ...' if len(variants) > 8 else ''}")
        return asked
    return next((v for v in REFERENCES if v in variants), fallback)


def reference_intervals(pp: dict[str, dict[str, pd.DataFrame]], reference: str, n_boot: int, seed: int = 0
                        ) -> dict[str, dict[str, dict[str, float]]]:
    """row -> split group -> the paired-bootstrap interval of the row's Average minus the reference's on that
    group's probes (resampled within each split); every row against the same resamples (on a group where only some
    variants were scored, those rows)."""
    out: dict[str, dict[str, dict[str, float]]] = {r: {} for r in pp}
    for group in dict.fromkeys(split_group(n) for n in pp[reference]):
        names = [n for n in pp[reference] if split_group(n) == group]
        rows = [r for r in pp if all(n in pp[r] for n in names)]  # a narrowed split: the variants scored there
        strata = np.concatenate([[n] * len(pp[reference][n]) for n in names])
        terms = [np.concatenate([average_terms(pp[r][n]["ap"], pp[r][n]["first"]) for n in names]) for r in rows]
        found = paired_intervals(np.column_stack(terms), terms[rows.index(reference)], strata, n_boot, seed)
        for r, iv in zip(rows, found.itertuples(index=False), strict=True):
            out[r][group] = {"delta": iv.delta, "lo": iv.lo, "hi": iv.hi}
    return out


def per_probe_long(pp: dict[str, dict[str, pd.DataFrame]], splits: dict[str, SplitData]) -> pd.DataFrame:
    """One row per (row name, split, probe): variant, split, group, probe (row index), probe_id, then the results."""
    frames = [df.assign(variant=v, split=n, group=split_group(n), probe=np.arange(len(df)),
                        probe_id=splits[n].probe_ids) for v, by_split in pp.items() for n, df in by_split.items()]
    if not frames:
        return pd.DataFrame()
    long = pd.concat(frames, ignore_index=True)
    long["first"] = long["first"].astype("Int64")  # NaN (no relative) stays empty
    front = ["variant", "split", "group", "probe", "probe_id"]
    return long[front + [c for c in long.columns if c not in front]]


def write_per_probe(path: Path, table: pd.DataFrame) -> Path:
    """`table` as gzip-compressed CSV, byte-identical for identical results (no time stamp), written atomically."""
    text = table.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    return Path(path)


def _choose(scores, scorers, pp, chooser, variants, settings: EnsembleSettings, scores_dir: Path
            ) -> tuple[Selection, str]:
    if not chooser:
        log.warning("nothing labelled to choose on (no DATA/train folds, no DATA/val): taking the first variant")
        return Selection(f"best_{safe_name(variants[0])}", {variants[0]: 1.0}, settings.normalise, variants[0],
                         reason="the first variant: nothing labelled to choose on"), "oof"
    made_with = {k: v for k, v in settings.to_dict().items() if k in CHOICE_SETTINGS}
    key = choice_key(scores, chooser, variants, made_with)
    sel = read_choice(scores_dir, key)  # a rerun on the same matrices and settings: the same choice, read back
    if sel is None:
        sel = select({v: ByVariant(scores, v, chooser) for v in variants}, {n: scorers[n] for n in chooser},
                     settings.choose, settings.normalise, settings.max_steps, settings.blend_pool, settings.bootstrap,
                     per_probe={v: {n: pp[v][n] for n in chooser} for v in variants})
        write_choice(scores_dir, key, sel)
    return sel, split_group(chooser[0])


def run_ensemble(groups: list[Group], splits: dict[str, SplitData], settings: EnsembleSettings, scores_dir: Path,
                 out_dir: Path | None) -> EnsembleResult:
    """Score every variant on the splits the choice is made on, choose as `settings` say, score every variant on the
    other splits (keeping the chosen variants' matrices), evaluate; then (all inputs checked) write the table,
    per_probe.csv.gz and selection.json (the choice and the settings it was made with) into `out_dir`."""
    if settings.reference:  # a misspelt name fails before any scoring
        pick_reference([v for g in groups for v in g.variants], settings.reference, "")
    if not groups:
        raise KinretInputError(None, "no variants to score: give experiments, keep raw_pixels or add external variants")
    variants = [v for g in groups for v in g.variants]
    scorers = {n: Scorer(sd.labels.probe_fids, sd.labels.gallery_fids) for n, sd in splits.items()
               if sd.labels is not None}
    scores = {n: SplitScores(groups, sd, scores_dir) for n, sd in splits.items()}
    chooser = choice_splits(splits)
    found = score_splits(groups, splits, chooser, scores_dir, scorers, Keep())
    sel, key = _choose(scores, scorers, found, chooser, variants, settings, scores_dir)
    reference = pick_reference(variants, settings.reference, sel.best_single) if scorers else ""
    single = next(iter(sel.weights)) if len(sel.weights) == 1 else None
    others = [n for n in splits if n not in chooser]
    keep = Keep(False, frozenset(sel.weights), frozenset([single] if single else []),
                combined=frozenset(n for n in others if blend_kept(scores[n], sel)))
    narrowed = {}
    for names, scored in others_by_scope(groups, splits, chooser, settings, [*sel.weights, reference]):
        if scored is not None:
            narrowed.update({n: scored for n in names})
        for v, by_split in score_splits(filter_groups(groups, scored), splits, names, scores_dir, scorers,
                                        keep).items():
            found.setdefault(v, {}).update(by_split)
    blended = [n for n in others if keep_blend(scores[n], sel)]  # kept combined, not variant by variant
    write_kept(scores_dir, chooser, [] if blended else list(sel.weights), sorted(keep.ranks_only), narrowed)
    pp = {v: {n: found[v][n] for n in scorers if n in found.get(v, {})} for v in variants}
    chosen = ChosenScores(scores, sel)
    chosen_row = f"chosen: {sel.name}"
    pp[chosen_row] = {n: pp[single][n] if single else scorers[n].per_probe(chosen[n]) for n in scorers}
    intervals: dict[str, tuple[str, dict[str, dict[str, float]]]] = {}
    if scorers:
        against = reference_intervals(pp, reference, settings.bootstrap)
        intervals = {r: (reference, by_group) for r, by_group in against.items()}
        sel = sel.with_reference(reference, {v: against[v][key] for v in variants if key in against[v]})
    if sel.gain:
        intervals["blend (cross-fitted out-of-fold)"] = ("best single (cross-fitted out-of-fold)", {"oof": sel.gain})
    chance = chance_table(splits)
    result = EnsembleResult(splits, scores, sel, _table(pp, sel, variants, key, intervals, chance), chosen, settings,
                            per_probe_long(pp, splits), chance, key, tuple(narrowed))
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def _table(pp: dict[str, dict[str, pd.DataFrame]], sel: Selection, variants: list[str], key: str,
           intervals: dict[str, tuple[str, dict[str, dict[str, float]]]], chance: pd.DataFrame) -> pd.DataFrame:
    """The variant table: the chosen line, the cross-fitted lines, every variant (best first on `key`), and the
    chance line (each group's expected scores under a random ranking)."""
    def metrics(by_split: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
        groups = dict.fromkeys(split_group(n) for n in by_split)
        return {g: pooled([df for n, df in by_split.items() if split_group(n) == g]) for g in groups}

    chosen_row = f"chosen: {sel.name}"
    results = {chosen_row: metrics(pp[chosen_row])}
    for label, m in sel.crossfit.items():
        results[f"{label} (cross-fitted out-of-fold)"] = {"oof": m}
    per_variant = {v: metrics(pp[v]) for v in variants}
    for v in sorted(variants, key=lambda v: -per_variant[v].get(key, {}).get("average", 0.0)):
        results[v] = per_variant[v]
    groups = dict.fromkeys(split_group(n) for n in chance["split"])
    by_group = {g: chance[chance["split"] == g] if (chance["split"] == g).any()
                else chance[chance["split"].map(split_group) == g] for g in groups}
    results[CHANCE_ROW] = {g: rows.iloc[0][["mAP", "rank5", "average"]].astype(float).to_dict()
                           for g, rows in by_group.items() if len(rows) == 1}
    return variant_table(results, intervals)


def write_outputs(result: EnsembleResult, out_dir: Path) -> None:
    """The protocols' id lists, variants.csv and .md, per_probe.csv.gz and selection.json, each atomically."""
    for name, sd in result.splits.items():  # the ids external score matrices must carry, per split
        if sd.split.labelled:
            write_labelled(sd.split, out_dir / "protocols" / name)
    write_text_atomic(out_dir / "variants.csv", to_csv(result.table))
    write_text_atomic(out_dir / "variants.md", result.table_md)
    if len(result.per_probe):
        write_per_probe(out_dir / "per_probe.csv.gz", result.per_probe)
    write_text_atomic(out_dir / "selection.json", result.selection.to_json(result.settings.to_dict()))


def prepare(settings: EnsembleSettings, layout: DataLayout, runs_dir: Path, ensemble_dir: Path
            ) -> tuple[list[Run], dict[str, SplitData], list[Group]]:
    """The runs of the settings' experiments on this data, the splits they are scored on (one fold plan for all),
    and the groups of variants (narrowed to `settings.variants`)."""
    scoped = scoped_overrides(settings.experiments, settings.overrides)
    runs = [r for exp in settings.experiments for r in experiment_runs(exp, layout.root, runs_dir, scoped[exp])[1]]
    n_folds, fold_seed = fold_plan(runs)
    splits = build_splits(layout, n_folds, fold_seed, settings.protocol_seed)
    groups = discover_groups(runs, runs_dir / "_cache", ensemble_dir / "external", settings.raw_pixels,
                             settings.top_n, settings.fc_all)
    groups = [g for g in groups if _covers_this_data(g, splits, ensemble_dir)]
    return runs, splits, filter_groups(groups, settings.variants)


def _covers_this_data(group: Group, splits: dict[str, SplitData], ensemble_dir: Path) -> bool:
    """Whether an external group belongs to this run's data (any other group does). Every folder of
    `ensemble_dir/external/` joins every run of that ensemble folder, whatever its data: one whose embeddings cover
    none of the run's images (or whose score matrices match none of its splits) was made for other data, and is
    left out with a warning; embeddings covering some of the images but not all stop the run, naming the file."""
    source = group.sources.get(None)
    if isinstance(source, ExternalEmbeddings):
        try:
            have = set(read_npz(source.path, ("image_ids",))["image_ids"].astype(str).tolist())
        except (DamagedFile, ValueError):
            return True  # a malformed file: its own error names it when it is read
        need = {name: [i for i in sd.images.ids if i not in have] for name, sd in splits.items()}
        if all(len(missing) == len(splits[name].images.ids) for name, missing in need.items()):
            return _left_out(source.path.parent, "its embeddings.npz covers none of this run's images")
        name, missing = next(((n, m) for n, m in need.items() if m), ("", []))
        if missing:
            raise KinretInputError(source.path, f"no embedding for {len(missing)} image(s) of the {name} set, e.g. "
                                                f"{missing[0]!r}; every folder of {ensemble_dir / 'external'} joins "
                                                "every run of that ensemble folder: move one made for other data out "
                                                "of it (or give this run its own --ensemble-dir)")
    elif group.scores_dir is not None:
        if not any(_same_ids(group.scores_dir / f"{name}.npy", sd) for name, sd in splits.items()):
            return _left_out(group.scores_dir, "none of its score matrices is for this run's splits")
    return True


def _same_ids(path: Path, sd: SplitData) -> bool:
    try:
        load_scores(path, sd.probe_ids, sd.gallery_ids)
    except KinretInputError:
        return False
    return True


def _left_out(folder: Path, why: str) -> bool:
    log.warning("%s left out: %s (it was made for other data; external folders join every run of their ensemble "
                "folder)", folder, why)
    return False


def plan(groups: list[Group], splits: dict[str, SplitData], scores_dir: Path, todo: Sequence[tuple[Run, str]]
         ) -> list[str]:
    """The stages a run would build, one line each (what `--dry-run` prints); `todo` are the unfinished runs."""
    lines = [f"train  {r.run_dir} ({state})" for r, state in todo]
    untrained = {r.cfg.name for r, _ in todo}
    for g in groups:
        if g.name in untrained:
            lines.append(f"score  {g.name}: {len(g.variants)} variant(s) x {len(splits)} split(s), after training")
            continue
        for name, sd in splits.items():
            miss = missing_scores(g, sd, scores_dir)
            if miss:
                lines.append(f"score  {g.name} on {name}: {len(miss)} of {len(g.variants)} matrices to build")
    lines.append("select choose the best variant or blend on the out-of-fold scores; write the table")
    lines.append("submit write predictions.csv and the zip named after the choice")
    return lines
