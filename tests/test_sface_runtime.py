"""The graph runtime of an ONNX face network (the shipped SFace here): it agrees with the torch module on every image,
view and pooling, it is chosen for ONNX networks on a CPU (a fine-tuned one included: its weights go back into the
graph), its name and the view count are in the cache key, and one view (flip_views off) flows through the sources
and the trainer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_experiment

from kinret.data.pixels import decode_pixels
from kinret.data.synth_faces import make_family, render_face
from kinret.features import frozen
from kinret.features import runtime as rt
from kinret.features.frozen import FrozenPass
from kinret.features.graph_runtime import GraphRuntime, graph_pooled, pool_map
from kinret.features.sources import BackboneSource, ImageSet
from kinret.models.config import TrainConfig
from kinret.models.networks import POOLS, build_backbone, state_digest
from kinret.models.onnx_net import OnnxBackbone
from kinret.models.sface import sface_onnx_path

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> list[Path]:
    """Six synthetic face photos (112 px JPEG) of one family."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(5)
    family = make_family("F0001", rng, min_members=3, max_members=3, min_images=2, max_images=2)
    paths = []
    for member in family.members:
        for i in range(member.n_images):
            paths.append(root / f"{member.mid}_{i}.jpg")
            render_face(member, rng).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def sface() -> tuple[OnnxBackbone, dict, str]:
    backbone, data_cfg = build_backbone(replace(TrainConfig(), backbone="sface"))
    return backbone, data_cfg, state_digest(backbone)


def features(sface, paths, cache_dir, **kw) -> dict[str, np.ndarray]:
    backbone, data_cfg, digest = sface
    return FrozenPass(backbone, digest, data_cfg, "t", CPU, **kw).outputs(
        paths, cache_dir, pixels=lambda: decode_pixels(paths, 112, None))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_shipped_sface_runs_on_its_graph_and_agrees_with_torch_everywhere(sface, faces, tmp_path):
    backbone, data_cfg, digest = sface
    assert rt.frozen_runtime(backbone, CPU) == rt.GRAPH
    fast = features(sface, faces, tmp_path)
    ref = features(sface, faces, tmp_path, runtime=rt.TORCH_FP32)
    assert set(fast) == set(ref) == set(POOLS) | {"native"}
    assert fast["native"].shape == (2, len(faces), 128) and fast["gem"].shape == (2, len(faces), 1024)
    for k in fast:
        assert fast[k].dtype == np.float32 and fast[k].shape == ref[k].shape
        assert (cosine(fast[k], ref[k]) >= 0.999).all(), k  # every image and view
        assert np.allclose(fast[k], ref[k], atol=1e-4), k
    assert len(list(tmp_path.glob("frozen_t_*"))) == 2  # one pass per runtime


def test_the_runtime_and_the_views_are_in_the_key(sface, faces, tmp_path, monkeypatch):
    _, data_cfg, digest = sface
    backbone = sface[0]
    keys = {FrozenPass(backbone, digest, data_cfg, "t", CPU, runtime=r, flip=v == 2).key("files")
            for r in (rt.GRAPH, rt.TORCH_FP32) for v in (1, 2)}
    assert len(keys) == 4
    ref = features(sface, faces, tmp_path, runtime=rt.TORCH_FP32)
    (torch_pass,) = tmp_path.glob("frozen_t_*")
    for output in torch_pass.glob("*.npy"):  # poison the torch pass: the cv2 path must not read it
        if output.name != "ids.npy":
            np.save(output, np.zeros_like(np.load(output)))
    fast = features(sface, faces, tmp_path)
    assert (cosine(fast["native"], ref["native"]) >= 0.999).all()
    monkeypatch.setattr(frozen, "graph_pooled", lambda *a, **k: pytest.fail("graph cache not reused"))
    assert np.array_equal(features(sface, faces, tmp_path)["avg"], fast["avg"])  # read back, not recomputed


def test_one_view_without_flip(sface, faces, tmp_path):
    both = features(sface, faces, tmp_path)
    one = features(sface, faces, tmp_path, flip=False)
    assert {v.shape[0] for v in one.values()} == {1} and one["avg"].shape == (1, len(faces), 1024)
    for k in both:
        assert np.allclose(one[k][0], both[k][0], atol=1e-5), k  # the image's view is the same numbers
        assert not np.allclose(one[k][0], both[k][1], atol=1e-3), k  # and not the mirror's
    assert len(list(tmp_path.glob("frozen_t_*"))) == 2


def test_a_fine_tuned_sface_runs_its_own_weights_in_the_graph_and_gpus_and_timm_keep_torch(sface, faces, tmp_path):
    backbone, data_cfg, digest = sface
    tuned, _ = build_backbone(replace(TrainConfig(), backbone="sface"))
    with torch.no_grad():
        next(p for n, p in tuned.named_parameters() if n.startswith("head.")).add_(0.01)  # a fine-tuned network
    tuned_digest = state_digest(tuned)
    assert tuned_digest != digest and rt.frozen_runtime(tuned, CPU) == rt.GRAPH
    assert rt.frozen_runtime(backbone, torch.device("cuda")) == rt.TORCH_FP32
    timm_net, _ = build_backbone(replace(TrainConfig(), backbone="test_resnet", input_size=32))
    assert rt.frozen_runtime(timm_net, CPU) == rt.TORCH_FP32
    out = features((tuned, data_cfg, tuned_digest), faces[:2], tmp_path, flip=False)
    with torch.no_grad():  # the tuned module's own embedding, not the shipped one
        want = tuned.forward_native(tuned.forward_features(torch.from_numpy(
            decode_pixels(faces[:2], 112, None)).permute(0, 3, 1, 2).float()))
    shipped = features(sface, faces[:2], tmp_path, flip=False)
    assert np.allclose(out["native"][0], want.numpy(), atol=1e-4)
    assert not np.allclose(out["native"][0], shipped["native"][0], atol=1e-3)


def test_workers_do_not_change_the_numbers_or_their_order(sface, faces):
    pixels = decode_pixels(faces, 112, None)
    runtime = GraphRuntime(sface[0], nets=2)
    names = list(POOLS) + ["native"]
    one = graph_pooled(runtime, lambda a, b: pixels[a:b], len(faces), names, 3.0, True, batch=2, workers=1)
    two = graph_pooled(runtime, lambda a, b: pixels[a:b], len(faces), names, 3.0, True, batch=2, workers=2)
    whole = runtime.pooled(pixels, names, 3.0, True)
    for k in names:
        assert np.array_equal(one[k], two[k]) and np.allclose(one[k], whole[k], atol=1e-5)
    empty = graph_pooled(runtime, lambda a, b: pixels[a:b], 0, names, 3.0, False)
    assert empty["native"].shape == (1, 0, 128) and empty["max"].shape == (1, 0, 1024)


def test_graph_input_and_pooling_against_naive_loops(sface):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    x = GraphRuntime(sface[0]).graph_input(px, flip=True)  # SFace: BGR, raw 0..255, NCHW
    assert x.shape == (4, 3, 112, 112) and x.dtype == np.float32
    for n, c, h, w in zip(*(rng.integers(0, d, 50) for d in (2, 3, 112, 112)), strict=True):
        assert abs(x[n, c, h, w] - px[n, h, w, 2 - c]) < 1e-4  # x / 255 * 255, as the torch path computes it
        assert abs(x[2 + n, c, h, w] - px[n, h, 111 - w, 2 - c]) < 1e-4
    fmap = rng.uniform(-1, 2, (2, 3, 2, 2)).astype(np.float32)
    pooled = pool_map(fmap, ["avg", "max", "gem", "native"], 3.0)
    assert set(pooled) == {"avg", "max", "gem"}
    flat = fmap.reshape(2, 3, 4)
    assert np.allclose(pooled["avg"], flat.mean(-1)) and np.allclose(pooled["max"], flat.max(-1))
    gem = np.array([[np.mean(np.maximum(v, 1e-6) ** 3) ** (1 / 3) for v in row] for row in flat])
    assert np.allclose(pooled["gem"], gem, rtol=1e-5)


def test_the_feature_map_is_a_graph_output_and_the_embedding_is_the_shipped_files(sface):
    import cv2

    runtime = GraphRuntime(sface[0])
    assert runtime.outputs[:2] == ["fc1", sface[0].chain.fmap]
    x = np.random.default_rng(1).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    shipped = cv2.dnn.readNet(str(sface_onnx_path()))
    shipped.setInput(x, "data")
    got = runtime.forward(x)
    assert got[sface[0].chain.fmap].shape == (3, 1024, 7, 7)
    assert np.allclose(got["fc1"], shipped.forward(), atol=1e-4)  # the int8 file, dequantised the same way


def test_one_view_through_the_sources_and_the_head_only_trainer(tmp_path, tiny_data):
    from kinret.train import cli as train

    paths = tuple(sorted((tiny_data / "train").rglob("*.jpg"))[:6])
    images = ImageSet("s", paths, tuple(str(p) for p in paths))
    cfg = replace(TrainConfig(), backbone="test_resnet", input_size=32, threads=1)
    two, one = BackboneSource(cfg, tmp_path), BackboneSource(replace(cfg, flip_views=False), tmp_path)
    assert two.key(images) != one.key(images)
    assert one.raw(images)["avg"].shape == (1, 6, two.raw(images)["avg"].shape[-1])
    assert np.allclose(one.embeddings(images)["avg"], one.raw(images)["avg"][0])
    exp = write_experiment(tmp_path / "head1.py", mode="head", flip_views=False, pool="gem")
    out = tmp_path / "runs"
    assert train.main(["-C", str(exp), "--quiet", "--set", f"data_root={tiny_data}", "--set",
                       f"out_root={out}"]) == 0  # flip augmentation draws view 1: it must not index past view 0
    (folder,) = (out / "_cache").glob("frozen_*")
    assert np.load(folder / "gem.npy").shape[0] == 1
