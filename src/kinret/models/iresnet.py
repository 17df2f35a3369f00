"""insightface's IResNets (arcface_torch `backbones/iresnet.py`: IResNet-18/34/50/100/200) written in the kit, loading
the `backbone.pth` files arcface_torch saves, as a backbone with the kit's interface.

The architecture, as published: a stem (conv1 3x3 stride 1, 3 -> 64, bn1, prelu), four layers of `IBasicBlock`s
with 64, 128, 256 and 512 channels, each starting with a stride-2 block whose identity path is a 1x1 stride-2
conv + BatchNorm (`downsample`), then bn2, dropout, flatten, fc (512*7*7 -> 512) and `features`, a BatchNorm1d whose
weight is fixed at 1 (not trained). A block computes bn1, conv1 3x3, bn2, prelu, conv2 3x3 (carrying the stride),
bn3, plus the identity (or downsample(x)). Every conv is bias-free; every BatchNorm has eps 1e-5. Module names equal
insightface's, so `state_dict()` keys are theirs (`conv1.weight`, `layer1.0.bn1.running_mean`, `fc.weight`,
`features.weight`, ...) and a fine-tuned backbone saves as a file arcface_torch reads.

Input convention (insightface's): 112x112 aligned faces, RGB, (x - 127.5) / 127.5 on 0..255 pixels, which is the
kit's 0..1 pixels normalised by mean 0.5 and std 0.5 (`DATA_CFG`).

Interface for the kit: `forward_features` gives the map after bn2 ((N, 512, 7, 7) at 112 px, `num_features` = 512),
`forward_native` the network's own embedding (dropout, flatten, fc, features; `native_features` = fc's width), and
the feature pass is a chain of units - conv1, bn1, prelu, then every block in order - so a frozen leading part can be
cached (`kinret.models.units.UnitChain`: `chain_units`, `forward_prefix`, `forward_rest`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kinret.errors import KinretInputError
from kinret.models.units import NativeEmbedding, UnitChain

log = logging.getLogger(__name__)

LAYERS: dict[str, tuple[int, int, int, int]] = {  # blocks per layer, as published
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
IRESNETS: tuple[str, ...] = tuple(LAYERS)
INFER = "iresnet"  # the name that takes the depth (and embedding width) from the weights file
WIDTHS = (64, 128, 256, 512)  # channels of layer1..layer4
EMBED_DIM = 512  # arcface_torch's default embedding_size
INPUT_SIZE = 112
FC_SIDE = 7  # the fc reads a 512 x 7 x 7 map: 112 px halved by each of the four layers
BN_EPS = 1e-5
DATA_CFG = {"input_size": (3, INPUT_SIZE, INPUT_SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
_BATCHES_TRACKED = "num_batches_tracked"


class IBasicBlock(nn.Module):
    """bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3 (stride) -> bn3, plus x or downsample(x)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(UnitChain, NativeEmbedding):
    """An arcface_torch IResNet with the kit's backbone interface (see the module docstring).

    With freeze_bn=True (default) every BatchNorm and the dropout stay in eval mode even under `.train()`: a
    train-mode pass would otherwise overwrite the pretrained running statistics. BN affine parameters still receive
    gradients, except `features.weight`, which insightface fixes at 1.
    """

    def __init__(self, layers: tuple[int, int, int, int], embed_dim: int = EMBED_DIM, dropout: float = 0.0,
                 freeze_bn: bool = True):
        super().__init__()
        self.layers = tuple(layers)
        self.freeze_bn = freeze_bn
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(WIDTHS[0])
        cin = WIDTHS[0]
        for i, (blocks, cout) in enumerate(zip(self.layers, WIDTHS, strict=True), start=1):
            chain = [IBasicBlock(cin, cout, 2)] + [IBasicBlock(cout, cout) for _ in range(blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*chain))
            cin = cout
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * FC_SIDE * FC_SIDE, embed_dim)
        self.features = nn.BatchNorm1d(embed_dim, eps=BN_EPS)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        self.num_features = cin
        self.native_features = embed_dim
        self.eval()

    def train(self, mode: bool = True) -> IResNet:
        """Switch mode; with freeze_bn the BN layers and dropout are pinned to eval (see the class docstring)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                    m.train(False)
        return self

    def chain_units(self) -> list[nn.Module]:
        """The modules of the chain, in order: conv1, bn1, prelu, layer1.0, ..., layer4.<last>."""
        blocks = [b for i in range(1, 5) for b in self.get_submodule(f"layer{i}")]
        return [self.conv1, self.bn1, self.prelu, *blocks]

    def forward_prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """The first `cut` units on the kit's input (RGB, normalised by `DATA_CFG`)."""
        for unit in self.chain_units()[:cut]:
            x = unit(x)
        return x

    def forward_rest(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        """The units after `cut`, then bn2: forward_rest(forward_prefix(x, k), k) == forward_features(x)."""
        for unit in self.chain_units()[cut:]:
            h = unit(h)
        return self.bn2(h)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> the last feature map (N, 512, H/16, W/16), after bn2."""
        return self.forward_rest(x, 0)

    def forward_native(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> insightface's embedding (dropout, flatten, fc, features); not L2-normalised."""
        if tuple(fmap.shape[2:]) != (FC_SIDE, FC_SIDE):
            raise KinretInputError(None, f"pool 'native' of an IResNet needs {INPUT_SIZE} px input (a {FC_SIDE}x"
                                         f"{FC_SIDE} feature map for its fc), got a {tuple(fmap.shape[2:])} map")
        return self.features(self.fc(torch.flatten(self.dropout(fmap), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_native(self.forward_features(x))


def _layers_of(name: str) -> tuple[int, int, int, int]:
    if name not in LAYERS:
        raise KinretInputError(None, f"unknown IResNet {name!r}; choose one of {list(IRESNETS)}, or {INFER!r} with "
                                     "a weights file to take the depth from it")
    return LAYERS[name]


# ---- arcface_torch's backbone.pth ------------------------------------------------------------------------------------
def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an arcface_torch `backbone.pth` (a plain state dict, also inside a training checkpoint's
    `state_dict_backbone`), with a DataParallel `module.` prefix removed. Raises naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise KinretInputError(path, "IResNet weights file does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a file it cannot read
        raise KinretInputError(path, f"not a torch state dict ({exc.__class__.__name__}: "
                                     f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    for key in ("state_dict_backbone", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise KinretInputError(path, f"not a state dict: holds a {type(state).__name__}, not names -> tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise KinretInputError(path, f"not a state dict: {len(bad)} entries are not named tensors, e.g. {bad[:3]}")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def blocks_per_layer(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Blocks in layer1..layer4 of a state dict, counted from its keys (`layer3.13.conv1.weight` -> 14 in layer3)."""
    counts = []
    for i in range(1, 5):
        indices = {k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}
        numbers = sorted(int(j) for j in indices if j.isdigit())
        counts.append(numbers[-1] + 1 if numbers else 0)
    return tuple(counts)


def _depth_name(layers: tuple[int, ...]) -> str | None:
    return next((name for name, lay in LAYERS.items() if lay == layers), None)


def _check_depth(path: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    """The IResNet the file holds: `name`, or the depth its keys say when `name` is INFER; raises when they differ."""
    counts = blocks_per_layer(state)
    found = _depth_name(counts)
    if name == INFER:
        if found is None:
            raise KinretInputError(path, f"blocks per layer {counts} (from the keys layer1..layer4) match no IResNet "
                                         f"depth: {', '.join(f'{n} {lay}' for n, lay in LAYERS.items())}")
        return found
    _layers_of(name)
    if counts != LAYERS[name]:
        what = found or "no IResNet depth"
        raise KinretInputError(path, f"keys of another depth: blocks per layer {counts} ({what}), but {name} has "
                                     f"{LAYERS[name]}")
    return name


def load_state(model: IResNet, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load `state` into `model` strictly: every key present with its shape and none left over (a missing
    `num_batches_tracked`, absent from files of old torch versions, keeps its value); raises naming `path` and the
    first bad keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_BATCHES_TRACKED)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (wants {tuple(v.shape)})" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}" for what, keys in
                [("keys missing", missing), ("keys of no IResNet tensor", unexpected),
                 ("tensors of another shape", shapes)] if keys]
    if problems:
        raise KinretInputError(path, "weights do not fit the IResNet: " + "; ".join(problems))
    model.load_state_dict({**own, **state}, strict=True)


def build_iresnet(name: str, weights: str | Path | None = None, freeze_bn: bool = True,
                  dropout: float = 0.0) -> tuple[IResNet, dict]:
    """IResNet `name` (one of IRESNETS, or INFER with a weights file) and its data config (`DATA_CFG`), with the
    weights of an arcface_torch `backbone.pth` when given (strictly; the embedding width taken from its fc), else
    torch's default initialisation; returned in eval mode."""
    if weights is None:
        if name == INFER:
            raise KinretInputError(None, f"backbone {INFER!r} takes its depth from a weights file: set weights=FILE "
                                         f"or name the depth ({', '.join(IRESNETS)})")
        return IResNet(_layers_of(name), dropout=dropout, freeze_bn=freeze_bn), dict(DATA_CFG)
    path = Path(weights)
    state = read_state(path)
    name = _check_depth(path, name, state)
    fc = state.get("fc.weight")
    embed_dim = fc.shape[0] if fc is not None and fc.ndim == 2 else EMBED_DIM
    model = IResNet(LAYERS[name], embed_dim=embed_dim, dropout=dropout, freeze_bn=freeze_bn)
    load_state(model, state, path)
    log.info("loaded %s (%d-d embedding) from %s", name, embed_dim, path)
    return model.eval(), dict(DATA_CFG)
