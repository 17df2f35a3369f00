"""The submission report (`submissions/report/`) and the retrieval figures it draws (notebook 3 draws them too):
CMC curves, a retrieval grid of probes and their top-ranked faces. Figures are built without pyplot (see
`kinret.plots`). `write_report` writes what was submitted and why: the CMC curves of the best variants, the
kin/non-kin score histogram and a retrieval grid on a labelled split, and the variant table with the choice, each
file through a temporary name.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from kinret.data.figures import thumbnail
from kinret.data.track3 import Track3Split
from kinret.ensemble.bootstrap import describe
from kinret.ensemble.tables import score_scale
from kinret.io import write_text_atomic
from kinret.log import progress
from kinret.metrics import chance_level, family_codes, relevance
from kinret.plots import DPI, KIN, NON_KIN, save_png
from kinret.readback import DamagedFile, read_json, rebuilt
from kinret.scoring.ranking import rank_gallery
from kinret.train.figures import score_histogram
from kinret.versions import code_version

REPORT_FILES = ("cmc.png", "score_histogram.png", "retrieval_grid.png", "variants.md")
HISTOGRAM_PAIRS = 1 << 22  # past this many probe x gallery pairs the histogram draws a sample of the non-kin ones


# ---- retrieval ------------------------------------------------------------------------------------------------------
def cmc_figure(curves: Mapping[str, np.ndarray], max_rank: int = 50, chance: np.ndarray | None = None,
               title: str = "") -> Figure:
    """CMC curves (share of probes with a relative within the top k) up to `max_rank`, log-scaled ranks."""
    fig = Figure(figsize=(6.5, 4.0), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for label, cmc in curves.items():
        k = min(max_rank, len(cmc))
        ax.plot(np.arange(1, k + 1), cmc[:k], label=f"{label} (Rank@5 {cmc[min(4, k - 1)]:.2f})")
    if chance is not None:
        k = min(max_rank, len(chance))
        ax.plot(np.arange(1, k + 1), chance[:k], color="grey", ls=":", label="random ranking")
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if t <= max_rank]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlim(1, max_rank)
    ax.set_ylim(0, 1)
    ax.set_xlabel("rank k")
    ax.set_ylabel("probes with a relative in the top k")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def chance_cmc(probe_fids: Sequence, gallery_fids: Sequence, max_rank: int = 50) -> np.ndarray:
    """The CMC a random ranking expects, k = 1..max_rank (exact, from the relatives' counts)."""
    rel = relevance(probe_fids, gallery_fids)
    ks = list(range(1, min(max_rank, rel.shape[1]) + 1))
    c = chance_level(probe_fids, gallery_fids, ks)
    return np.array([c[f"rank@{k}"] for k in ks])


def kin_split(scores: np.ndarray, probe_fids: Sequence, gallery_fids: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """The (probe, gallery) scores of relatives and of non-relatives."""
    rel = relevance(probe_fids, gallery_fids)
    return scores[rel], scores[~rel]


def _framed(img: np.ndarray, colour: str | None, width: int) -> np.ndarray:
    if colour is None:
        return img
    rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return np.asarray(ImageOps.expand(Image.fromarray(img), border=width, fill=rgb))


def retrieval_grid(split: Track3Split, scores: np.ndarray, probes: Sequence[int], labels: Track3Split | None = None,
                   k: int = 10, max_probe_photos: int = 3, thumb: int = 56, titles: Sequence[str] | None = None
                   ) -> Figure:
    """One row per probe: up to `max_probe_photos` of its photos, then its top-`k` gallery faces, relatives framed
    green and others orange when `labels` (a labelled split in the same row order) is given."""
    ranking = rank_gallery(scores[list(probes)])
    cols = max_probe_photos + 1 + k
    fig = Figure(figsize=(0.78 * cols, 0.95 * len(probes) + 0.3), dpi=DPI, layout="constrained")
    axes = np.asarray(fig.subplots(len(probes), cols, squeeze=False))
    rel = relevance(labels.probe_fids, labels.gallery_fids) if labels is not None else None
    border = max(2, thumb // 14)
    for r, p in enumerate(probes):
        probe = split.probes[p]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < min(max_probe_photos, len(probe.images)):
                ax.imshow(_framed(thumbnail(probe.images[c], thumb), "#555555", border))
                if c == 0:
                    ax.set_title(titles[r] if titles else f"s{p}", fontsize=7, loc="left")
            elif c > max_probe_photos:
                j = int(ranking[r, c - max_probe_photos - 1])
                hit = None if rel is None else bool(rel[p, j])
                colour = None if hit is None else KIN if hit else NON_KIN
                ax.imshow(_framed(thumbnail(split.gallery[j].path, thumb), colour, border))
                ax.set_title(f"{c - max_probe_photos}: face{j}", fontsize=6)
    legend = "" if rel is None else "  (green frame: a relative; orange: not)"
    fig.suptitle(f"{split.name}: probe photos, then the top {k} gallery faces{legend}", fontsize=9)
    return fig


def example_probes(per_probe_ap: np.ndarray, n: int = 3) -> list[tuple[int, str]]:
    """(probe, caption) for the best, the median and the worst probe by AP (fewer when there are fewer probes)."""
    order = np.argsort(-per_probe_ap, kind="stable")
    picks = {"best": order[0], "median": order[len(order) // 2], "worst": order[-1]}
    out, seen = [], set()
    for name, p in list(picks.items())[:n]:
        if int(p) not in seen:
            seen.add(int(p))
            out.append((int(p), f"s{int(p)} ({name} AP {per_probe_ap[p]:.2f})"))
    return out


# ---- the submission report ----------------------------------------------------------------------------------------
def report_split(splits: Mapping):
    """The labelled `SplitData` the report is drawn on: test when its truth is known, else val, else the first
    out-of-fold protocol; None when nothing is labelled."""
    for name in ["test", "val"] + sorted(n for n in splits if n.startswith("oof")):
        if name in splits and splits[name].labels is not None:
            return splits[name]
    return None


def _text(result) -> list[str]:
    """The report's opening lines: what was submitted, its weights, the cross-fitted comparison, the reference."""
    sel = result.selection
    lines = [f"# What was submitted: {sel.name}", "", f"Chosen: {sel.reason}.", ""]
    if len(sel.weights) > 1:
        lines += ["| weight | variant |", "|---|---|"]
        lines += [f"| {w:.3f} | {v} |" for v, w in sorted(sel.weights.items(), key=lambda x: -x[1])]
        lines += ["", f"Blended after per-probe `{sel.normalisation}` normalisation.", ""]
    for label, m in sel.crossfit.items():
        lines.append(f"- {label}, cross-fitted out of fold: " + ", ".join(f"{key} {v:.4f}" for key, v in m.items()))
    if sel.gain:
        lines.append(f"- the blend's cross-fitted gain in Average over the best single variant: {describe(sel.gain)} "
                     "(95% paired-bootstrap interval; `auto` blends only when it lies above 0)")
    if sel.reference and sel.best_single in sel.intervals:
        lines.append(f"- the best single variant `{sel.best_single}` against the reference `{sel.reference}`: "
                     f"{describe(sel.intervals[sel.best_single])} "
                     f"{'out of fold' if result.key == 'oof' else 'on ' + result.key} (95% interval)")
    return lines


def report_parts(result, top: int = 5, k: int = 10) -> tuple[dict[str, Callable[[], Figure]], str]:
    """What `report_figures` draws, each figure as a function that draws it (so that a caller can report progress
    between them), and the markdown text. The chosen scores on the report split are read once, when the first
    figure that needs them is drawn."""
    sel, where = result.selection, report_split(result.splits)
    lines = _text(result)
    if where is None:
        lines += ["", "Nothing is labelled (no DATA/train, DATA/val or test truth): no curves or grid.", ""]
        return {}, "\n".join(lines + ["## Every variant", "", result.table_md])
    pf, gf = where.labels.probe_fids, where.labels.gallery_fids
    curves = cmc_curves(result, where.name, top)
    chosen: list[np.ndarray] = []

    def scores() -> np.ndarray:
        if not chosen:
            chosen.append(result.chosen[where.name])
        return chosen[0]

    def histogram() -> Figure:
        axis = textwrap.fill("score: " + score_scale(sel.weights, sel.normalisation), 80)
        return kin_histogram(scores(), pf, gf, f"{sel.name}\non {where.name}, probe x gallery face", axis)

    def grid() -> Figure:
        picks = example_probes(_chosen_results(result, where.name)["ap"].to_numpy())
        return retrieval_grid(where.split, scores(), [p for p, _ in picks], where.labels, k,
                              titles=[t for _, t in picks])

    builders = {"cmc.png": lambda: cmc_figure(curves, chance=chance_cmc(pf, gf), title=f"CMC on {where.name} "
                                              f"({len(pf)} probes, {len(gf)} gallery faces)"),
                "score_histogram.png": histogram, "retrieval_grid.png": grid}
    lines += ["", f"Figures drawn on the **{where.name}** split ({len(pf)} probes, {len(gf)} gallery faces"
                  f"{'; never used to choose' if where.name == 'test' else ''}): `cmc.png` (the chosen scores and "
                  f"the {len(curves) - 1} next best variants out of fold), `score_histogram.png` (kin vs non-kin "
                  "scores of the chosen variant), `retrieval_grid.png` (the best, median and worst probe by AP).", ""]
    return builders, "\n".join(lines + ["## Every variant", "", result.table_md])


def report_figures(result, top: int = 5, k: int = 10) -> tuple[dict[str, Figure], str]:
    """The report's figures (CMC, histogram, retrieval grid) for an `EnsembleResult`, and the markdown text."""
    builders, text = report_parts(result, top, k)
    return {name: build() for name, build in builders.items()}, text


def kin_histogram(scores: np.ndarray, probe_fids: Sequence, gallery_fids: Sequence, title: str, xlabel: str,
                  most: int = HISTOGRAM_PAIRS) -> Figure:
    """`score_histogram` of the kin and non-kin scores of a (P, N) matrix. Past `most` pairs the histogram is drawn
    from every kin pair and a seeded uniform sample of `most` pairs' non-kin scores (the same shape; the float64
    copies and the AUC's sort of every pair cost gigabytes at ten times the test split), and the AUC in the title
    is still that of every pair (`pair_auc`)."""
    if scores.size <= most:
        return score_histogram(*kin_split(scores, probe_fids, gallery_fids), title, xlabel=xlabel)
    p, g = family_codes(probe_fids, gallery_fids)
    kin = scores[p[:, None] == g[None, :]]
    flat = np.random.default_rng(0).integers(0, scores.size, most)
    rows, cols = np.divmod(flat, scores.shape[1])
    sample = scores[rows, cols][p[rows] != g[cols]]
    fig = score_histogram(kin, sample, title, xlabel=xlabel)
    n_non = scores.size - len(kin)
    fig.axes[0].set_title(f"{title}\nkin vs non-kin AUC {pair_auc(scores, p, g, kin):.3f} (non-kin drawn from "
                          f"{len(sample):,} of {n_non:,} pairs)", fontsize=9)
    return fig


def pair_auc(scores: np.ndarray, probe_codes: np.ndarray, gallery_codes: np.ndarray, kin: np.ndarray,
             block: int = 1 << 22) -> float:
    """P(a kin pair outscores a non-kin pair), ties counting 1/2, over every pair (`kinret.metrics.roc_auc`'s
    value): each block of non-kin scores is placed among the sorted kin scores, so nothing of (P, N) size is sorted
    or copied."""
    kin = np.sort(np.asarray(kin, dtype=np.float64))
    above = ties = 0
    rows = max(1, block // max(scores.shape[1], 1))
    for a in range(0, len(scores), rows):
        non = scores[a:a + rows][probe_codes[a:a + rows, None] != gallery_codes[None, :]].astype(np.float64)
        right, left = np.searchsorted(kin, non, "right"), np.searchsorted(kin, non, "left")
        above += int((len(kin) - right).sum())
        ties += int((right - left).sum())
    n_non = scores.size - len(kin)
    return (above + 0.5 * ties) / (len(kin) * n_non) if len(kin) and n_non else float("nan")


def _chosen_results(result, split: str) -> pd.DataFrame:
    """The chosen scores' per-probe results on `split`, in probe order (from the run's per-probe table)."""
    pp = result.per_probe
    return pp[(pp["variant"] == f"chosen: {result.selection.name}") & (pp["split"] == split)]


def cmc_from_first(first: np.ndarray, n_gallery: int) -> np.ndarray:
    """`kinret.metrics.cmc_curve` from each probe's first-relative rank (NaN: no relative), k = 1..N."""
    first = np.asarray(first, dtype=np.float64)
    counts = np.bincount(first[~np.isnan(first)].astype(np.int64), minlength=n_gallery + 1)[:n_gallery]
    return np.cumsum(counts) / len(first)


def cmc_curves(result, split: str, top: int = 5) -> dict[str, np.ndarray]:
    """CMC curves on a labelled split of an `EnsembleResult`: the chosen scores, then the `top` best variants out
    of fold (a single chosen variant is not drawn twice), from the run's per-probe first-relative ranks."""
    labels = result.splits[split].labels
    if labels is None:
        raise ValueError(f"split {split!r} is not labelled: no CMC curve")
    sel, pp = result.selection, result.per_probe
    shown = set(sel.weights) if len(sel.weights) == 1 else set()
    pp = pp[pp["split"] == split]
    scored = set(pp["variant"])  # on a narrowed split (`--score-others`), the variants scored there
    variants = [v for v in result.table["variant"].astype(str)
                if v in result.scores[split] and v in scored and v not in shown][:top]
    return {v: cmc_from_first(pp[pp["variant"] == v]["first"].to_numpy(dtype=np.float64, na_value=np.nan),
                              len(labels.gallery)) for v in [f"chosen: {sel.name}", *variants]}


def report_key(result, top: int, k: int) -> str:
    """A digest of everything the report is drawn from: the variant table, the choice, the per-probe results and
    id lists of the report split, and the chosen scores there. Equal keys give the same report, so a rerun with
    nothing new redraws nothing."""
    sel, where = result.selection, report_split(result.splits)
    code = code_version("kinret.submission.report", "kinret.plots", "kinret.metrics")  # a changed figure is redrawn
    h = hashlib.sha256(f"{code}|{top}|{k}|{result.table_md}|{sel.name}|{sel.reason}".encode())
    if where is not None:
        h.update("|".join([where.name, *where.probe_ids, *where.gallery_ids]).encode())
        pp = result.per_probe
        h.update(pp[pp["split"] == where.name].to_csv(index=False).encode())
        h.update(np.ascontiguousarray(result.chosen[where.name]))  # its buffer, not a copy
    return h.hexdigest()[:16]


def write_report(result, out_dir: str | Path, top: int = 5, k: int = 10) -> list[Path]:
    """Write `out_dir/` (cmc.png, score_histogram.png, retrieval_grid.png, variants.md) for an `EnsembleResult`, a
    progress line at least once a minute; files of an earlier report that this one does not draw are removed, so
    the folder never mixes two runs. When `.report_key` says the folder already holds the report of these inputs
    (every file present), nothing is redrawn."""
    out_dir = Path(out_dir)
    key, stamp = report_key(result, top, k), out_dir / ".report_key"
    try:
        previous = read_json(stamp, dict, ("key", "files"))
        if not isinstance(previous["files"], list) or not all(isinstance(n, str) for n in previous["files"]):
            raise DamagedFile(stamp, "its files are not a list of names")
        if previous["key"] == key and all((out_dir / n).is_file() for n in previous["files"]):
            return [out_dir / n for n in previous["files"]]
    except DamagedFile as exc:
        rebuilt(exc, "the report is drawn again")
    except OSError:
        pass
    builders, text = report_parts(result, top, k)
    written = [save_png(build(), out_dir / name)
               for name, build in progress(builders.items(), desc="report", total=len(builders), unit="figure")]
    written.append(write_text_atomic(out_dir / "variants.md", text))
    for name in REPORT_FILES:
        if (out_dir / name) not in written and (out_dir / name).exists():
            (out_dir / name).unlink()
    write_text_atomic(stamp, json.dumps({"key": key, "files": [p.name for p in written]}) + "\n")
    return written
