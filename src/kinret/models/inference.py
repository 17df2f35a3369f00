"""A network for inference only: every BatchNorm that directly follows a convolution (or a fully connected layer)
folded into it, W' = W s, b' = (b - mean) s + beta with s = gamma / sqrt(var + eps), so a pass runs one layer where
it ran two. Valid because inference normalises with the running statistics; the numbers equal the original's up to
float rounding. The copy is frozen (its folded weights are buffers, nothing trains); the original is left as it was.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kinret.models.iresnet import IBasicBlock, IResNet
from kinret.models.onnx_chain import GraphNode
from kinret.models.onnx_net import OnnxBackbone


def for_inference(backbone: nn.Module) -> nn.Module:
    """An eval-only copy of `backbone` with its BatchNorms folded (the face networks); any other network as is."""
    for kind, fold in FOLDS.items():
        if isinstance(backbone, kind):
            return fold(backbone)
    return backbone


def _fold_iresnet(net: IResNet) -> IResNet:
    out = copy.deepcopy(net).eval()
    for block in out.modules():
        if isinstance(block, IBasicBlock):  # bn3(conv2(prelu(bn2(conv1(bn1(x)))))): bn2 into conv1, bn3 into conv2
            block.conv1, block.bn2 = fuse_conv_bn_eval(block.conv1, block.bn2), nn.Identity()
            block.conv2, block.bn3 = fuse_conv_bn_eval(block.conv2, block.bn3), nn.Identity()
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    return out.requires_grad_(False)


def _fold_onnx(net: OnnxBackbone) -> OnnxBackbone:
    out = copy.deepcopy(net).eval()
    parts = [*out.units, out.head]
    reads = Counter(t for part in parts for n in part.nodes for t in n.inputs)
    kept = {net.chain.fmap, net.info.output, *net.chain.cut_names}  # tensors the kit reads off the graph
    for k, part in enumerate(parts):
        nodes: list[GraphNode] = []
        for n in part.nodes:
            prev = nodes[-1] if nodes else None
            if (n.op == "BatchNormalization" and prev is not None and prev.op == "Conv"
                    and n.inputs[0] == prev.outputs[0] and reads[prev.outputs[0]] == 1 and prev.outputs[0] not in kept):
                nodes[-1] = _fold_conv(out, k, part, prev, n)
            else:
                nodes.append(n)
        part.nodes = nodes
    return out.requires_grad_(False)


def _fold_conv(net: OnnxBackbone, k: int, part: nn.Module, conv: GraphNode, bn: GraphNode) -> GraphNode:
    """The Conv node `conv` with BatchNormalization `bn` folded in, its weights registered in `part` (part `k`)."""
    w = net._const(conv.inputs[1]).detach()
    b = net._const(conv.inputs[2]).detach() if len(conv.inputs) > 2 and conv.inputs[2] else torch.zeros(w.shape[0])
    gamma, beta, mean, var = (net._const(t).detach() for t in bn.inputs[1:5])
    s = gamma / torch.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    names = (f"{bn.outputs[0]}/folded_w", f"{bn.outputs[0]}/folded_b")
    for name, value in zip(names, (w * s.view(-1, *[1] * (w.ndim - 1)), (b - mean) * s + beta), strict=True):
        attr = f"folded_{len(part.onnx_names)}"
        part.register_buffer(attr, value.contiguous())
        part.onnx_names[name] = attr
        net._where[name] = (k, attr)
    return GraphNode("Conv", (conv.inputs[0], *names), bn.outputs, conv.attrs, conv.name)


FOLDS = {OnnxBackbone: _fold_onnx, IResNet: _fold_iresnet}
