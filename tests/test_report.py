"""The figures and the submission report: what they draw is the data given, files stay small, nothing stale."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kinret import plots
from kinret.data import figures as data_figures
from kinret.data.fiw import read_fiw
from kinret.data.track3 import read_codalab, read_labelled
from kinret.metrics import cmc_curve, hits_in_rank_order, relevance, roc_auc, roc_curve
from kinret.scoring.ranking import rank_gallery
from kinret.submission import make as submit
from kinret.submission import report
from kinret.train import figures as train_figures

LIMIT = 200 * 1024


def test_roc_curve_area_is_the_auc_with_ties():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=400), 1)  # many ties
    y = rng.random(400) < 0.3 + 0.15 * s
    fpr, tpr = roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(s, y), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(s, np.ones(400))


def test_chance_cmc_matches_shuffled_rankings():
    rng = np.random.default_rng(1)
    pf = np.array([f"F{i % 5}" for i in range(10)], dtype=object)
    gf = np.array([f"F{i % 7}" for i in range(60)], dtype=object)
    sims = [cmc_curve(hits_in_rank_order(rank_gallery(rng.random((10, 60)).astype(np.float32)), relevance(pf, gf)))
            for _ in range(400)]
    assert np.allclose(np.mean(sims, 0)[:20], report.chance_cmc(pf, gf, 20), atol=0.03)


def test_example_probes_are_best_median_worst():
    picks = report.example_probes(np.array([0.2, 0.9, 0.05, 0.5, 0.3]))
    assert [p for p, _ in picks] == [1, 4, 2]
    assert picks[0][1].startswith("s1 (best AP 0.90")


def test_dataset_summary_and_figures_draw_the_folder(tiny_data):
    families = read_fiw(tiny_data / "train")
    summary = data_figures.dataset_summary(families)
    assert summary["families"] == 12 and summary["images"] == sum(f.n_images for f in families)
    fig = data_figures.family_montage(families[0], per_member=3)
    assert len([ax for ax in fig.axes if ax.images]) == sum(min(3, len(m.images)) for m in families[0].members)
    assert len(plots.png_bytes(data_figures.counts_figure(families))) < LIMIT


def test_retrieval_grid_frames_relatives_from_the_labels(tiny_data):
    truth = read_labelled(tiny_data / "test_truth" / "probe_list.csv", tiny_data / "test_truth" / "gallery_list.csv",
                          None)
    rel = relevance(truth.probe_fids, truth.gallery_fids)
    scores = rel.astype(np.float32)  # a perfect ranking: relatives first
    fig = report.retrieval_grid(read_codalab(tiny_data / "test"), scores, [0, 1], truth, k=4, max_probe_photos=2)
    gallery_axes = [ax for ax in fig.axes if ax.images and ax.get_title().startswith(("1:", "2:", "3:", "4:"))]
    n_rel = rel[[0, 1]].sum(1)
    framed = [tuple(ax.images[0].get_array()[0, 0, :3]) for ax in gallery_axes]
    green = tuple(int(plots.KIN[i:i + 2], 16) for i in (1, 3, 5))
    assert sum(f == green for f in framed) == sum(min(4, n) for n in n_rel)


def test_make_submission_writes_the_report(tiny_data, tmp_path, capsys):
    from test_make_submission import fast

    out = tmp_path / "out"
    stale = out / "report" / "retrieval_grid.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an older run")
    assert submit.main(fast(tiny_data, out, "--quiet")) == 0
    assert "report: " in capsys.readouterr().out
    names = sorted(p.name for p in (out / "report").iterdir() if not p.name.startswith("."))
    assert names == sorted(report.REPORT_FILES)
    drawn = {n: (out / "report" / n).stat().st_mtime_ns for n in names}
    assert submit.main(fast(tiny_data, out, "--quiet")) == 0  # nothing new: nothing redrawn
    assert {n: (out / "report" / n).stat().st_mtime_ns for n in names} == drawn
    (out / "report" / "cmc.png").unlink()  # a file gone: the report is drawn again
    assert submit.main(fast(tiny_data, out, "--quiet")) == 0
    assert (out / "report" / "cmc.png").is_file()
    for name in names:
        if name.endswith(".png"):
            assert (out / "report" / name).stat().st_size < LIMIT
            Image.open(out / "report" / name).verify()
    text = (out / "report" / "variants.md").read_text()
    assert text.startswith("# What was submitted: best_raw_pixels") and "**test** split" in text
    assert "| variant | oof_average" in text


def test_report_without_labels_says_so_and_drops_old_figures(tiny_data, tmp_path, capsys):
    from test_make_submission import fast

    data = tmp_path / "real"
    data.mkdir()
    (data / "test").symlink_to(tiny_data / "test", target_is_directory=True)
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "report" / "cmc.png").write_bytes(b"old")
    assert submit.main(fast(data, out, "--quiet")) == 0
    assert sorted(p.name for p in (out / "report").iterdir() if not p.name.startswith(".")) == ["variants.md"]
    assert "Nothing is labelled" in (out / "report" / "variants.md").read_text()


def test_histogram_of_one_class_draws_it_alone_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = train_figures.score_histogram(np.array([0.1, 0.5, 0.7]), np.array([]), "one family")
    assert "AUC nan" in fig.axes[0].get_title() and len(fig.axes[0].patches) == 50
