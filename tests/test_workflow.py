"""make_submission.py end to end on tiny data: train -> embed -> score -> select -> submit, the caches (a rerun
builds nothing; a changed checkpoint or image is never served stale), external variants and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kinret.data.layout import DataLayout
from kinret.ensemble.run import prepare
from kinret.features.sources import CheckpointSource
from kinret.scoring.protocols import build_splits
from kinret.scoring.store import load_scores, safe_name, save_scores
from kinret.scoring.variants import SplitScores
from kinret.submission import make as submit
from kinret.submission.predictions import read_predictions


def args(data, work, *extra):
    return ["--data-root", str(data), "--experiments", "tiny", "--runs", str(work / "runs"), "--ensemble-dir",
            str(work / "ens"), "--out", str(work / "sub"), "--quiet", *extra]


@pytest.fixture(scope="module")
def done(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    assert submit.main(args(tiny_data, work)) == 0
    return work


def test_the_run_writes_a_submission_named_after_the_choice_and_the_table(done, tiny_data, capsys):
    sel = json.loads((done / "sub" / "selection.json").read_text())
    zips = list((done / "sub").glob("*.zip"))
    assert [z.name for z in zips] == [f"{sel['name']}.zip"]
    splits = build_splits(DataLayout.of(tiny_data), 2)
    test = splits["test"].split
    ranking = read_predictions(zips[0], len(test.probes), len(test.gallery))
    assert np.array_equal(ranking, read_predictions(done / "sub" / "predictions.csv", *ranking.shape))
    table = (done / "sub" / "variants.md").read_text()
    for variant in ("raw_pixels:cos-pixels-meanemb", "raw_pixels:cos-pixels-max", "tiny:cos-emb-meanemb",
                    "tiny:cos-emb-max", "tiny:cos-gem-meanemb", "tiny:rerank100-emb", "tiny:dba10-emb",
                    "tiny:clus-div5-emb", "tiny:dba10-clus-div5-emb", "tiny:dsm-emb",
                    "best single (cross-fitted out-of-fold)"):
        assert f"| {variant} |" in table
    for named_only in ("tiny:fc-mean", "tiny:cos-gem-dba10", "tiny:qe5-emb", "tiny:sink-emb",
                       "raw_pixels:dba10-pixels"):
        assert f"| {named_only} |" not in table  # FC over all pairs, QE, Sinkhorn, re-scored pixels: when named
    assert "oof_average" in table and "val_average" in table and "test_average" in table
    csv = (done / "ens" / "variants.csv").read_text().splitlines()
    assert csv[0].startswith("variant,") and "oof_mAP_trapezoid" in csv[0] and "oof_rank10" in csv[0]
    for name in ("oof0", "oof1", "val"):  # the ids a team's external matrices must carry
        assert (done / "ens" / "protocols" / name / "probe_list.csv").is_file()
    settings = sel["settings"]  # what the choice was made with, saved beside the submission
    assert settings["experiments"] == ["tiny"] and settings["normalise"] == "z" and settings["max_steps"] == 10
    assert settings["top_n"] == 100 and settings["protocol_seed"] == 0 and settings["data_root"] == str(tiny_data)
    assert json.loads((done / "ens" / "selection.json").read_text())["settings"] == settings


def variant_matrices(done, tiny_data, variant):
    """split -> the variant's scores, read from the store where kept, else computed (`SplitScores`)."""
    _, opts = submit.parse(args(tiny_data, done))
    dirs = opts.dirs
    _, splits, groups = prepare(opts.settings, DataLayout.of(tiny_data), dirs.runs, dirs.ensemble)
    return {name: SplitScores(groups, sd, dirs.ensemble / "scores")[variant] for name, sd in splits.items()}


def test_the_store_keeps_what_is_read_back_and_every_variant_s_results(done, tiny_data):
    """Every variant's per-probe results on every labelled split; its matrix on the splits the choice is made on
    (the blend's search reads them); on val and test only the chosen variants' matrices."""
    chosen = set(json.loads((done / "sub" / "selection.json").read_text())["weights"])
    scores = done / "ens" / "scores"
    for folder in (f for f in scores.iterdir() if f.is_dir()):
        assert sorted(p.name for p in folder.glob("*.results.npz")) == [f"{n}.results.npz" for n in
                                                                        ("oof0", "oof1", "test", "val")]
        kept = sorted(p.stem for p in folder.glob("*.npy"))
        wanted = ["oof0", "oof1"] + (["test", "val"] if any(safe_name(v) == folder.name for v in chosen) else [])
        assert kept == wanted, folder.name
    assert json.loads((scores / "kept.json").read_text())["variants"] == list(chosen)


def test_scores_are_stored_with_ids_and_fold_models_are_averaged(done, tiny_data):
    splits = build_splits(DataLayout.of(tiny_data), 2)
    sd = splits["test"]
    stored = variant_matrices(done, tiny_data, "tiny:cos-emb-meanemb")["test"]
    fold_scores = []
    for k in (0, 1):
        src = CheckpointSource(done / "runs" / "tiny" / f"fold{k}", done / "runs" / "_cache")
        from kinret.scoring.similarity import cosine_variant
        emb = src.embeddings(sd.images)["emb"]
        fold_scores.append(cosine_variant(emb[sd.probe_rows], sd.owner, len(sd.split.probes), emb[sd.gallery_rows]))
    assert np.allclose(stored, (fold_scores[0] + fold_scores[1]) / 2, atol=1e-6)
    assert len(list((done / "runs" / "tiny" / "fold0" / "embeddings").glob("*.npz"))) == 3  # train/val/test


def test_a_rerun_builds_nothing(done, tiny_data, capsys, monkeypatch):
    assert submit.main(args(tiny_data, done, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "train " not in out and "score " not in out and "select" in out

    def fail(*a, **k):
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr("kinret.scoring.variants.open_sources", fail)
    monkeypatch.setattr("kinret.submission.make.train_experiment", fail)
    assert submit.main(args(tiny_data, done)) == 0


def test_a_changed_checkpoint_is_never_served_from_the_cache(done, tiny_data, tmp_path):
    run = tmp_path / "fold0"
    shutil.copytree(done / "runs" / "tiny" / "fold0", run)
    images = build_splits(DataLayout.of(tiny_data), 2)["test"].images
    before = CheckpointSource(run, tmp_path / "cache")
    emb = before.embeddings(images)["emb"]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    name = next(k for k in ckpt["model"] if k.endswith("weight") and ckpt["model"][k].ndim == 4)
    ckpt["model"][name] = ckpt["model"][name] * 1.5
    torch.save(ckpt, run / "checkpoint.pt")
    after = CheckpointSource(run, tmp_path / "cache")
    assert after.key(images) != before.key(images)
    assert not np.allclose(after.embeddings(images)["emb"], emb)
    assert len(list((run / "embeddings").glob("test_*.npz"))) == 2


def external_matrices(done, tiny_data, folder):
    splits = build_splits(DataLayout.of(tiny_data), 2)
    base = variant_matrices(done, tiny_data, "tiny:cos-emb-max")
    for name, sd in splits.items():
        save_scores(folder / f"{name}.npy", -base[name], sd.probe_ids, sd.gallery_ids)
    return splits


def test_external_scores_and_embeddings_join_the_table(done, tiny_data, tmp_path):
    ens = tmp_path / "ens"
    shutil.copytree(done / "ens", ens)
    splits = external_matrices(done, tiny_data, ens / "external" / "team_scores")
    ids = sorted({i for sd in splits.values() for i in sd.images.ids})
    rng = np.random.default_rng(0)
    (ens / "external" / "team_feats").mkdir()
    np.savez(ens / "external" / "team_feats" / "embeddings.npz", image_ids=np.array(ids),
             embeddings=rng.normal(size=(len(ids), 8)).astype(np.float32))
    out = tmp_path / "sub"
    argv = args(tiny_data, done, "--ensemble-dir", str(ens), "--out", str(out))
    assert submit.main(argv) == 0
    table = (out / "variants.md").read_text()
    assert "| team_scores |" in table and "| team_feats:cos-emb-meanemb |" in table


@pytest.mark.parametrize("problem, match", [
    ("nan", "non-finite score"),
    ("ids", "probe id at row 0"),
    ("missing", "score matrix not found"),
    ("duplicate", "named twice"),
])
def test_bad_external_variants_are_named_and_nothing_is_written(done, tiny_data, tmp_path, capsys, problem, match):
    ens = tmp_path / "ens"
    shutil.copytree(done / "ens", ens)
    folder = ens / "external" / ("raw_pixels" if problem == "duplicate" else "team")
    splits = external_matrices(done, tiny_data, folder)
    sd = splits["test"]
    if problem == "nan":
        m = np.load(folder / "test.npy")
        m[0, 1] = np.nan
        np.save(folder / "test.npy", m)
    elif problem == "ids":
        save_scores(folder / "test.npy", np.zeros((len(sd.probe_ids), len(sd.gallery_ids))), sd.probe_ids[::-1],
                    sd.gallery_ids)
    elif problem == "missing":
        (folder / "val.npy").unlink()
    out = tmp_path / "sub"
    assert submit.main(args(tiny_data, done, "--ensemble-dir", str(ens), "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert match in err and str(folder) in err
    assert not out.exists()


def test_empty_and_duplicate_variant_lists_are_refused(done, tiny_data, tmp_path, capsys):
    out = tmp_path / "sub"
    assert submit.main(args(tiny_data, done, "--out", str(out), "--variants", "raw_pixels", "raw_pixels")) == 2
    assert "named twice" in capsys.readouterr().err
    argv = args(tiny_data, done, "--out", str(out), "--no-raw-pixels")
    argv[argv.index("tiny")] = "--no-raw-pixels"  # no experiment either
    assert submit.main(argv) == 2
    assert "no variants to score" in capsys.readouterr().err and not out.exists()


def test_only_named_variants(done, tiny_data, tmp_path):
    out = tmp_path / "sub"
    assert submit.main(args(tiny_data, done, "--out", str(out), "--variants", "tiny:fc-mean")) == 0
    assert json.loads((out / "selection.json").read_text())["weights"] == {"tiny:fc-mean": 1.0}


@pytest.mark.slow
def test_head_only_grid_on_the_bundled_face_network(tiny_data, tmp_path):
    """The default experiment's path, made small: SFace features computed once and shared by the frozen-backbone
    variants (every pooling, zero-shot) and the trained heads (cosine on the residual neck, FC re-rank), each main
    embedding with its transductive re-scorings."""
    exp = tmp_path / "small_heads.py"
    exp.write_text("from dataclasses import replace\n\nfrom kinret.train.experiments import load_experiment\n\n"
                   "cfg = replace(load_experiment('sface_heads')[0], name='small_heads', n_folds=2, epochs=1, "
                   "pairs_per_epoch=256, batch_size=64, eval_pairs=50)\n"
                   "GRID = [{'loss': ['bce', 'cosface']}]\n")
    argv = args(tiny_data, tmp_path, "--jobs", "1")
    argv[argv.index("tiny")] = str(exp)
    assert submit.main(argv) == 0
    table = (tmp_path / "sub" / "variants.md").read_text()
    for variant in ("sface:cos-native-meanemb", "sface:cos-gem-max", "sface:dba10-native", "sface:clus-div5-native",
                    "small_heads/bce:rerank100-emb", "small_heads/cosface:cos-emb-meanemb",
                    "small_heads/cosface:dsm-emb"):
        assert f"| {variant} |" in table
    assert "small_heads/bce:fc-mean" not in table  # FC over all pairs only on request
    assert "sface:dba10-gem" not in table  # re-scoring on the main embedding only
    assert len(list((tmp_path / "runs" / "_cache").glob("frozen_sface_*"))) == 3  # train, val, test: once


def test_the_ensemble_stage_alone_reselects_from_the_cache(done, tiny_data, tmp_path, capsys, monkeypatch):
    from kinret.ensemble.cli import main as ensemble_main

    monkeypatch.setattr("kinret.scoring.variants.open_sources", lambda *a: pytest.fail("recomputed a cached matrix"))
    base = ["--data-root", str(tiny_data), "--experiments", "tiny", "--runs", str(done / "runs"), "--quiet"]
    ens = tmp_path / "ens"
    shutil.copytree(done / "ens", ens)
    assert ensemble_main([*base, "--ensemble-dir", str(ens), "--choose", "best"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted: best_") and "why: best single variant by out-of-fold Average" in out
    assert "full table: " in out and "| variant |" not in out  # the short summary; the table goes to the file
    assert json.loads((ens / "selection.json").read_text())["name"].startswith("best_")
    base[base.index(str(done / "runs"))] = str(tmp_path / "no_runs")  # nothing trained there
    assert ensemble_main([*base, "--ensemble-dir", str(ens)]) == 2
    assert "not trained" in capsys.readouterr().err


def test_the_ensemble_script_runs_from_its_folder():
    """`python ensemble/choose.py`: the script's folder goes first on sys.path, so its name must not shadow a
    standard module (a script called select.py broke `import selectors`)."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "ensemble/choose.py", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--choose" in proc.stdout and "--normalise" in proc.stdout


@pytest.mark.slow
def test_torchrun_shares_the_embedding_and_gives_the_same_scores(done, tiny_data, tmp_path):
    """`torchrun --nproc_per_node 2 -m kinret.ensemble`: two gloo processes split each cache's chunks; the
    matrices equal the single-process ones."""
    import os
    import subprocess
    import sys

    for name in ("runs", "ens"):  # the module's run: trained, embedded and scored by one process
        shutil.copytree(done / name, tmp_path / name)
    runs = tmp_path / "runs"
    for cache in [*runs.rglob("embeddings"), runs / "_cache"]:
        shutil.rmtree(cache)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kinret.ensemble",
           "--data-root", str(tiny_data), "--experiments", "tiny", "--runs", str(runs), "--ensemble-dir",
           str(tmp_path / "ens2"), "--quiet"]
    env = {**os.environ, "KINRET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "KINRET_EMBED_CHUNK": "16"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted: " in proc.stdout and "full table: " in proc.stdout
    splits = build_splits(DataLayout.of(tiny_data), 2)
    for variant in ("tiny_cos-emb-meanemb", "tiny_rerank100-emb", "tiny_dba10-clus-div5-emb",
                    "raw_pixels_cos-pixels-max"):
        for name, sd in splits.items():  # the matrices kept (out of fold), every split's per-probe AP
            if name.startswith("oof"):
                one, two = (load_scores(tmp_path / ens / "scores" / variant / f"{name}.npy", sd.probe_ids,
                                        sd.gallery_ids) for ens in ("ens", "ens2"))
                assert np.allclose(one, two, atol=1e-5), (variant, name)
            one, two = (np.load(tmp_path / ens / "scores" / variant / f"{name}.results.npz")["ap"]
                        for ens in ("ens", "ens2"))
            assert np.allclose(one, two, atol=1e-5), (variant, name)
    assert not list(runs.rglob("*.parts"))  # every part joined and removed
    assert len(list(runs.rglob("embeddings/*.npz"))) == 6  # 2 folds x (own out-of-fold set, val, test)
