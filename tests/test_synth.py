"""The synthetic dataset: real layouts, determinism, atomic reuse, and a kinship signal that is real but not
trivial (random at chance, pixel cosine far below the latent-trait oracle, the oracle high)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kinret.data.fiw import read_fiw
from kinret.data.split import read_codalab, read_labelled
from kinret.data.synth import SynthConfig, generate
from kinret.metrics import chance_level
from kinret.synth import oracle_scores, signal_report

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


def test_deterministic_and_reused(tmp_path):
    a = generate(tmp_path / "a", SMALL)
    b = generate(tmp_path / "b", SMALL)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a[:: max(1, len(files_a) // 25)]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    stamp = (a / "latents.npz").stat().st_mtime_ns
    generate(tmp_path / "a", SMALL)  # same config: reused, not rewritten
    assert (a / "latents.npz").stat().st_mtime_ns == stamp
    generate(tmp_path / "a", SynthConfig(seed=6, n_train=4, n_val=3, n_test=5))  # other config: rebuilt
    assert json.loads((a / "synth_config.json").read_text())["seed"] == 6
    with pytest.raises(ValueError):
        SynthConfig(n_val=1)


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
