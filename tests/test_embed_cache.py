"""The embedding caches and the frozen pass: chunks saved as they finish (a killed run recomputes only the rest), keys
that change with the images and the weights, the mirror image as the second view, every pooling and unit cut from one
pass, outputs added to a pass's folder later, and a damaged output rebuilt."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import write_image

from kinret.data.pixels import decode_pixels
from kinret.features.cache import build_in_chunks, read_cache
from kinret.features.frozen import Cut, FrozenPass, forward_pooled
from kinret.models.iresnet import IResNet
from kinret.models.networks import POOLS, ResidualNeck, state_digest
from kinret.readback import DamagedFile


def test_a_killed_build_recomputes_only_the_missing_chunks(tmp_path):
    ids = np.array([f"img{i}" for i in range(10)])
    calls = []

    def compute(a, b):
        calls.append((a, b))
        if len(calls) == 3 and kill:
            raise KeyboardInterrupt  # the run is killed while computing the third chunk
        return {"x": np.arange(a, b, dtype=np.float32)[None, :, None] * np.ones((2, 1, 4))}

    cache = tmp_path / "feats.npz"
    kill = True
    with pytest.raises(KeyboardInterrupt):
        build_in_chunks(cache, ids, compute, chunk=3)
    assert not cache.exists() and len(list((tmp_path / "feats.npz.parts").glob("*.npz"))) == 2
    kill, calls = False, []
    out = build_in_chunks(cache, ids, compute, chunk=3)
    assert calls == [(6, 9), (9, 10)]  # the two saved chunks were read, not recomputed
    assert np.array_equal(out["x"][0, :, 0], np.arange(10)) and out["x"].shape == (2, 10, 4)
    assert cache.is_file() and not (tmp_path / "feats.npz.parts").exists()
    calls = []
    assert np.array_equal(build_in_chunks(cache, ids, compute, chunk=3)["x"], out["x"]) and calls == []
    with pytest.raises(DamagedFile, match="image id at row 0 is 'img0', 'img9' expected"):
        read_cache(cache, ids[::-1])


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()


DATA = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_forward_pooled_reads_every_pooling_and_the_mirror_from_one_pass(backbone):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    neck = ResidualNeck(backbone.num_features)
    with torch.no_grad():
        neck.linear.weight.normal_(0, 0.1)  # not the identity any more
    out = forward_pooled(backbone, pixels, DATA, torch.device("cpu"), batch=2, channels_last=False, neck=neck,
                         neck_pool="gem")
    assert set(out) == set(POOLS) | {"emb"} and out["avg"].shape == (2, 5, backbone.num_features)
    mirrored = forward_pooled(backbone, pixels[:, :, ::-1].copy(), DATA, torch.device("cpu"), channels_last=False)
    assert np.allclose(out["avg"][1], mirrored["avg"][0], atol=1e-5)  # row 1 is the mirror image
    with torch.no_grad():
        want = neck(torch.from_numpy(out["gem"][0])).numpy()
    assert np.allclose(out["emb"][0], want, atol=1e-5)


def test_feature_cache_is_keyed_by_images_and_weights(backbone, tmp_path):
    paths = [write_image(tmp_path / "img" / f"{i}.png", i, size=32) for i in range(3)]
    calls = []

    def pixels():
        calls.append(1)
        from kinret.data.pixels import decode_pixels
        return decode_pixels(paths, 32, None)

    def feats(model):
        return FrozenPass(model, state_digest(model), DATA, "t", torch.device("cpu"), channels_last=False).outputs(
            paths, tmp_path / "cache", pixels=pixels)

    first = feats(backbone)
    assert feats(backbone)["avg"].tobytes() == first["avg"].tobytes() and len(calls) == 1  # served from the cache
    write_image(paths[1], 99, size=32)  # an image replaced under the same name
    changed = feats(backbone)
    assert len(calls) == 2 and not np.allclose(changed["avg"][:, 1], first["avg"][:, 1])
    with torch.no_grad():
        next(backbone.parameters()).add_(0.1)  # other weights
    feats(backbone)
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("frozen_t_*"))) == 3


def _faces(tmp_path, n):
    return [write_image(tmp_path / "img" / f"{i}.png", i, size=112) for i in range(n)]


def test_a_cut_is_one_more_output_of_the_pass_added_later_and_resumed_after_a_kill(tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1)).eval()
    data = {"input_size": (3, 112, 112), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    paths = _faces(tmp_path, 5)
    frozen = FrozenPass(net, state_digest(net), data, "ir", torch.device("cpu"), batch=2, chunk=2)
    first = frozen.outputs(paths, tmp_path / "cache")  # poolings only
    folder = frozen.folder(paths, tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["avg.npy", "gem.npy", "ids.npy", "max.npy", "native.npy"]
    calls = []
    real = FrozenPass._compute

    def killed(self, *args):
        calls.append(args[1])
        if len(calls) == 2 and kill:
            raise KeyboardInterrupt  # killed while computing the second chunk
        return real(self, *args)

    monkeypatch.setattr(FrozenPass, "_compute", killed)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        frozen.outputs(paths, tmp_path / "cache", cuts=[Cut(4, "float32")])
    kill, calls = False, []
    out = frozen.outputs(paths, tmp_path / "cache", cuts=[Cut(4, "float32")])
    assert calls == [2, 4]  # the saved first chunk is read, not recomputed
    assert out["avg"].tobytes() == first["avg"].tobytes() and out["cut4-float32"].shape == (2, 5, 64, 56, 56)
    with torch.no_grad():
        x = torch.from_numpy(decode_pixels(paths, 112, None)).permute(0, 3, 1, 2).float() / 255
        want = net.forward_prefix((x - 0.5) / 0.5, 4).numpy()
    assert np.allclose(out["cut4-float32"][0], want, atol=1e-5)
    (folder / "avg.npy").write_bytes(b"not an array")  # damaged: rebuilt with a warning naming it
    with caplog.at_level("WARNING"):
        again = frozen.outputs(paths, tmp_path / "cache", cuts=[Cut(4, "float32")])
    assert "avg.npy: damaged" in caplog.text and again["avg"].tobytes() == first["avg"].tobytes()
