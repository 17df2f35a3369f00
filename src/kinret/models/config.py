"""What a run is: one frozen dataclass of defaults (the model, its loss and training, its folds), typed
``--set key=value`` overrides checked against the fields, the seeds a run derives, and its saved form.

Experiment files derive from it (see `kinret.train.experiments`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kinret.data import DEFAULT_ROOT, Fit
from kinret.errors import KinretInputError


@dataclass(frozen=True)
class TrainConfig:
    """Defaults after the seed paper (SGD, lr 1e-2, momentum 0.9, 5,000 + 5,000 pairs an epoch, comb1, BCE)."""

    name: str = "default"
    data_root: str = str(DEFAULT_ROOT)  # holds train/ (FIW folders) and optionally val/
    out_root: str = "runs"
    # model
    backbone: str = "resnet18"          # a face network (sface: the bundled one; onnx: a graph file; iresnet50, ...:
                                        # an arcface_torch checkpoint), or any timm name
    pretrained: bool = False            # timm hub weights (needs the network)
    weights: str = ""                   # a local file: the ONNX graph (onnx), backbone.pth (iresnet*), or a state
                                        # dict of the backbone (sface, timm; overrides `pretrained`)
    input_convention: str = "insightface"  # onnx: how the graph wants its pixels (insightface | sface | facenet |
                                        # imagenet | raw-rgb | unit-rgb, see kinret.models.onnx_net.CONVENTIONS)
    onnx_output: str = ""               # onnx: the graph output that is the embedding, when it has several
    input_size: int = 0                 # 0: from timm's resolve_model_data_config
    pool: str = "avg"                   # avg | max | gem | native (sface's own embedding layer)
    gem_p: float = 3.0
    neck: str = "none"                  # none | residual (identity-initialised linear) | linear
    embed_dim: int = 0                  # width of a "linear" neck; 0 = backbone width
    combination: str = "comb1"          # see kinret.models.networks.COMBINATIONS
    head_widths: tuple[int, ...] = (128,)
    dropout: float = 0.1
    # training
    mode: str = "e2e"                   # e2e (fine-tune the backbone) | head (frozen backbone, cached features)
    freeze: tuple[str, ...] = ()        # backbone parameter-name prefixes kept frozen in e2e mode
    freeze_units: int = 0               # e2e: the first units of a face network's chain kept frozen (and cached)
    loss: str = "bce"                   # see kinret.models.losses.LOSSES
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    margin: float = 0.35                # cosface
    scale: float = 30.0                 # cosface
    temperature: float = 0.1            # supcon
    pairs_per_epoch: int = 5000         # kin pairs; as many non-kin pairs are drawn (pair losses)
    images_per_family: int = 4          # family losses: batches of families x this many images
    epochs: int = 5
    batch_size: int = 64                # global batch (split over DDP processes)
    optimizer: str = "sgd"              # sgd | adamw
    lr: float = 1e-2
    backbone_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    augment: bool = True
    flip_p: float = 0.5
    color_jitter: float = 0.2
    affine_degrees: float = 5.0
    affine_translate: float = 0.05
    affine_scale: float = 0.05
    # folds, evaluation, run control
    n_folds: int = 5
    fold_seed: int = 0
    seed: int = 0
    eval_pairs: int = 1000              # held-out kin pairs for the pair AUC (as many non-kin)
    eval_batch_size: int = 128
    device: str = "auto"                # auto | cpu | cuda
    amp: bool = True                    # CUDA only
    channels_last: bool = True          # memory format for convolutions (CPU and CUDA)
    threads: int = 0                    # torch threads on CPU; 0 = torch's default
    # fine-tuning from a pretrained network (see experiments/sface_finetune.py)
    class_init: str = "random"          # margin-loss class weights: random | means (the normalised family means of
                                        # the starting embeddings, so training starts at the pretrained network)
    classifier_lr: float = 0.0          # lr of the loss's own parameters (class weights); 0: the same as lr
    batching: str = "families"          # family losses: families (images_per_family images a family) | random
    grey_p: float = 0.0                 # e2e: probability that a training image is turned greyscale (style invariance)
    freeze_bn: bool = False             # e2e: backbone BatchNorms keep their running statistics (sface always does)
    cache_prefix: bool = False          # e2e: the frozen leading blocks run once per image, their output cached
    prefix_dtype: str = "float16"       # float16 | float32: storage of the cached prefix output
    prefix_cache_gb: float = 8.0        # refuse a prefix cache larger than this (it is memory-mapped from disk)
    amp_cpu: bool = False               # bfloat16 autocast on a CPU with native bf16 (AVX512-BF16 / AMX) too
    # views of an image in frozen features and embeddings
    flip_views: bool = True             # include the mirror image (feature arrays (2, N, D)); False: (1, N, D)

    def __post_init__(self) -> None:
        choices = {"mode": ("e2e", "head"), "neck": ("none", "residual", "linear"), "optimizer": ("sgd", "adamw"),
                   "pool": ("avg", "max", "gem", "native"), "device": ("auto", "cpu", "cuda")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise KinretInputError(None, f"config {self.name!r}: {key}={getattr(self, key)!r} is not one of "
                                             f"{allowed}")
        for key, (ok, rule) in RULES.items():
            value = getattr(self, key)
            try:
                good = ok(value) and (not isinstance(value, float) or math.isfinite(value))
            except TypeError:
                good = False
            if not good:
                raise KinretInputError(None, f"config {self.name!r}: {key}={value!r} is out of range: must be {rule}")

    def run_dir(self, fold: int) -> Path:
        """``runs/{name}/fold{k}/`` for the default seed, ``fold{k}_seed{s}/`` for others, so seeds never collide;
        the final fit (`Fit.FINAL`) in ``full/``."""
        where = "full" if Fit.of(fold) is Fit.FINAL else f"fold{fold}"
        return Path(self.out_root) / self.name / (where if self.seed == 0 else f"{where}_seed{self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def backbone_key(self) -> tuple:
        """Which network the backbone is: runs with equal keys build the same backbone (and share a built one)."""
        return self.backbone, self.weights, self.pretrained, self.input_size

    @property
    def features_key(self) -> tuple:
        """Which frozen features a head-only run trains on: runs with equal keys share one feature cache."""
        return (*self.backbone_key, self.gem_p, self.channels_last, self.flip_views)


def _in(low: float, high: float, high_open: bool = False) -> Callable[[float], bool]:
    return lambda v: low <= v < high if high_open else low <= v <= high


def _at_least(low: float) -> Callable[[float], bool]:
    return lambda v: v >= low


def _name_ok(name: str) -> bool:
    return bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


# field -> (check, what it must be): every number a run is built from, checked when a config is made
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_name_ok, "a non-empty relative folder name without '..'"),
    "input_size": (_at_least(0), ">= 0 (0: the backbone's own size)"),
    "gem_p": (lambda v: v > 0, "> 0"),
    "embed_dim": (_at_least(0), ">= 0 (0: the backbone's width)"),
    "head_widths": (lambda v: all(w >= 1 for w in v), "widths >= 1"),
    "dropout": (_in(0, 1, high_open=True), "in [0, 1)"),
    "focal_gamma": (_at_least(0), ">= 0"),
    "focal_alpha": (lambda v: v <= 1, "in [0, 1] (or negative: no class weighting)"),
    "margin": (_at_least(0), ">= 0"),
    "scale": (lambda v: v > 0, "> 0"),
    "temperature": (lambda v: v > 0, "> 0"),
    "pairs_per_epoch": (_at_least(1), ">= 1"),
    "images_per_family": (_at_least(1), ">= 1"),
    "epochs": (_at_least(1), ">= 1"),
    "batch_size": (_at_least(2), ">= 2"),
    "lr": (lambda v: v > 0, "> 0"),
    "backbone_lr_mult": (_at_least(0), ">= 0"),
    "momentum": (_in(0, 1, high_open=True), "in [0, 1)"),
    "weight_decay": (_at_least(0), ">= 0"),
    "warmup_epochs": (_at_least(0), ">= 0"),
    "min_lr_ratio": (_in(0, 1), "in [0, 1]"),
    "flip_p": (_in(0, 1), "a probability in [0, 1]"),
    "color_jitter": (_in(0, 1), "in [0, 1]"),
    "affine_degrees": (_in(0, 180), "in [0, 180]"),
    "affine_translate": (_in(0, 1), "in [0, 1]"),
    "affine_scale": (_in(0, 1, high_open=True), "in [0, 1)"),
    "n_folds": (_at_least(2), ">= 2"),
    "eval_pairs": (_at_least(1), ">= 1"),
    "eval_batch_size": (_at_least(1), ">= 1"),
    "threads": (_at_least(0), ">= 0 (0: torch's default)"),
    "freeze_units": (_at_least(0), ">= 0"),
    "class_init": (lambda v: v in ("random", "means"), "one of ('random', 'means')"),
    "classifier_lr": (_at_least(0), ">= 0 (0: the same as lr)"),
    "batching": (lambda v: v in ("families", "random"), "one of ('families', 'random')"),
    "grey_p": (_in(0, 1), "a probability in [0, 1]"),
    "prefix_dtype": (lambda v: v in ("float16", "float32"), "one of ('float16', 'float32')"),
    "prefix_cache_gb": (lambda v: v > 0, "> 0"),
}


def _convert(field: dataclasses.Field, text: str) -> Any:
    kind = typing.get_type_hints(TrainConfig)[field.name]
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise KinretInputError(None, f"--set {field.name}: expected a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise KinretInputError(None, f"--set {field.name}: expected {kind.__name__}, got {text!r}") from None
    item = typing.get_args(kind)[0]  # tuple[X, ...]
    parts = [t for t in text.split(",") if t.strip()]
    try:
        return tuple(item(t.strip()) for t in parts)
    except ValueError:
        raise KinretInputError(None, f"--set {field.name}: expected comma-separated {item.__name__}s, "
                                     f"got {text!r}") from None


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Apply ``key=value`` strings, converted to each field's declared type; unknown keys raise."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise KinretInputError(None, f"--set expects key=value, got {item!r}")
        if key not in by_name:
            raise KinretInputError(None, f"--set {key}: no such config field; known: {', '.join(sorted(by_name))}")
        changes[key] = _convert(by_name[key], value.strip())
    return replace(cfg, **changes)


def seed_of(*parts: int) -> int:
    """One 32-bit seed from several integers (seed, fold, epoch, ...), well mixed, negative parts allowed."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


def save_config(cfg: TrainConfig, path: Path) -> None:
    from kinret.io import write_text_atomic

    write_text_atomic(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    kwargs = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in data.items() if k in names}
    return TrainConfig(**kwargs)
