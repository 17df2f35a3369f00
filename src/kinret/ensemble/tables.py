"""The variant table: one row per variant (and per chosen, cross-fitted or chance line), metrics per split group and
the paired-bootstrap interval of each row's Average against what it is compared with, as a pandas DataFrame;
written as CSV and as markdown with a column legend and the chance level of every split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from kinret.ensemble.settings import EVERY_VARIANT_PAIRS

METRICS = ("average", "mAP", "mAP_trapezoid", "rank1", "rank5", "rank10")
GROUPS = ("oof", "val", "test")
CHANCE_ROW = "random ranking (expected)"
GROUP_NAMES = {"oof": "out of fold (the fold protocols pooled)", "val": "val", "test": "test"}


# what a variant's scores are, by the similarity part of its name (longest prefix first): the report's score axis
SCORE_SCALES = {
    "cos-": "cosine similarity of the embeddings, -1 to 1",
    "dba10-clus-div5-": "cosine after gallery averaging, mixed with the face's identity cluster, 5 identities on top",
    "dba10-": "cosine after each gallery face is averaged with its 10 nearest (DBA), -1 to 1",
    "qe5-": "cosine after each probe is expanded with its 5 best faces, -1 to 1",
    "clus-div5-": "cosine mixed with the face's identity cluster, the first 5 places on 5 identities",
    "dsm-": "dual softmax: log of (softmax over the gallery x softmax over the probes), at most 0 (0: certain)",
    "sink-": "Sinkhorn: log of the probe's share of the face, each probe an equal share of the gallery",
    "rerank": "FC head logit on the cosine top N, every other face below them",
    "fc-": "FC head kin logit (higher: more likely kin)",
}


def score_scale(weights: Mapping[str, float], normalisation: str = "z") -> str:
    """What the chosen scores are (a blend's or one variant's), for an axis label."""
    if len(weights) > 1:
        return f"blend: weighted sum of each variant's per-probe {'z-scores' if normalisation == 'z' else 'ranks'}"
    variant = next(iter(weights))
    label = variant.split(":", 1)[1] if ":" in variant else ""
    found = next((text for prefix, text in sorted(SCORE_SCALES.items(), key=lambda x: -len(x[0]))
                  if label.startswith(prefix)), "as the external score matrix gives them" if not label else "")
    return found or "the variant's similarity"


def variant_table(results: dict[str, dict[str, dict[str, float]]],
                  intervals: Mapping[str, tuple[str, dict[str, dict[str, float]]]] | None = None) -> pd.DataFrame:
    """results: row name -> split group ("oof", "val", "test") -> metrics; one row per name, columns `variant` and
    `{group}_{metric}` in METRICS order (absent metrics are NaN). intervals: row name -> (what it is compared with,
    group -> {"delta", "lo", "hi"}), giving columns `against` and `{group}_delta`, `_delta_lo`, `_delta_hi`."""
    rows = []
    for name, by_split in results.items():
        row: dict[str, object] = {"variant": name}
        for group, metrics in by_split.items():
            row.update({f"{group}_{m}": metrics[m] for m in METRICS if m in metrics})
        if intervals and name in intervals:
            against, by_group = intervals[name]
            row["against"] = against
            for group, iv in by_group.items():
                row.update({f"{group}_delta": iv["delta"], f"{group}_delta_lo": iv["lo"],
                            f"{group}_delta_hi": iv["hi"]})
        rows.append(row)
    return pd.DataFrame(rows)


def summary_columns(table: pd.DataFrame) -> list[str]:
    """`variant` and Average, mAP, Rank@5 of every labelled split group: the columns a reader compares."""
    labelled = [g for g in GROUPS if f"{g}_average" in table and table[f"{g}_average"].notna().any()]
    return ["variant"] + [f"{g}_{m}" for g in labelled for m in ("average", "mAP", "rank5")]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4f}"
    return str(value)


def to_markdown(table: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A markdown table of `columns` (default: all), floats to 4 decimals, missing values empty."""
    cols = list(columns or table.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table[cols].itertuples(index=False)]
    return "\n".join(out) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False, float_format="%.4f", lineterminator="\n")


def interval_text(delta: float, lo: float, hi: float) -> str:
    """"+0.034 [+0.010, +0.058]"; empty when there is no interval."""
    return "" if pd.isna(delta) else f"{delta:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def delta_column(table: pd.DataFrame, group: str, reference: str = "") -> pd.Series:
    """The `{group}` interval of each row as text (empty where there is none; "reference" on the reference's row)."""
    cols = [f"{group}_delta", f"{group}_delta_lo", f"{group}_delta_hi"]
    return pd.Series(["reference" if v == reference else interval_text(d, lo, hi)
                      for v, d, lo, hi in table[["variant", *cols]].itertuples(index=False)], index=table.index)


def split_sizes_markdown(chance: pd.DataFrame) -> str:
    """The splits (`chance`: split, probes, gallery, mAP, rank5, average of a random ranking) as a markdown table."""
    out = ["| split | probes | gallery faces | chance Average | chance mAP | chance Rank@5 |", "|---" * 6 + "|"]
    out += [f"| {r.split} | {r.probes} | {r.gallery} | {r.average:.4f} | {r.mAP:.4f} | {r.rank5:.4f} |"
            for r in chance.itertuples(index=False)]
    return "\n".join(out) + "\n"


def noise_text(table: pd.DataFrame, chance: pd.DataFrame | None, key: str) -> str:
    """How many probes the `key` intervals rest on and how wide they are here (the median half-width), e.g. "120
    probes scored here, intervals about ±0.041 wide"; empty when neither is known."""
    probes = None
    if chance is not None and len(chance):
        rows = chance[chance["split"] == key]
        probes = int(rows["probes"].iloc[0]) if len(rows) == 1 else None
    cols = [f"{key}_delta_lo", f"{key}_delta_hi"]
    half = (table[cols[1]] - table[cols[0]]).dropna() / 2 if all(c in table for c in cols) else pd.Series([])
    bits = [f"{probes:,} probes scored here" if probes else "",
            f"intervals about ±{half.median():.3f} wide" if len(half) else ""]
    return ", ".join(b for b in bits if b)


def legend(key: str, reference: str, n_boot: int | None, noise: str = "") -> list[str]:
    """The column legend under the variant table; `noise` (see `noise_text`) says how wide the intervals are."""
    boot = f"{n_boot} " if n_boot else ""
    return [
        "Columns: `{split}_average` = (mAP + Rank@5) / 2, the leaderboard number; `_mAP` = mean over probes of the "
        "standard AP (a probe without relatives counts 0); `_rank5` = share of probes with a relative among the top "
        "5 gallery faces. Split groups: `oof` = out of fold, every fold's held-out families scored by the model that "
        "never saw them, pooled (what the choice is made on); `val` = the labelled val split; `test` = the test split "
        "when its truth is known (never used to choose).",
        f"`{key} Δ [95%]` = this row's {GROUP_NAMES.get(key, key)} Average minus that of what it is compared with "
        f"(`{reference}` for every variant and the chosen line; the cross-fitted best single variant for the "
        f"cross-fitted blend line), with the 95% percentile interval of {boot}paired bootstrap resamples of the probes "
        "(within each fold out of fold). An interval that includes 0 is no evidence of a difference"
        + (f": {noise}." if noise else "."),
        f"`{CHANCE_ROW}`: what a uniformly random ranking expects (closed form, standard AP).",
    ]


def variants_markdown(table: pd.DataFrame, chance: pd.DataFrame | None = None, reference: str = "",
                      key: str = "oof", n_boot: int | None = None, narrowed: Sequence[str] = ()) -> str:
    """The variant table as markdown (summary columns, then the `{key}` interval), its legend, and the splits with
    their sizes and chance level; `narrowed`, the splits where only the chosen variants and the reference were
    scored (their cells empty for the others), said under the table."""
    view = table[summary_columns(table)].copy()
    if f"{key}_delta" in table:
        view[f"{key} Δ [95%]"] = delta_column(table, key, reference)
    parts = [to_markdown(view)]
    if narrowed:
        parts += [f"On {', '.join(narrowed)}, only the chosen variant(s) and the reference were scored "
                  f"(`--score-others auto` scores every variant only on a split of at most "
                  f"{EVERY_VARIANT_PAIRS / 1e6:.0f} million probe x gallery pairs; `--score-others every` scores them "
                  "all): the other rows' cells there are empty.\n"]
    if reference:
        parts += ["\n".join(legend(key, reference, n_boot, noise_text(table, chance, key))) + "\n"]
    if chance is not None and len(chance):
        parts += ["Splits, with the scores a random ranking expects on each. Splits differ in gallery size and in "
                  "relatives per probe, so scores on different splits are not comparable: compare variants within "
                  "one column, and each split against its own chance level.\n", split_sizes_markdown(chance)]
    return "\n".join(parts)
