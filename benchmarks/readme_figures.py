"""The README's figures, produced by the kit: its Results table and the timings it quotes for the default run,
rendered from a run's own files so that they cannot drift from what the kit does.

    python make_submission.py && cp submissions/synthetic/run.json runs/cold_run.json  # the default, fresh folder
    python make_submission.py                                                          # a rerun, all cached
    python benchmarks/readme_figures.py --run . --cold runs/cold_run.json --warm submissions/synthetic/run.json
    python benchmarks/readme_figures.py --run . --cold runs/cold_run.json --warm submissions/synthetic/run.json \
        --write README.md   # or --check README.md

`--run` is the folder `python make_submission.py` ran in (its `--out` and `--ensemble-dir` defaults: the data set's
`submissions/{data set}/` and `ensemble/{data set}/`, found as the one data set there, or `synthetic`): the table comes
from `variants.csv`, the choice, its intervals and the blend's cross-fitted gain from `selection.json`, each split's
probe count from `per_probe.csv.gz`, the gallery sizes, the machine and every stage's wall time from `run.json` (or
`--cold`, that file as the run from a fresh folder left it; `--warm`, as a rerun left it), the synthetic data's size
from the data folder's `synth_config.json`. A choice made at the edge (the blend's cross-fitted gain with the lower
end of its interval within `EDGE` of 0) is said to be one that another CPU may not make. In the README each figure
sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`
(NAME: results, timings); `--check` exits 1 when they differ from the run's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kinret.io import write_text_atomic

WIDTH = 116
CHANCE_ROW = "random ranking (expected)"
# what the similarity part of a variant's name is, in words (longest prefix first)
KINDS = {"cos-": "plain cosine", "dba10-clus-div5-": "DBA, clusters + diverse head", "dba10-": "DBA",
         "qe5-": "query expansion", "clus-div5-": "clusters + diverse head", "dsm-": "dual softmax over probes",
         "sink-": "Sinkhorn", "rerank": "the FC head, re-ranking", "fc-": "the FC head over every pair"}
REFERENCES = {"sface:cos-native-meanemb": "zero-shot SFace", "raw_pixels:cos-pixels-meanemb": "raw pixels"}


def fragment_marks(name: str) -> tuple[str, str]:
    return f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"


def kind(variant: str) -> str:
    label = variant.split(":", 1)[1] if ":" in variant else ""
    return next((text for prefix, text in sorted(KINDS.items(), key=lambda x: -len(x[0])) if label.startswith(prefix)),
                "external scores")


# A choice whose cross-fitted blend gain has the lower end of its interval this close to 0 may go the other way on
# another CPU: the same default run's lower end was -0.003 on one machine and +0.004 on two others (docs/decisions.md,
# "The default's choice across CPUs").
EDGE = 0.01


def data_set(run_dir: Path) -> str:
    """The data set whose submission the run folder holds: the only folder of submissions/ with a run.json, else
    the synthetic default's."""
    found = sorted(p.parent.name for p in (Path(run_dir) / "submissions").glob("*/run.json"))
    return found[0] if len(found) == 1 else "synthetic"


def load_run(run_dir: Path, out: str | None = None, ensemble: str | None = None, cold: Path | None = None) -> dict:
    """The files of the run in `run_dir` that the figures are made of (`out`, `ensemble`: relative to it, default
    the data set's own folders)."""
    run_dir = Path(run_dir)
    out = out or f"submissions/{data_set(run_dir)}"
    ensemble = ensemble or f"ensemble/{data_set(run_dir)}"
    record = json.loads((Path(cold) if cold else run_dir / out / "run.json").read_text())
    root = Path(record["data"]["root"])
    synth = (root if root.is_absolute() else run_dir / root) / "synth_config.json"
    return {"table": pd.read_csv(run_dir / ensemble / "variants.csv"),
            "selection": json.loads((run_dir / out / "selection.json").read_text()),
            "per_probe": pd.read_csv(run_dir / ensemble / "per_probe.csv.gz", usecols=["variant", "split", "probe"]),
            "record": record, "synth": json.loads(synth.read_text()) if synth.is_file() else None}


def shown_rows(table: pd.DataFrame, selection: dict) -> list[tuple[str, str]]:
    """(variant, label) of the rows the README shows: the chosen line, the cross-fitted blend and best single
    variant, the best variant of each group (what was trained or computed alike), the reference and the chance line;
    each group in the table's order (best out of fold first)."""
    names = table["variant"].astype(str).tolist()
    chosen = f"chosen: {selection['name']}"
    spread = choice_spread(selection)
    rows = [(chosen, f"chosen here: `{selection['name']}`" + (f" ({spread})" if spread else ""))]
    rows += [(n, n.replace(" (cross-fitted out-of-fold)", " (cross-fitted out of fold)").replace(
        "best single", "best single variant")) for n in names if n.endswith("(cross-fitted out-of-fold)")]
    variants = [n for n in names if n != chosen and "cross-fitted" not in n and n != CHANCE_ROW]
    best: dict[str, str] = {}
    for v in variants:
        best.setdefault(v.split(":", 1)[0], v)
    reference = selection.get("reference") or ""
    picked = list(best.values()) + ([reference] if reference in variants and reference not in best.values() else [])
    for v in sorted(picked, key=names.index):
        note = REFERENCES.get(v, "the reference") if v == reference else kind(v)
        rows.append((v, f"`{v}` ({note})"))
    if CHANCE_ROW in names:
        rows.append((CHANCE_ROW, "a random ranking (expected)"))
    return rows


def choice_spread(selection: dict) -> str:
    """'' or, for a choice made at the edge (`EDGE`), what another CPU may submit instead."""
    gain = selection.get("crossfit_gain") or {}
    if "lo" not in gain or abs(gain["lo"]) >= EDGE:
        return ""
    other = (f"the single variant `{selection['best_single']}`" if selection["name"].startswith("blend")
             else "the blend")
    return f"at the edge: another CPU may submit {other}, see below"


def _cell(value: object) -> str:
    return "" if pd.isna(value) else f"{value:.4f}"


def interval(variant: str, row: pd.Series, selection: dict) -> str:
    """The row's out-of-fold interval against the reference: from selection.json at full precision (the table's
    CSV holds 4 decimals, which would round twice), else the table's."""
    found = selection.get("intervals_vs_reference", {})
    single = list(selection["weights"]) if variant.startswith("chosen: ") else [variant]
    iv = found.get(single[0]) if len(single) == 1 else None
    d, lo, hi = ((iv["delta"], iv["lo"], iv["hi"]) if iv
                 else (row["oof_delta"], row["oof_delta_lo"], row["oof_delta_hi"]))
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def results_table(table: pd.DataFrame, selection: dict) -> str:
    groups = [g for g in ("oof", "val", "test") if f"{g}_average" in table and table[f"{g}_average"].notna().any()]
    names = {"oof": "OOF", "val": "val", "test": "test"}
    cols = [(f"{g}_average", f"{names[g]} Average") for g in groups]
    if "test" in groups:
        cols += [("test_mAP", "test mAP"), ("test_rank5", "test Rank@5")]
    reference = selection.get("reference") or ""
    against = REFERENCES.get(reference, f"`{reference}`")
    head = ["variant", *(label for _, label in cols)] + ([f"OOF Δ vs {against} [95%]"] if reference else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_name = table.set_index(table["variant"].astype(str))
    for variant, label in shown_rows(table, selection):
        row = by_name.loc[variant]
        cells = [label, *(_cell(row.get(c)) for c, _ in cols)]
        if reference:
            if variant == reference:
                cells.append("reference")
            elif "cross-fitted" in variant or pd.isna(row.get("oof_delta")) or row.get("against") != reference:
                cells.append("")
            else:
                cells.append(interval(variant, row, selection))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sizes(run: dict) -> str:
    probes = run["per_probe"].groupby("split")["probe"].nunique()
    gallery = {k: v["gallery"] for k, v in run["record"]["splits"].items()}
    oof = [s for s in probes.index if s.startswith("oof")]
    parts = []
    if oof:
        counts = sorted({int(probes[s]) for s in oof})
        parts.append(f"out of fold: {len(oof)} folds × {'/'.join(f'{c:,}' for c in counts)} probes")
    parts += [f"{s}: {int(probes[s]):,} probes × {gallery[s]:,} gallery faces" for s in ("val", "test")
              if s in probes.index and s in gallery]
    return "; ".join(parts)


def results_fragment(run: dict) -> str:
    """The Results section: what was run, the table, the blend decision and how wide the intervals are."""
    table, sel, rec, synth = run["table"], run["selection"], run["record"], run["synth"]
    data = (f"the synthetic default (seed {synth['seed']}: {synth['n_train']} train, {synth['n_val']} val, "
            f"{synth['n_test']} test families)" if synth else f"`{rec['data']['root']}`")
    intro = (f"Produced by the kit: `python {' '.join(rec['command'])}` on {data}, {rec['cores']} CPU cores "
             f"({rec['date'][:10]}), rendered by `python benchmarks/readme_figures.py` from the run's own files. "
             "The full table is `submissions/synthetic/variants.md`; these rows are its chosen submission, the "
             "cross-fitted comparison, the best variant of each group, the reference and the chance line. "
             f"{_sizes(run).capitalize()} (standard AP). The last column is the out-of-fold Average minus the "
             "reference's, with its paired-bootstrap 95% interval.")
    gain = sel.get("crossfit_gain") or {}
    parts = [textwrap.fill(intro, WIDTH), "", results_table(table, sel), ""]
    if gain:
        d = gain["delta"]
        moved = ("did as well as" if round(d, 3) == 0 else f"gained {d:+.3f} over" if d > 0
                 else f"lost {-d:.3f} against")
        went = "the blend" if sel["name"].startswith("blend") else "the single variant"
        edge = (f" The interval's lower end lies within {EDGE} of 0, where the decision follows the CPU's float "
                "kernels: another CPU may submit the other candidate, whose out-of-fold figures are the cross-fitted "
                "rows and whose single variant is the best row of its group."
                if choice_spread(sel) else "")
        parts.append(textwrap.fill(
            f"Cross-fitted out of fold (both chosen on the other folds), the blend {moved} the best single variant "
            f"(95% interval [{gain['lo']:+.3f}, {gain['hi']:+.3f}]), so {went} was submitted here.{edge} "
            f"{_noise(table)} Galleries differ in size between splits, so compare numbers within a column.", WIDTH))
    return "\n".join(parts)


def _noise(table: pd.DataFrame) -> str:
    v = table[~table["variant"].astype(str).str.contains("cross-fitted|chosen: ") & table["oof_delta"].notna()]
    if not len(v):
        return ""
    half = float(((v["oof_delta_hi"] - v["oof_delta_lo"]) / 2).median())
    clear = int((v["oof_delta_lo"] > 0).sum())
    return (f"The intervals against the reference are about ±{half:.3f} wide: {clear} of {len(v)} variants lie "
            "clear of it.")


def timings_fragment(cold: dict, warm: dict | None = None) -> str:
    """The default run's wall time, from its run.json (and a cached rerun's)."""
    took = cold.get("process_seconds") or cold["seconds"]
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in cold["stages"])
    load = cold.get("load_average")
    text = (f"Measured by the run itself (`submissions/synthetic/run.json`) on {cold['cores']} CPU cores"
            + (f" (load average {load[0]:.1f})" if load else "") + f", {cold['date'][:10]}: {took:.0f} s from a "
            f"fresh folder ({stages}; the rest is Python start-up)")
    if warm:
        text += f"; a rerun with everything cached {warm.get('process_seconds') or warm['seconds']:.0f} s"
    return textwrap.fill(text + ".", WIDTH)


def replace(text: str, fragments: dict[str, str]) -> str:
    """`text` with every fragment between its marks replaced; a missing mark is an error."""
    for name, body in fragments.items():
        start, end = fragment_marks(name)
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), flags=re.S)
        if not pattern.search(text):
            raise SystemExit(f"no {start} ... {end} block to fill")
        block = f"{start}\n{body}\n{end}"
        text = pattern.sub(lambda _, block=block: block, text, count=1)  # a function: no escapes read in `block`
    return text


def stale(text: str, fragments: dict[str, str]) -> list[str]:
    """The names of the fragments whose text in `text` differs from the rendered one."""
    return [name for name in fragments if replace(text, {name: fragments[name]}) != text]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the folder make_submission.py ran in")
    p.add_argument("--out", default=None, help="its --out, relative to --run (default: submissions/{data set})")
    p.add_argument("--ensemble-dir", default=None,
                   help="its --ensemble-dir, relative to --run (default: ensemble/{data set})")
    p.add_argument("--cold", type=Path, default=None, help="the run.json of the run from a fresh folder (default: "
                                                           "--run's own)")
    p.add_argument("--warm", type=Path, default=None, help="the run.json of a rerun with everything cached")
    p.add_argument("--only", choices=("results", "timings"), default=None,
                   help="one of the figures (the results come back the same from any run on one machine; the "
                        "timings need an idle one)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--write", type=Path, metavar="README", help="replace the figures in this file")
    what.add_argument("--check", type=Path, metavar="README", help="exit 1 when this file's figures differ")
    args = p.parse_args(argv)
    run = load_run(args.run, args.out, args.ensemble_dir, args.cold)
    warm = json.loads(args.warm.read_text()) if args.warm else None
    fragments = {"results": results_fragment(run), "timings": timings_fragment(run["record"], warm)}
    fragments = {n: f for n, f in fragments.items() if args.only in (None, n)}
    if args.write:
        write_text_atomic(args.write, replace(args.write.read_text(), fragments))
    elif args.check:
        found = stale(args.check.read_text(), fragments)
        if found:
            print(f"{args.check}: figures {', '.join(found)} differ from the run in {args.run}; rerun with --write",
                  file=sys.stderr)
            return 1
    else:
        print("\n\n".join(f"{fragment_marks(n)[0]}\n{body}\n{fragment_marks(n)[1]}" for n, body in fragments.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
