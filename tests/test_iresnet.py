"""insightface's arcface_torch IResNets: their backbone.pth key names load strictly, the published architecture (block
counts, shapes, the block's computation), the unit chain, frozen BatchNorm statistics, and wrong files refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kinret.errors import KinretInputError
from kinret.models.iresnet import (
    DATA_CFG,
    IRESNETS,
    LAYERS,
    IResNet,
    blocks_per_layer,
    build_iresnet,
)

PUBLISHED = {"iresnet18": [2, 2, 2, 2], "iresnet34": [3, 4, 6, 3], "iresnet50": [3, 4, 14, 3],
             "iresnet100": [3, 13, 30, 3], "iresnet200": [6, 26, 60, 6]}


def _bn(prefix: str, c: int, one_d: bool = False) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def insightface_shapes(layers: list[int], embed: int = 512) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an arcface_torch IResNet state dict, written out from the published architecture."""
    shapes = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64), "prelu.weight": (64,)}
    cin = 64
    for i, (n, c) in enumerate(zip(layers, (64, 128, 256, 512), strict=True), start=1):
        for j in range(n):
            b = f"layer{i}.{j}"
            shapes.update({**_bn(f"{b}.bn1", cin), f"{b}.conv1.weight": (c, cin, 3, 3), **_bn(f"{b}.bn2", c),
                           f"{b}.prelu.weight": (c,), f"{b}.conv2.weight": (c, c, 3, 3), **_bn(f"{b}.bn3", c)})
            if j == 0:  # every layer starts with stride 2, so its first block has a 1x1 conv + BN identity path
                shapes.update({f"{b}.downsample.0.weight": (c, cin, 1, 1), **_bn(f"{b}.downsample.1", c)})
            cin = c
    shapes.update({**_bn("bn2", 512), "fc.weight": (embed, 512 * 7 * 7), "fc.bias": (embed,), **_bn("features", embed)})
    return shapes


def random_state(layers: list[int], seed: int, embed: int = 512) -> dict[str, torch.Tensor]:
    """Random weights under insightface's names; BN statistics positive and near 1 so deep nets stay finite."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in insightface_shapes(layers, embed).items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.randint(0, 1000, shape, generator=g)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        elif "conv" in k or "downsample.0" in k or k == "fc.weight":
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            state[k] = torch.randn(shape, generator=g) / fan_in ** 0.5
        else:
            state[k] = 0.1 * torch.randn(shape, generator=g) + (1.0 if k.endswith(("weight",)) else 0.0)
    state["features.weight"] = torch.ones(embed)  # fixed at 1 by insightface
    return state


def reference_embedding(state: dict[str, torch.Tensor], layers: list[int], x: torch.Tensor) -> torch.Tensor:
    """The published forward pass, written with functional ops on the state dict (eval-mode BatchNorm)."""
    def bn(h, p):
        return F.batch_norm(h, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], False, 0.0, 1e-5)

    h = F.prelu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"), state["prelu.weight"])
    for i, n in enumerate(layers, start=1):
        for j in range(n):
            b, stride = f"layer{i}.{j}", 2 if j == 0 else 1
            out = F.prelu(bn(F.conv2d(bn(h, f"{b}.bn1"), state[f"{b}.conv1.weight"], padding=1), f"{b}.bn2"),
                          state[f"{b}.prelu.weight"])
            out = bn(F.conv2d(out, state[f"{b}.conv2.weight"], stride=stride, padding=1), f"{b}.bn3")
            if j == 0:
                h = bn(F.conv2d(h, state[f"{b}.downsample.0.weight"], stride=stride), f"{b}.downsample.1")
            h = out + h
    h = torch.flatten(bn(h, "bn2"), 1)
    return bn(F.linear(h, state["fc.weight"], state["fc.bias"]), "features")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Random IResNet-18 and -50 weights saved as arcface_torch saves backbone.pth (a plain state dict)."""
    folder = tmp_path_factory.mktemp("iresnet")
    out = {}
    for seed, name in enumerate(("iresnet18", "iresnet50")):
        state = random_state(PUBLISHED[name], seed)
        torch.save(state, folder / f"{name}.pth")
        out[name] = (folder / f"{name}.pth", state)
    return out


def test_published_block_counts_and_names():
    assert IRESNETS == tuple(PUBLISHED)
    for name, layers in PUBLISHED.items():
        with torch.device("meta"):  # IResNet-200 without allocating its weights
            net = IResNet(LAYERS[name])
        assert [len(net.get_submodule(f"layer{i}")) for i in range(1, 5)] == layers, name
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == insightface_shapes(layers), name
        assert net.n_units == 3 + sum(layers)
    norms = [m for m in IResNet(LAYERS["iresnet18"]).modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(norms) == 3 + 3 * 8 + 4 and {m.eps for m in norms} == {1e-5}


@pytest.mark.parametrize("name", ["iresnet18", "iresnet50"])
def test_insightface_weights_load_exactly_and_compute_the_published_network(saved, name):
    path, state = saved[name]
    for given in (name, "iresnet"):  # named, or the depth read off the keys
        net, data_cfg = build_iresnet(given, path)
        assert data_cfg == DATA_CFG and not net.training
        got = net.state_dict()
        assert set(got) == set(state)
        assert all(torch.equal(got[k], v) for k, v in state.items())
    assert not net.features.weight.requires_grad
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fmap = net.forward_features(x)
        emb = net.forward_native(fmap)
        want = reference_embedding(state, PUBLISHED[name], x)
    assert fmap.shape == (2, 512, 7, 7) and net.num_features == 512
    assert emb.shape == (2, 512) and net.native_features == 512
    assert torch.allclose(emb, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_module_prefix_and_other_embedding_width_load(tmp_path):
    state = random_state(PUBLISHED["iresnet18"], 3, embed=128)
    del state["bn2.num_batches_tracked"]  # files from old torch versions lack these counters
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    net, _ = build_iresnet("iresnet", tmp_path / "ddp.pth")
    assert net.native_features == 128 and net.layers == tuple(PUBLISHED["iresnet18"])
    assert torch.equal(net.state_dict()["fc.weight"], state["fc.weight"])
    torch.save({"epoch": 3, "state_dict_backbone": state}, tmp_path / "checkpoint_gpu_0.pt")  # a training checkpoint
    assert torch.equal(build_iresnet("iresnet18", tmp_path / "checkpoint_gpu_0.pt")[0].fc.bias, state["fc.bias"])


def test_unit_chain_composes_to_the_feature_map(saved):
    net, _ = build_iresnet("iresnet18", saved["iresnet18"][0])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # small: the chain needs no fc
    shapes = {0: (3, 32, 32), 1: (64, 32, 32), 3: (64, 32, 32), 4: (64, 16, 16), 6: (128, 8, 8), 11: (512, 2, 2)}
    with torch.no_grad():
        whole = net.forward_features(x)
        assert torch.equal(net.forward_features(x), whole)  # deterministic on the CPU
        for cut in range(net.n_units + 1):
            h = net.forward_prefix(x, cut)
            if cut in shapes:
                assert tuple(h.shape[1:]) == shapes[cut], cut
            assert torch.allclose(net.forward_rest(h, cut), whole, atol=1e-5), cut
        cl = net.to(memory_format=torch.channels_last).forward_features(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(cl, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    units = net.chain_units()
    assert units[:5] == [net.conv1, net.bn1, net.prelu, net.layer1[0], net.layer1[1]]
    in_units = {id(p) for u in units for p in u.parameters()}  # every parameter before bn2 sits in exactly one unit
    assert sum(len(list(u.parameters())) for u in units) == len(in_units)
    names = [n for n, p in net.named_parameters() if id(p) in in_units]
    assert names == [n for n, _ in net.named_parameters() if not n.startswith(("bn2.", "fc.", "features."))]
    net.freeze_units(6)  # conv1, bn1, prelu and the first three blocks
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen == [n for n in names if n.startswith(("conv1.", "bn1.", "prelu.", "layer1.", "layer2.0."))] + [
        "features.weight"]  # insightface fixes features.weight at 1
    with pytest.raises(KinretInputError, match="its chain has 11"):
        net.freeze_units(12)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_running_statistics_in_train_mode(saved, freeze_bn):
    path, state = saved["iresnet18"]
    net, _ = build_iresnet("iresnet18", path, freeze_bn=freeze_bn, dropout=0.5)
    net.train()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    out = net(x)
    out.sum().backward()
    after = net.state_dict()
    kept = all(torch.equal(after[k], state[k]) for k in state if "running" in k)
    assert kept == freeze_bn
    assert net.layer2.get_submodule("0").bn1.weight.grad is not None  # BN affine parameters still train
    assert net.features.weight.grad is None  # insightface fixes it at 1
    if freeze_bn:
        with torch.no_grad():  # BN on running statistics and no dropout: train mode computes what eval mode does
            assert torch.equal(out.detach(), net.eval()(x))


def _fail(path, name="iresnet50"):
    with pytest.raises(KinretInputError) as err:
        build_iresnet(name, path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_wrong_files_are_refused_naming_the_file(saved, tmp_path):
    path18, state18 = saved["iresnet18"]
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert "not a torch state dict" in _fail(tmp_path / "notes.txt")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "not a state dict" in _fail(tmp_path / "list.pth")
    assert "does not exist" in _fail(tmp_path / "absent.pth")
    assert "keys of another depth" in _fail(path18)
    assert "(2, 2, 2, 2) (iresnet18)" in _fail(path18)
    torch.save({k: v for k, v in state18.items() if not k.startswith("layer1.1.")}, tmp_path / "odd.pth")
    assert "match no IResNet depth" in _fail(tmp_path / "odd.pth", "iresnet")
    torch.save({k: v for k, v in state18.items() if k != "layer2.0.bn3.running_var"}, tmp_path / "missing.pth")
    assert "1 keys missing, e.g. layer2.0.bn3.running_var" in _fail(tmp_path / "missing.pth", "iresnet18")
    torch.save({**state18, "fc.bias": torch.zeros(7)}, tmp_path / "shape.pth")
    assert "fc.bias (7,) (wants (512,))" in _fail(tmp_path / "shape.pth", "iresnet18")
    torch.save({**state18, "head.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    assert "keys of no IResNet tensor, e.g. head.weight" in _fail(tmp_path / "extra.pth", "iresnet18")


def test_names_and_native_pool_input_size():
    with pytest.raises(KinretInputError, match="unknown IResNet 'iresnet101'"):
        build_iresnet("iresnet101")
    with pytest.raises(KinretInputError, match="weights"):
        build_iresnet("iresnet")
    net, _ = build_iresnet("iresnet18")
    with torch.no_grad():
        fmap = net.forward_features(torch.zeros(1, 3, 96, 96))
        assert fmap.shape == (1, 512, 6, 6)
        with pytest.raises(KinretInputError, match="112 px"):
            net.forward_native(fmap)
    assert blocks_per_layer(net.state_dict()) == (2, 2, 2, 2)
