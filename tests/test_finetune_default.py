"""The fine-tune in the default run (issue 19): its frozen prefix comes from the same graph pass as the frozen
features and matches the torch prefix; a model trained on it embeds by its tail what the whole network with the same
weights gives, and its weights written back into the graph give the same embeddings through cv2; epoch 0 is the
zero-shot network; the default run scores its fold models out of fold; the final fit trains on train and val and
is recorded."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kinret.data.pixels import decode_pixels, normalize, to_float
from kinret.data.synth import SynthConfig, generate
from kinret.features.feeds import CachedPrefix, load_model
from kinret.features.frozen import FrozenPass
from kinret.features.graph_runtime import GraphRuntime
from kinret.features.sources import CheckpointSource, ImageSet
from kinret.models.config import TrainConfig
from kinret.models.networks import build_backbone, state_digest
from kinret.submission import make as submit
from kinret.train.experiments import load_experiment
from kinret.train.fit import train_run

CPU = torch.device("cpu")


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def faces112(tmp_path_factory):
    """A small synthetic set at SFace's 112 px: 9 training, 3 val and 3 test families."""
    return generate(tmp_path_factory.mktemp("ft112") / "synthetic",
                    SynthConfig(seed=6, n_train=9, n_val=3, n_test=3, max_members=4, max_images=2))


def recipe(data, out, **changes) -> TrainConfig:
    cfg = replace(load_experiment("sface_finetune")[0], data_root=str(data), out_root=str(out), batch_size=16,
                  eval_pairs=50)
    return replace(cfg, **changes)


def kit_input(paths, data_cfg) -> torch.Tensor:
    return normalize(to_float(decode_pixels(paths, 112, None), CPU), data_cfg["mean"], data_cfg["std"])


def test_the_feature_pass_writes_the_prefix_and_it_matches_the_torch_prefix(faces112, tmp_path):
    backbone, data_cfg = build_backbone(replace(TrainConfig(), backbone="sface"))
    cfg = recipe(faces112, tmp_path)
    (cut,) = CachedPrefix.cuts(cfg)
    paths = sorted((faces112 / "train").rglob("*.jpg"))[:20]
    frozen = FrozenPass.of(cfg, backbone, state_digest(backbone), data_cfg, CPU)
    assert frozen.engine == "graph"
    stored = frozen.outputs(paths, tmp_path, [cut])[cut.name]  # one graph pass: every pooling and the cut
    assert stored.shape == (1, len(paths), 512, 7, 7) and stored.dtype == np.float16
    assert sorted(p.name for p in frozen.folder(paths, tmp_path).iterdir()) == [
        "avg.npy", "cut24-float16.npy", "gem.npy", "ids.npy", "max.npy", "native.npy"]
    with torch.no_grad():
        want = backbone.forward_prefix(kit_input(paths, data_cfg), cut.units).numpy()
    cos = cosine(stored[0], want)
    print(f"\ngraph-pass prefix vs torch prefix over {len(paths)} images: cosine min {cos.min():.6f}")
    assert cos.min() >= 0.999


@pytest.fixture(scope="module")
def tuned(faces112, tmp_path_factory):
    """Fold 0 of the recipe, trained one epoch on the cached prefix."""
    out = tmp_path_factory.mktemp("tuned")
    cfg = recipe(faces112, out)
    rows = train_run(cfg, 0)
    return cfg, out, rows


def test_epoch_zero_is_the_zero_shot_network_and_training_moves_it(tuned, caplog):
    cfg, out, rows = tuned
    saved = torch.load(cfg.run_dir(0) / "checkpoint.pt", weights_only=False)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["average"] == pytest.approx(saved["zero_shot"]["average"], abs=2e-3)  # a float16 prefix
    assert rows[0]["pair_auc_cos"] == pytest.approx(saved["zero_shot"]["pair_auc_cos"], abs=2e-3)
    assert rows[1]["train_loss"] > 0 and np.isfinite(rows[1]["average"])


def test_the_tail_over_the_prefix_embeds_what_the_whole_network_does(tuned, faces112):
    cfg, out, _ = tuned
    source = CheckpointSource(cfg.run_dir(0), out / "_cache")
    paths = tuple(sorted((faces112 / "test").rglob("*.jpg"))[:16])
    emb = source.embeddings(ImageSet("probe16", paths, tuple(map(str, paths))))["emb"]
    model, _, data_cfg = load_model(cfg.run_dir(0))
    with torch.no_grad():
        whole = model(kit_input(paths, data_cfg)).numpy()  # the whole network in torch, on pixels
    cos = cosine(emb, whole)
    print(f"\ntail over the stored prefix vs the whole tuned network: cosine min {cos.min():.6f}")
    assert cos.min() >= 0.999
    shipped, _ = build_backbone(replace(TrainConfig(), backbone="sface"))
    with torch.no_grad():
        before = shipped(kit_input(paths, data_cfg)).numpy()
    assert cosine(emb, before).min() < 0.9999  # the tuned network is not the shipped one
    graph = GraphRuntime(model.backbone).pooled(decode_pixels(paths, 112, None), ["native"], 3.0, flip=False)
    back = cosine(graph["native"][0], whole)
    print(f"tuned weights written back into the graph, run by {GraphRuntime(model.backbone).engine}: "
          f"cosine min {back.min():.6f}")
    assert back.min() >= 0.999


def test_the_default_run_scores_the_fine_tune_and_the_final_fit_trains_on_train_and_val(faces112, tmp_path):
    exp = tmp_path / "ft.py"  # the default's recipe, batches small enough for 9 families
    exp.write_text("from dataclasses import replace\nfrom kinret.train.experiments import load_experiment\n"
                   "cfg = replace(load_experiment('sface_finetune')[0], name='ft', batch_size=16, eval_pairs=50)\n")
    args = ["--data-root", str(faces112), "--runs", str(tmp_path / "runs"), "--ensemble-dir", str(tmp_path / "ens"),
            "--out", str(tmp_path / "sub"), "--quiet", "--bootstrap", "200", "--experiments", str(exp),
            "--variants", "ft:cos-emb-meanemb", "ft:dba10-clus-div5-emb", "--choose", "best"]
    assert submit.main([*args, "--final-fit"]) == 0
    table = (tmp_path / "sub" / "variants.md").read_text()
    assert "| ft:cos-emb-meanemb |" in table and "| ft:dba10-clus-div5-emb |" in table
    sel = json.loads((tmp_path / "sub" / "selection.json").read_text())
    full = tmp_path / "runs" / "ft" / "full"
    assert sel["final_fit"]["refit"] == {next(iter(sel["weights"])): str(full)}
    assert sel["final_fit"]["trained_on"] == "every labelled family (train and val)"
    families = json.loads((full / "data.json").read_text())["families"]
    assert sum(f.startswith("val/") for f in families) == 3 and sum(f.startswith("train/") for f in families) == 9
    summary = (full / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and ",nan," in summary[2]  # epochs 0 and 1; nothing held out to score
    assert [p.parent.name for p in (tmp_path / "ens" / "scores_final").rglob("test.npy")] == [
        next(iter(sel["weights"])).replace(":", "_").replace("/", "_")]


def test_the_held_out_fold_is_embedded_once_for_the_trainer_and_the_scorer(tuned, faces112, monkeypatch):
    """After its last epoch a fold model embeds its out-of-fold split as the scorer would and keeps it: the scorer
    reads it instead of embedding the fold again, and the kept numbers are the ones it would have computed."""
    from kinret.data.layout import DataLayout
    from kinret.features.feeds import FEEDS
    from kinret.scoring.protocols import build_splits

    cfg, out, _ = tuned
    images = build_splits(DataLayout.of(faces112), cfg.n_folds, cfg.fold_seed, cfg.seed)["oof0"].images
    source = CheckpointSource(cfg.run_dir(0), out / "_cache")
    cache = source.cache_path(images)
    assert cache.is_file()  # written by the trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("the held-out fold was embedded again")

    with monkeypatch.context() as m:
        for cls in FEEDS.values():
            m.setattr(cls, "set_inputs", forbidden)
            m.setattr(cls, "set_pooled", forbidden)
        kept = source.embeddings(images)
    cache.unlink()
    fresh = CheckpointSource(cfg.run_dir(0), out / "_cache").embeddings(images)
    assert kept.keys() == fresh.keys() and all(np.array_equal(kept[k], fresh[k]) for k in kept)


def test_a_split_embedded_for_some_variants_keeps_those_and_grows_quietly_when_more_are_asked(tuned, faces112,
                                                                                              caplog):
    """A split scored for the chosen variants alone (`--score-others`) is embedded for the embeddings they compare;
    a later run asking for more computes the cache again with both, without a warning, to the same numbers."""
    import logging

    from kinret.features.cache import cached_arrays

    cfg, out, _ = tuned
    paths = tuple(sorted((faces112 / "test").rglob("*.jpg"))[:12])
    images = ImageSet("some12", paths, tuple(map(str, paths)))
    source = CheckpointSource(cfg.run_dir(0), out / "_cache")
    cache = source.cache_path(images)
    with caplog.at_level(logging.WARNING):
        emb = source.embeddings(images, {"emb"})
        assert set(emb) == {"emb"} and cached_arrays(cache) == {"emb"}
        more = CheckpointSource(cfg.run_dir(0), out / "_cache").embeddings(images, {"avg"})
        assert set(more) == {"emb", "avg"} and cached_arrays(cache) == {"emb", "avg"}
        every = CheckpointSource(cfg.run_dir(0), out / "_cache").embeddings(images)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert {"emb", "avg", "max", "gem", "native"} <= set(every) == cached_arrays(cache)
    assert np.array_equal(emb["emb"], every["emb"]) and np.array_equal(more["emb"], every["emb"])
    assert np.array_equal(more["avg"], every["avg"])


def test_stored_rows_read_a_slice_of_one_view_or_of_a_subset_s_rows(tmp_path):
    from kinret.features.feed import StoredRows

    stored = np.arange(2 * 10 * 3, dtype=np.float16).reshape(2, 10, 3)
    np.save(tmp_path / "cut.npy", stored)
    whole = StoredRows(tmp_path / "cut.npy", 1, 10)
    assert len(whole) == 10 and np.array_equal(whole[2:5], stored[1, 2:5])
    assert np.array_equal(whole[8:20], stored[1, 8:])
    rows = np.array([7, 1, 1, 4])
    subset = StoredRows(tmp_path / "cut.npy", 0, 10, rows)
    assert len(subset) == 4 and np.array_equal(subset[1:4], stored[0, [1, 1, 4]])
    assert not isinstance(subset[0:2], np.memmap) and not isinstance(whole[0:2], np.memmap)  # copies, map released
