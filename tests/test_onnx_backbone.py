"""Any ONNX face network as a backbone: the bundled SFace through the generic path gives the shipped int8 file's own
features run by cv2.dnn (torch, cv2 and onnxruntime), its unit-24 cut comes out of the same cv2 pass and its tail
gives the embedding; a small network exported here loads, matches its torch source, keeps the chain identity and
frozen BN, trains, and its written-back weights run in cv2; wrong files are refused naming the file."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kinret.data.pixels import normalize, to_float
from kinret.data.synth_faces import make_family, render_face
from kinret.errors import KinretInputError
from kinret.features.graph_runtime import GraphRuntime, cut_key, graph_pooled, pool_map
from kinret.models.networks import POOLS
from kinret.models.onnx_graph import fold_constants, read_graph, with_outputs
from kinret.models.onnx_net import CONVENTIONS, OnnxBackbone, build_onnx_backbone
from kinret.models.sface import sface_onnx_path

CPU = torch.device("cpu")
SFACE_CUT = 24  # issue 19's cut: the input of conv_13, 512 x 7 x 7


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a).reshape(len(a), -1), np.asarray(b).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---- the bundled SFace through the generic path ------------------------------------------------------------------
@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Four synthetic 112 px faces of one family, uint8 RGB (N, H, W, 3)."""
    rng = np.random.default_rng(3)
    family = make_family("F0001", rng, min_members=3, max_members=3, min_images=2, max_images=2)
    return np.stack([np.asarray(render_face(m, rng).convert("RGB").resize((112, 112)))
                     for m in family.members[:2] for _ in range(2)])


class ShippedSFace:
    """The shipped int8 file as it is (no folding, no conversion) run by cv2.dnn, its embedding, feature map and
    unit-24 cut declared as outputs: the reference the generic path is held to."""

    OUTPUTS = {"fc1": (128,), "bn1": (1024, 7, 7), "conv_13_dw_relu": (512, 7, 7)}

    def __init__(self):
        import cv2

        model = with_outputs(read_graph(sface_onnx_path()), list(self.OUTPUTS),
                             {k: ["N", *v] for k, v in self.OUTPUTS.items()})
        self.net = cv2.dnn.readNetFromONNX(np.frombuffer(model.SerializeToString(), dtype=np.uint8))

    def run(self, pixels: np.ndarray, flip: bool = False) -> dict[str, np.ndarray]:
        """uint8 RGB (N, H, W, 3) -> the three tensors of the views (the mirror images after the images)."""
        x = np.ascontiguousarray(pixels[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
        if flip:
            x = np.concatenate([x, x[..., ::-1]])
        self.net.setInput(x, "data")
        return dict(zip(self.OUTPUTS, self.net.forward(list(self.OUTPUTS)), strict=True))


@pytest.fixture(scope="module")
def sface_pair() -> tuple[OnnxBackbone, ShippedSFace, dict]:
    generic, data_cfg = build_onnx_backbone(sface_onnx_path(), "sface")
    return generic, ShippedSFace(), data_cfg


def kit_input(pixels: np.ndarray, data_cfg: dict, flip: bool = False) -> torch.Tensor:
    x = normalize(to_float(pixels, CPU), data_cfg["mean"], data_cfg["std"])
    return torch.cat([x, x.flip(3)]) if flip else x


def test_sface_generic_torch_equals_the_shipped_file(sface_pair, faces):
    generic, shipped, data_cfg = sface_pair
    assert data_cfg == {"input_size": (3, 112, 112), "mean": (0.0,) * 3, "std": (1 / 255,) * 3}
    assert (len(generic.units), generic.num_features, generic.native_features) == (27, 1024, 128)
    x = kit_input(faces, data_cfg, flip=True)
    ref = shipped.run(faces, flip=True)
    with torch.no_grad():
        fa = generic.forward_features(x)
        ea = generic.forward_native(fa)
        prefix = generic.forward_prefix(x, SFACE_CUT)
    diff = float(np.abs(ea.numpy() - ref["fc1"]).max())
    print(f"\nSFace generic (torch) vs the shipped file (cv2): embedding cosine {cosine(ea, ref['fc1']).min():.7f}, "
          f"feature map {cosine(fa, ref['bn1']).min():.7f}, max |diff| {diff:.3g}")
    assert cosine(ea, ref["fc1"]).min() >= 0.999 and cosine(fa, ref["bn1"]).min() >= 0.999
    assert generic.chain.cut_names[SFACE_CUT] == "conv_13_dw_relu" and tuple(prefix.shape[1:]) == (512, 7, 7)
    assert cosine(prefix, ref["conv_13_dw_relu"]).min() >= 0.999


@pytest.mark.parametrize("engine", ["cv2", "onnxruntime"])
def test_sface_generic_runtime_equals_the_shipped_file(sface_pair, faces, engine):
    generic, shipped, data_cfg = sface_pair
    runtime = GraphRuntime(generic, cuts=(SFACE_CUT,), engine=engine)
    assert runtime.engine == engine and runtime.batched
    names = list(POOLS) + ["native"]
    mine = runtime.pooled(faces, names, 3.0, flip=True)
    out = shipped.run(faces, flip=True)
    ref = {"native": out["fc1"], **pool_map(out["bn1"], names, 3.0)}
    for k in names:
        assert cosine(mine[k].reshape(-1, mine[k].shape[-1]), ref[k]).min() >= 0.999, k
    assert runtime.check() >= 0.999


def test_sface_cut_comes_from_the_same_cv2_pass_and_its_tail_gives_the_embedding(sface_pair, faces):
    """Issue 19: the unit-24 output from the cv2 pass matches the torch prefix on every view, and the torch tail
    (forward_rest, then the native head) over it gives the embedding the full network gives."""
    generic, _, data_cfg = sface_pair
    runtime = GraphRuntime(generic, cuts=(SFACE_CUT,), nets=2)
    got = runtime.pooled(faces, ["native", "avg"], 3.0, flip=True)
    prefix = got[cut_key(SFACE_CUT)]
    assert prefix.shape == (2, len(faces), 512, 7, 7)
    x = kit_input(faces, data_cfg, flip=True)
    with torch.no_grad():
        torch_prefix = generic.forward_prefix(x, SFACE_CUT).numpy()
        full = generic.forward_native(generic.forward_features(x)).numpy()
        tail_fmap = generic.forward_rest(torch.from_numpy(prefix.reshape(torch_prefix.shape)), SFACE_CUT)
        tail = generic.forward_native(tail_fmap).numpy()
        tail_avg = POOLS["avg"](tail_fmap, 3.0).numpy()
    views = cosine(prefix.reshape(torch_prefix.shape), torch_prefix)
    print(f"\ncv2 cut {SFACE_CUT} vs torch prefix: cosine min {views.min():.7f} over {len(views)} views; "
          f"tail embedding vs full: {cosine(tail, full).min():.7f}")
    assert views.min() >= 0.999
    assert cosine(tail, full).min() >= 0.999
    assert cosine(tail, got["native"].reshape(full.shape)).min() >= 0.999
    assert cosine(tail_avg, got["avg"].reshape(tail_avg.shape)).min() >= 0.999
    # the batched, threaded loop returns the same rows in the same order
    loop = graph_pooled(runtime, lambda a, b: faces[a:b], len(faces), ["native"], 3.0, True, batch=3, workers=2)
    np.testing.assert_allclose(loop["native"], got["native"], atol=1e-4)
    np.testing.assert_allclose(loop[cut_key(SFACE_CUT)], prefix, atol=1e-4)


def test_folding_keeps_what_the_graph_computes(faces):
    """The folded graph (int8 blocks dequantised into float initializers) runs in cv2 to the shipped file's
    numbers, and its image input is the only input left."""
    import cv2

    model = read_graph(sface_onnx_path())
    folded = fold_constants(model)
    assert {n.op_type for n in folded.graph.node}.isdisjoint({"DequantizeLinear", "Reshape", "Constant"})
    assert [i.name for i in folded.graph.input] == ["data"]
    x = np.ascontiguousarray(faces[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    outs = []
    for m in (model, folded):
        net = cv2.dnn.readNetFromONNX(np.frombuffer(m.SerializeToString(), np.uint8))
        net.setInput(x, "data")
        outs.append(net.forward())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


# ---- a small network exported here ---------------------------------------------------------------------------------
class Block(nn.Module):
    """An IResNet-style block: BN, conv, BN, PReLU, conv, BN, plus the (downsampled) input."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                                  nn.PReLU(c), nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, stride, bias=False), nn.BatchNorm2d(c)) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.down is None else self.down(x))


class TinyFaceNet(nn.Module):
    """A 32 px, 16-d ResNet-like face network (Conv/BN/PReLU/Add/Flatten/Gemm/BatchNorm1d)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))
        self.blocks = nn.Sequential(Block(8, 2), Block(8, 1), Block(8, 2))
        self.bn = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(8 * 8 * 8, 16)
        self.features = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.dropout(torch.flatten(self.bn(self.blocks(self.stem(x))), 1))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[TinyFaceNet, Path]:
    torch.manual_seed(0)
    net = TinyFaceNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.4)
    net.eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(net, torch.zeros(1, 3, 32, 32), buf, input_names=["data"], output_names=["embedding"],
                          dynamic_axes={"data": {0: "N"}, "embedding": {0: "N"}}, dynamo=False)
    path.write_bytes(buf.getvalue())
    return net, path


def tiny_input(n: int = 6, seed: int = 1) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    conv = CONVENTIONS["insightface"]
    return normalize(to_float(pixels, CPU), conv.mean, conv.std)


def test_tiny_export_loads_and_matches_its_torch_source(tiny):
    net, path = tiny
    backbone, data_cfg = build_onnx_backbone(path, "insightface")
    assert data_cfg == {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert (backbone.info.layout, backbone.num_features, backbone.native_features) == ("NCHW", 8, 16)
    assert len(backbone.units) == 4  # the stem and three residual blocks (the last with the final BN)
    x = tiny_input()
    with torch.no_grad():
        mine, ref = backbone(x), net(x)
        fmap = backbone.forward_features(x)
        ref_fmap = net.bn(net.blocks(net.stem(x)))
    np.testing.assert_allclose(mine.numpy(), ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(fmap.numpy(), ref_fmap.numpy(), atol=1e-5)


@pytest.mark.parametrize("engine", ["cv2", "onnxruntime"])
def test_tiny_runtime_gives_the_torch_features(tiny, engine):
    net, path = tiny
    backbone, _ = build_onnx_backbone(path, "insightface")
    runtime = GraphRuntime(backbone, cuts=(1, 2), nets=2, engine=engine)
    assert runtime.engine == engine
    assert runtime.check() >= 0.999
    pixels = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = runtime.pooled(pixels, ["native", "avg", "max", "gem"], 3.0, flip=True)
    x = tiny_input(5, 2)
    x = torch.cat([x, x.flip(3)])
    with torch.no_grad():
        fmap = net.bn(net.blocks(net.stem(x)))
        ref = {"native": net(x).numpy(), **pool_map(fmap.numpy(), ["avg", "max", "gem"], 3.0)}
    for k, v in ref.items():
        np.testing.assert_allclose(got[k].reshape(v.shape), v, atol=1e-4, err_msg=k)
    assert got[cut_key(2)].shape == (2, 5, 8, 16, 16)


def test_tiny_chain_identity_at_every_cut_and_freezing_units(tiny):
    backbone, _ = build_onnx_backbone(tiny[1], "insightface")
    x = tiny_input(3)
    with torch.no_grad():
        full = backbone.forward_features(x)
        for k in range(len(backbone.units) + 1):
            h = backbone.forward_prefix(x, k)
            np.testing.assert_array_equal(backbone.forward_rest(h, k).numpy(), full.numpy(), err_msg=f"cut {k}")
            net = copy.deepcopy(backbone)
            net.freeze_units(k)
            frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
            assert frozen == {n for n, _ in net.named_parameters() if n.startswith(tuple(f"units.{u}." for u in
                                                                                           range(k)))}, k
    with pytest.raises(KinretInputError, match=f"its chain has {backbone.n_units}"):
        backbone.freeze_units(backbone.n_units + 1)
    names = [n for n, _ in backbone.named_parameters()]
    assert all(n.startswith(("units.", "head.")) for n in names)
    assert any(n.startswith("head.") for n in names)  # the Gemm and the last BatchNorm sit after the feature map


def bn_stats(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k or "var" in k or "mean" in k}


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_tiny_freeze_bn(tiny, freeze_bn):
    backbone, _ = build_onnx_backbone(tiny[1], "insightface", freeze_bn=freeze_bn)
    before = bn_stats(backbone)
    assert before, "the BatchNorm statistics are buffers of the module"
    x = tiny_input(4)
    with torch.no_grad():
        evaluated = backbone.eval()(x)
        trained = backbone.train()(x)
    same = all(torch.equal(before[k], v) for k, v in bn_stats(backbone).items())
    assert same == freeze_bn
    assert torch.allclose(evaluated, trained, atol=1e-6) == freeze_bn


def test_tiny_fine_tunes_and_its_weights_go_back_into_the_graph(tiny):
    backbone, _ = build_onnx_backbone(tiny[1], "insightface")
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(0)
    classifier = nn.Linear(16, 3)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(classifier.parameters()), lr=0.05)
    x, y = tiny_input(12, 4), torch.arange(12) % 3
    backbone.train()
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(classifier(nn.functional.normalize(backbone(x)) * 8), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\ntiny fine-tune losses {[round(v, 4) for v in losses]}")
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, start[k])]
    assert any("units.0." in k for k in changed) and any("head." in k for k in changed)
    assert not any("running" in k for k in changed)  # frozen BatchNorm statistics
    backbone.eval()
    with torch.no_grad():
        ref = backbone(x).numpy()
    runtime = GraphRuntime(backbone, engine="cv2")
    pixels = np.random.default_rng(4).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    got = runtime.pooled(pixels, ["native"], 3.0, flip=False)["native"][0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert cosine(got, ref).min() >= 0.999
    # the written-back file loads again as a backbone with the fine-tuned weights
    again_path = tiny[1].with_name("tiny_tuned.onnx")
    again_path.write_bytes(backbone.to_onnx())
    again, _ = build_onnx_backbone(again_path, "insightface")
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), ref, atol=1e-5)


# ---- other graphs: NHWC input, BGR convention; wrong files -------------------------------------------------------
def small_graph(path: Path, input_shape: list, outputs: int = 1, op: str = "Relu") -> Path:
    """input -> Conv 3x3 (4 ch) -> op -> Flatten -> Gemm (5-d) [-> a 2nd output]; with an NHWC input, as converters
    from NHWC frameworks write it: Transpose to NCHW, Conv, Transpose back, op, Flatten in NHWC order, Gemm."""
    rng = np.random.default_rng(0)
    nhwc = input_shape[-1] == 3 and input_shape[1] != 3
    c = input_shape[-1] if nhwc else input_shape[1]
    side = input_shape[1] if nhwc else input_shape[2]
    inits = [numpy_helper.from_array(rng.normal(size=(4, c, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(5, 4 * side * side)).astype(np.float32) * 0.1, "fc")]
    if nhwc:
        nodes = [helper.make_node("Transpose", ["x"], ["x_t"], perm=[0, 3, 1, 2]),
                 helper.make_node("Conv", ["x_t", "w"], ["c_t"], pads=[1, 1, 1, 1]),
                 helper.make_node("Transpose", ["c_t"], ["c"], perm=[0, 2, 3, 1])]
    else:
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])]
    nodes += [helper.make_node(op, ["c"], ["a"]), helper.make_node("Flatten", ["a"], ["f"]),
              helper.make_node("Gemm", ["f", "fc"], ["emb"], transB=1)]
    outs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 5])]
    if outputs == 2:
        outs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 4 * side * side]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)], outs,
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_nhwc_graph_with_bgr_convention(tmp_path):
    """An NHWC graph whose feature map is NHWC too: the kit feeds it BGR NHWC and sees the map as NCHW."""
    path = small_graph(tmp_path / "nhwc.onnx", ["N", 12, 12, 3])
    backbone, data_cfg = build_onnx_backbone(path, "sface")
    assert (backbone.info.layout, backbone.chain.fmap_layout, backbone.num_features) == ("NHWC", "NHWC", 4)
    assert data_cfg["input_size"] == (3, 12, 12)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    x = kit_input(pixels, data_cfg)
    model = onnx.load(path)
    w, fc = (torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer)
    fmap = torch.relu(nn.functional.conv2d(x.flip(1), w, padding=1))  # the graph wants BGR 0..255
    ref = fmap.permute(0, 2, 3, 1).flatten(1) @ fc.T
    with torch.no_grad():
        np.testing.assert_allclose(backbone.forward_features(x).numpy(), fmap.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(backbone(x).numpy(), ref.numpy(), rtol=1e-4, atol=1e-3)
    got = GraphRuntime(backbone).pooled(pixels, ["native", "avg"], 3.0, False)
    np.testing.assert_allclose(got["native"][0], ref.numpy(), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(got["avg"][0], fmap.mean((2, 3)).numpy(), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("name, scale", [("raw-rgb", 255.0), ("unit-rgb", 1.0)])
def test_plain_rgb_conventions_feed_the_pixels_unnormalised(tmp_path, name, scale):
    """`raw-rgb` (graphs that normalise inside) gets RGB 0..255, `unit-rgb` RGB 0..1, in the torch module and the
    graph runtime alike."""
    path = small_graph(tmp_path / "nchw.onnx", ["N", 3, 12, 12])
    backbone, data_cfg = build_onnx_backbone(path, name)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    rgb = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() * (scale / 255.0)
    model = onnx.load(path)
    w, fc = (torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer)
    ref = torch.relu(nn.functional.conv2d(rgb, w, padding=1)).flatten(1) @ fc.T
    with torch.no_grad():
        np.testing.assert_allclose(backbone(kit_input(pixels, data_cfg)).numpy(), ref.numpy(), rtol=1e-4, atol=1e-3)
    got = GraphRuntime(backbone).pooled(pixels, ["native"], 3.0, False)
    np.testing.assert_allclose(got["native"][0], ref.numpy(), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("case, message", [
    ("not_a_graph", "not an ONNX graph"),
    ("grey", "no 3-channel axis"),
    ("not_square", "not square"),
    ("other_size", "input_size 112 was asked"),
    ("two_outputs", "2 outputs"),
    ("unsupported_op", "no torch conversion"),
    ("missing", "not found"),
])
def test_wrong_files_are_refused_naming_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.onnx"
    size = None
    if case == "not_a_graph":
        path.write_bytes(b"\x08\x07 this is not a protobuf graph" * 10)
    elif case == "grey":
        small_graph(path, ["N", 1, 16, 16])
    elif case == "not_square":
        small_graph(path, ["N", 3, 16, 12])
    elif case == "other_size":
        small_graph(path, ["N", 3, 16, 16])
        size = 112
    elif case == "two_outputs":
        small_graph(path, ["N", 3, 16, 16], outputs=2)
    elif case == "unsupported_op":
        small_graph(path, ["N", 3, 16, 16], op="Hardmax")
    with pytest.raises(KinretInputError, match=message) as err:
        build_onnx_backbone(path, "insightface", size=size)
    assert str(path) in str(err.value)


def test_two_outputs_load_once_one_is_chosen(tmp_path):
    path = small_graph(tmp_path / "two.onnx", ["N", 3, 16, 16], outputs=2)
    backbone, _ = build_onnx_backbone(path, "insightface", output="emb")
    assert backbone.native_features == 5 and backbone.info.outputs == ("emb", "f")
    with pytest.raises(KinretInputError, match="no tensor 'nope'"):
        build_onnx_backbone(path, "insightface", output="nope")
    with pytest.raises(KinretInputError, match="unknown input convention"):
        build_onnx_backbone(path, "vggface9", output="emb")


# ---- the op table against ONNX's reference implementation ---------------------------------------------------------
R = np.random.default_rng(7)
X4 = R.normal(size=(2, 4, 7, 7)).astype(np.float32)
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
OP_CASES = [  # (operator, inputs, attributes, opset)
    ("Conv", [X4, R.normal(size=(6, 2, 3, 3)).astype(np.float32), R.normal(size=6).astype(np.float32)],
     dict(group=2, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2]), 17),
    ("Conv", [X4, R.normal(size=(3, 4, 3, 3)).astype(np.float32)], dict(auto_pad="SAME_UPPER", strides=[2, 2]), 17),
    ("MaxPool", [X4], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), 17),
    ("AveragePool", [X4], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0), 17),
    ("AveragePool", [X4], dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], count_include_pad=1), 17),
    ("GlobalAveragePool", [X4], {}, 17),
    ("GlobalMaxPool", [X4], {}, 17),
    ("PRelu", [X4, R.uniform(0, 1, (4, 1, 1)).astype(np.float32)], {}, 17),
    ("PRelu", [X4, R.uniform(0, 1, (7,)).astype(np.float32)], {}, 17),
    ("BatchNormalization", [X4] + [R.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4)],
     dict(epsilon=1e-3), 15),
    ("LayerNormalization", [X4, R.normal(size=7).astype(np.float32), R.normal(size=7).astype(np.float32)], {}, 17),
    ("Gemm", [R.normal(size=(5, 3)).astype(np.float32), R.normal(size=(5, 4)).astype(np.float32),
              R.normal(size=(1, 4)).astype(np.float32)], dict(alpha=0.5, beta=2.0, transA=1), 17),
    ("MatMul", [X4, R.normal(size=(7, 3)).astype(np.float32)], {}, 17),
    ("Clip", [X4, np.array(-0.5, np.float32), np.array(0.7, np.float32)], {}, 17),
    ("Pad", [X4, I64(0, 0, 1, 2, 0, 0, 2, 1)], dict(mode="reflect"), 17),
    ("Pad", [X4, I64(0, 0, 1, 0, 0, 0, 2, 3)], dict(mode="edge"), 17),
    ("Pad", [X4, I64(0, 1, 1, 0, 0, 0, 2, 3), np.array(0.25, np.float32)], {}, 17),
    ("Slice", [X4, I64(-5, 1), I64(7, 100), I64(2, 3), I64(2, 3)], {}, 17),
    ("Gather", [I64(2, 4, 7, 7), I64(0, -1)], dict(axis=0), 17),
    ("ReduceMean", [X4, I64(2, 3)], dict(keepdims=0), 18),
    ("ReduceMean", [X4], dict(axes=[1], keepdims=1), 13),
    ("ReduceL2", [X4, I64(-1)], {}, 18),
    ("ReduceSum", [X4, I64(1)], dict(keepdims=1), 13),
    ("Squeeze", [X4[:, :1], I64(1)], {}, 17),
    ("Unsqueeze", [X4, I64(0, -1)], {}, 17),
    ("Unsqueeze", [X4], dict(axes=[1]), 11),
    ("Flatten", [X4], dict(axis=2), 17),
    ("Reshape", [X4, I64(0, -1, 7)], {}, 17),
    ("Transpose", [X4], dict(perm=[0, 2, 3, 1]), 17),
    ("Concat", [X4, X4[:, :2]], dict(axis=1), 17),
    ("Softmax", [X4], dict(axis=1), 17),
    ("LpNormalization", [X4], dict(axis=1), 17),
    ("LeakyRelu", [X4], dict(alpha=0.2), 17),
    ("HardSigmoid", [X4], {}, 17),
    ("HardSwish", [X4], {}, 17),
    ("Elu", [X4], {}, 17),
    ("Dropout", [X4], {}, 17),
    ("Shape", [X4], dict(start=1), 17),
]


@pytest.mark.parametrize("case", range(len(OP_CASES)), ids=[f"{c[0]}{i}" for i, c in enumerate(OP_CASES)])
def test_torch_ops_match_the_onnx_reference(case):
    from onnx.reference import ReferenceEvaluator

    from kinret.models.onnx_graph import attributes
    from kinret.models.onnx_ops import OPS, OpContext

    op, inputs, attrs, opset = OP_CASES[case]
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op, names, ["out"], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info("out", TensorProto.UNDEFINED, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    (want,) = ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True)))
    got = OPS[op]([torch.from_numpy(v.copy()) for v in inputs], {**attributes(node), "_op": op}, OpContext(opset=opset))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_conversion_that_disagrees_with_the_graph_is_refused(tmp_path, monkeypatch):
    """The first-use check compares the torch module with the graph run by cv2: a wrong operator is caught."""
    from kinret.models import onnx_ops

    path = small_graph(tmp_path / "relu.onnx", ["N", 3, 16, 16])
    monkeypatch.setitem(onnx_ops.OPS, "Relu", lambda args, a, ctx: args[0].abs())
    with pytest.raises(KinretInputError, match="computes other numbers than the graph") as err:
        build_onnx_backbone(path, "insightface")
    assert str(path) in str(err.value)
    backbone, _ = build_onnx_backbone(path, "insightface", check=False)  # unchecked, it loads
    assert backbone.native_features == 5
