"""The synthetic dataset: real layouts, determinism (whatever the number of worker processes), atomic reuse, old
prints at the configured rate and independent of family, and a kinship signal that is real but not trivial (random
at chance, pixel cosine far below the latent-trait oracle, the oracle high)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kinret.data.fiw import read_fiw
from kinret.data.synth import SynthConfig, auto_jobs, generate, plan_families
from kinret.data.synth_photo import OLD_PHOTO_AGE_WEIGHT
from kinret.data.track3 import read_codalab, read_labelled
from kinret.errors import KinretInputError
from kinret.metrics import chance_level
from kinret.scoring.signal import oracle_scores, print_shares, signal_report, style_retrieval
from kinret.synth import main

SMALL = SynthConfig(seed=5, n_train=4, n_val=3, n_test=5)


def test_layouts_are_the_real_ones(tmp_path):
    root = generate(tmp_path / "synth", SMALL)
    train = read_fiw(root / "train")
    assert len(train) == 4 and all(f.relations is not None for f in train)
    assert all(len(f.relations) == len(f.members) for f in train)
    val = read_labelled(root / "val" / "probe_list.csv", root / "val" / "gallery_list.csv", root / "val")
    test = read_codalab(root / "test")
    truth = read_labelled(root / "test_truth" / "probe_list.csv", root / "test_truth" / "gallery_list.csv", None)
    assert len(val.probes) == 3 and len(test.probes) == len(truth.probes) == 5
    assert len(test.gallery) == len(truth.gallery)
    fids = [{f.fid for f in train}, set(val.probe_fids), set(truth.probe_fids)]
    assert not (fids[0] & fids[1] or fids[0] & fids[2] or fids[1] & fids[2])  # families never cross splits
    assert (root / "test" / "probe.txt").read_bytes().count(b"\r\n") == 4
    assert not list((root / "test").rglob("*.csv")) and not list(tmp_path.glob(".synth*"))
    with np.load(root / "latents.npz") as lat:
        refs = lat["refs"].tolist()
        assert lat["traits"].shape == (len(refs), 16) and len(set(refs)) == len(refs)
    assert {f"{f.fid}/{m.mid}" for f in train for m in f.members} <= set(refs)
    assert {p.ref for p in truth.probes} <= set(refs)
    with np.load(root / "latents.npz") as lat:  # every photo's style, under its final name
        photos, codes = lat["photos"].tolist(), lat["photo_style"]
    assert sorted(photos) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert codes.dtype == np.int8 and set(codes.tolist()) <= {0, 1, 2}
    share, flag = print_shares(root, test)
    assert share.shape == (5,) and flag.shape == (len(test.gallery),)
    assert flag.sum() + sum(share[i] * len(p.images) for i, p in enumerate(test.probes)) == pytest.approx(
        sum(codes[k] > 0 for k, p in enumerate(photos) if p.startswith("test/")))


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_files_whatever_the_number_of_processes(tmp_path):
    """One process and two worker processes write byte-identical datasets (every file hashed); a different seed
    does not."""
    cfg = SynthConfig(seed=5, n_train=4, n_val=2, n_test=3, size=48)
    one = _digests(generate(tmp_path / "one", cfg, jobs=1))
    two = _digests(generate(tmp_path / "two", cfg, jobs=2))
    assert len(one) > 100 and one == two
    other = _digests(generate(tmp_path / "other", replace(cfg, seed=6), jobs=2))
    assert other.keys() != one.keys() or other != one
    with pytest.raises(KinretInputError):
        generate(tmp_path / "bad", cfg, jobs=0)
    assert not (tmp_path / "bad").exists()
    assert auto_jobs(10) == 1 and 1 <= auto_jobs(100_000) <= 8


def test_deterministic_and_reused(tmp_path):
    a = generate(tmp_path / "a", SMALL)
    stamp = (a / "latents.npz").stat().st_mtime_ns
    generate(tmp_path / "a", SMALL)  # same config: reused, not rewritten
    assert (a / "latents.npz").stat().st_mtime_ns == stamp
    generate(tmp_path / "a", SynthConfig(seed=6, n_train=4, n_val=3, n_test=5))  # other config: rebuilt
    assert json.loads((a / "synth_config.json").read_text())["seed"] == 6
    with pytest.raises(ValueError):
        SynthConfig(n_val=1)
    for p in (-0.1, 1.5):
        with pytest.raises(KinretInputError):
            SynthConfig(old_photo_p=p)


def family_dispersion(prints: np.ndarray, rates: np.ndarray, family: np.ndarray) -> float:
    """Pearson's statistic over families: sum_f (O_f - E_f)^2 / V_f with O_f the family's old prints, E_f and V_f
    the sum of its photos' rates r and of r (1 - r). About chi-square with one degree per family when prints are
    drawn per photo; far above it when a family shares its style."""
    o = np.bincount(family, prints.astype(float))
    e = np.bincount(family, rates)
    v = np.bincount(family, rates * (1 - rates))
    return float(np.sum((o - e) ** 2 / v))


def test_old_prints_come_at_the_configured_rate_and_ignore_the_family():
    cfg = SynthConfig(seed=2, n_train=400, n_val=0, n_test=2, old_photo_p=0.2)
    plan = plan_families(cfg)  # families and styles only: no pixels
    rows = [(k, m.age, st is not None) for k, job in enumerate(plan)
            for m, styles in zip(job.family.members, job.styles, strict=True) for st in styles]
    family = np.array([r[0] for r in rows])
    age = np.array([r[1] for r in rows])
    prints = np.array([r[2] for r in rows])
    rates = np.array([cfg.old_photo_p * OLD_PHOTO_AGE_WEIGHT[a] for a in age])
    n = len(prints)
    assert n > 6000
    assert abs(prints.mean() - cfg.old_photo_p) < 0.02  # the age weights average ~1 over the generator's ages
    for a in OLD_PHOTO_AGE_WEIGHT:
        got, want = prints[age == a].mean(), rates[age == a][0]
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / (age == a).sum()), (a, got, want)
    f = len(plan)
    stat = family_dispersion(prints, rates, family)
    assert abs(stat - f) < 4 * np.sqrt(2 * f), (stat, f)
    # the check can fail: the same photos with one shared style per family (a family-seeded draw) are caught
    shared = np.random.default_rng(0).random(f)[family] < rates
    assert family_dispersion(shared, rates, family) > f + 10 * np.sqrt(2 * f)
    assert not any(st for job in plan_families(replace(cfg, old_photo_p=0.0)) for s in job.styles for st in s)


def test_oracle_ranks_by_traits(tmp_path):
    root = generate(tmp_path / "s", SMALL)
    truth = read_labelled(root / "test_truth" / "probe_list.csv", root / "test_truth" / "gallery_list.csv", None)
    scores = oracle_scores(truth, root / "latents.npz")
    assert scores.shape == (5, len(truth.gallery)) and np.all(np.abs(scores) <= 1 + 1e-6)


@pytest.mark.slow
def test_kinship_signal_is_real_and_not_trivial(tmp_path, capsys):
    root = generate(tmp_path / "s", SynthConfig(seed=1, n_train=60, n_val=0, n_test=60))
    report = signal_report(root, n_random=20)
    truth = read_labelled(root / "test_truth" / "probe_list.csv", root / "test_truth" / "gallery_list.csv", None)
    chance = chance_level(truth.probe_fids, truth.gallery_fids)
    with capsys.disabled():
        print("\nsynthetic signal (standard AP, 60 test families):",
              {k: round(v["average"], 4) for k, v in report.items()})
    assert report["random"]["rank@5"] == pytest.approx(chance["rank@5"], abs=0.03)
    assert report["random"]["mAP"] == pytest.approx(chance["mAP"], rel=0.2)
    assert report["oracle"]["average"] > 0.5
    assert report["raw_pixels"]["average"] < report["oracle"]["average"] - 0.3
    # the signal is in the pixels and learnable: a linear map fitted on train beats random
    assert report["pixel_ridge"]["mAP"] > 1.2 * report["random"]["mAP"]
    # the old-print style carries no family: ranking by it alone is about chance; but prints retrieve prints
    assert report["style_only"]["mAP"] < 1.5 * chance["mAP"]
    shares = style_retrieval(root)
    with capsys.disabled():
        print("old prints in raw-pixel top-5:", {k: round(v, 3) for k, v in shares.items()})
    assert shares["top5_of_print_probes"] > max(shares["gallery"], shares["top5_of_plain_probes"]) + 0.15


def test_command_line_generates_and_reports(tmp_path, capsys):
    args = ["--root", str(tmp_path / "s"), "--n-train", "3", "--n-val", "0", "--n-test", "6", "--size", "32",
            "--old-photo-p", "0.5", "--jobs", "1", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "style_only" in out and "share of old prints: gallery" in out
    assert json.loads((tmp_path / "s" / "synth_config.json").read_text())["old_photo_p"] == 0.5
