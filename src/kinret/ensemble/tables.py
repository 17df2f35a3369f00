"""The variant table: one row per variant (and per chosen or cross-fitted line), metrics per split group, as a
pandas DataFrame; written as CSV and as markdown."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

METRICS = ("average", "mAP", "mAP_trapezoid", "rank1", "rank5", "rank10")
GROUPS = ("oof", "val", "test")


def variant_table(results: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """results: row name -> split group ("oof", "val", "test") -> metrics; one row per name, columns `variant` and
    `{group}_{metric}` in METRICS order (absent metrics are NaN)."""
    rows = []
    for name, by_split in results.items():
        row: dict[str, object] = {"variant": name}
        for group, metrics in by_split.items():
            row.update({f"{group}_{m}": metrics[m] for m in METRICS if m in metrics})
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
