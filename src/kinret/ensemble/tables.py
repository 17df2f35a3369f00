"""The variant table: one row per variant (and per chosen, cross-fitted or chance line), metrics per split group and
the paired-bootstrap interval of each row's Average against what it is compared with, as a pandas DataFrame;
written as CSV and as markdown with a column legend and the chance level of every split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

METRICS = ("average", "mAP", "mAP_trapezoid", "rank1", "rank5", "rank10")
GROUPS = ("oof", "val", "test")
CHANCE_ROW = "random ranking (expected)"
GROUP_NAMES = {"oof": "out of fold (the fold protocols pooled)", "val": "val", "test": "test"}


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


def legend(key: str, reference: str, n_boot: int | None) -> list[str]:
    """The column legend under the variant table."""
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
        "(within each fold out of fold). An interval that includes 0 is no evidence of a difference: with ~190 "
        "probes, differences under ~0.03 are usually noise.",
        f"`{CHANCE_ROW}`: what a uniformly random ranking expects (closed form, standard AP).",
    ]


def variants_markdown(table: pd.DataFrame, chance: pd.DataFrame | None = None, reference: str = "",
                      key: str = "oof", n_boot: int | None = None) -> str:
    """The variant table as markdown (summary columns, then the `{key}` interval), its legend, and the splits with
    their sizes and chance level."""
    view = table[summary_columns(table)].copy()
    if f"{key}_delta" in table:
        view[f"{key} Δ [95%]"] = delta_column(table, key, reference)
    parts = [to_markdown(view)]
    if reference:
        parts += ["\n".join(legend(key, reference, n_boot)) + "\n"]
    if chance is not None and len(chance):
        parts += ["Splits, with the scores a random ranking expects on each. Splits differ in gallery size and in "
                  "relatives per probe, so scores on different splits are not comparable: compare variants within "
                  "one column, and each split against its own chance level.\n", split_sizes_markdown(chance)]
    return "\n".join(parts)
