"""A network for inference: BatchNorms folded into the layers before them give the same embeddings (up to float
rounding) from fewer nodes, the original keeps training, and a network without foldable layers is used as is."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from kinret.models.config import TrainConfig
from kinret.models.inference import for_inference
from kinret.models.iresnet import IResNet
from kinret.models.networks import build_backbone


def _randomise_batchnorms(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.normal_(generator=g)
            m.bias.data.normal_(generator=g)


def test_folded_sface_embeds_as_the_network_from_fewer_nodes():
    net, _ = build_backbone(replace(TrainConfig(), backbone="sface"))
    folded = for_inference(net)
    assert sum(len(u.nodes) for u in folded.units) < sum(len(u.nodes) for u in net.units)
    assert not any(n.op == "BatchNormalization" for n in folded.units[24].nodes)  # conv_13: Conv, PRelu
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        h = net.forward_prefix(x, 24)
        want, got = net.forward_native(net.forward_rest(h, 24)), folded.forward_native(folded.forward_rest(h, 24))
        cos = nn.functional.cosine_similarity(want, got)
    assert cos.min() > 0.99999 and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert all(p.requires_grad for p in net.parameters()) and not any(p.requires_grad for p in folded.parameters())


def test_folded_iresnet_and_other_networks():
    net = IResNet((1, 1, 1, 1)).eval()
    _randomise_batchnorms(net)
    folded = for_inference(net)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) < sum(
        isinstance(m, nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = net(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert for_inference(plain) is plain  # not a face network: used as it is
