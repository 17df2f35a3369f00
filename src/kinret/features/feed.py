"""The interface of what a run's model consumes (`Feed`); the registered feeds are in `kinret.features.feeds`."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from kinret.data.pixels import ImageTable, gather
from kinret.features.frozen import Cut, FrozenPass
from kinret.features.image_set import ImageSet
from kinret.models.config import TrainConfig, seed_of
from kinret.models.inference import for_inference
from kinret.models.losses import LocalBatch
from kinret.models.networks import KinNet, build_backbone, freeze_backbone, pool_names, pooled_dim, state_digest


class Feed:
    """One way of feeding a model (`kinret.features.feeds`). `cfg` is the run's config, `cache_dir` where the caches
    live; `starting` gives, when a trained model's embeddings need it, the frozen pass of the network the run started
    from (the pass it read)."""

    name: ClassVar[str]
    trains_backbone: ClassVar[bool] = True  # the run trains (part of) the network, not only a neck and head
    tolerance: float = 1e-6  # how far epoch 0 may sit from the starting network's zero-shot score

    def __init__(self, cfg: TrainConfig, device: torch.device, cache_dir: Path,
                 starting: Callable[[], FrozenPass] | None = None):
        self.cfg, self.device, self.cache_dir, self.starting = cfg, device, Path(cache_dir), starting
        self.frozen: torch.Tensor | None = None  # the starting network's pooled features of the table, when read
        self.digest = ""  # the frozen network's weights a head-only model is tied to

    # ---- what a config's runs are --------------------------------------------------------------------------------
    @staticmethod
    def serves(cfg: TrainConfig) -> bool:
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: TrainConfig, backbone: nn.Module) -> None:
        """Refuse a config this feed cannot serve (before anything is built)."""

    @classmethod
    def cuts(cls, cfg: TrainConfig) -> tuple[Cut, ...]:
        """The unit cuts its runs read from the frozen pass of their starting network, besides its poolings."""
        return ()

    @classmethod
    def zero_shot(cls, cfg: TrainConfig) -> bool:
        """Whether its runs' starting network is scored too (a zero-shot group beside the trained variants)."""
        return False

    @classmethod
    def embeddings(cls, cfg: TrainConfig) -> list[str]:
        """What a trained model of this feed offers to score: its embedding "emb" and, when it trains the network,
        every pooling of the tuned network but the one equal to the embedding."""
        if not cls.trains_backbone:
            return ["emb"]
        return ["emb"] + [p for p in pool_names(cfg.backbone) if not (p == cfg.pool and cfg.neck == "none")]

    @classmethod
    def rebuild(cls, cfg: TrainConfig, ckpt: dict, path: Path, backbones: dict | None) -> tuple[KinNet, dict]:
        """(model, data config) of a saved run: its network built as it was trained, the checkpoint's weights in."""
        raise NotImplementedError

    def starting_network(self, model: KinNet) -> nn.Module:
        """The network a trained `model` started from (whose frozen pass its feed reads): rebuilt as its trainer
        built it (a scratch network seeded as there)."""
        torch.manual_seed(seed_of(self.cfg.seed))
        return build_backbone(self.cfg)[0].to(self.device)

    # ---- a run's inputs and model ---------------------------------------------------------------------------------
    def frozen_pass(self, start: nn.Module, data_cfg: dict, digest: str = "") -> FrozenPass:
        """The frozen pass of `start`, the network the run starts from (remembered as `starting` when none was given:
        the trainer's model embeds a split later from the pass its training read)."""
        frozen = FrozenPass.of(self.cfg, start, digest or state_digest(start), data_cfg, self.device)
        if self.starting is None:
            self.starting = lambda: frozen
        return frozen

    def load(self, start: nn.Module, data_cfg: dict, table: ImageTable, frozen: bool) -> None:
        """Read (computing what is missing) the inputs of `table`'s images from the network `start`; with `frozen`,
        the starting network's pooled features too (`self.frozen`)."""
        raise NotImplementedError

    def model(self, backbone: nn.Module, data_cfg: dict) -> KinNet:
        """The model this feed trains, on `backbone` (frozen as the config says)."""
        freeze_backbone(backbone, self.cfg)
        return KinNet(backbone, pooled_dim(backbone, self.cfg.pool), self.cfg)

    def batch(self, local: LocalBatch, gen: torch.Generator) -> torch.Tensor:
        """The model inputs of one process's share of a global batch, augmentation drawn from `gen`."""
        raise NotImplementedError

    def forward(self, model: KinNet, x: torch.Tensor) -> torch.Tensor:
        """The embeddings of a batch of inputs."""
        raise NotImplementedError

    def embed_rows(self, model: KinNet, rows: np.ndarray) -> np.ndarray:
        """Embeddings of image-table rows, the mean over the image and (with `flip_views`) its mirror image."""
        raise NotImplementedError

    def _frozen_of(self, outputs: dict[str, np.ndarray], frozen: bool) -> None:
        self.frozen = torch.from_numpy(outputs[self.cfg.pool]) if frozen else None

    # ---- a trained model's embeddings of a split's images ---------------------------------------------------------
    def set_key(self, images: ImageSet) -> str:
        """What the embeddings of `images` depend on besides the checkpoint's content (without loading it)."""
        return ""

    def starting_pass(self) -> FrozenPass:
        """The frozen pass of the network the run started from."""
        return self.starting()

    def set_inputs(self, model: KinNet, data_cfg: dict, images: ImageSet) -> Any:
        """What `set_pooled` reads for `images` (computed here; under torchrun every process calls it in order)."""
        return None

    def set_pooled(self, model: KinNet, data_cfg: dict, images: ImageSet, inputs: Any, start: int, stop: int,
                   names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """{name: (V, stop - start, D)} of `embeddings` for rows start..stop of `images`: those of `names` (and what
        the feed computes with them) when given, else all."""
        raise NotImplementedError

    def inference_network(self, model: KinNet) -> nn.Module:
        """`model`'s network for embedding a split: its BatchNorms folded into the layers before them
        (`kinret.models.inference`), made once per model."""
        if getattr(self, "_folded", (None, None))[0] is not model:
            self._folded = (model, for_inference(model.backbone))
        return self._folded[1]


@torch.no_grad()
def embed_pooled_rows(model: KinNet, features: torch.Tensor, rows: np.ndarray, device: torch.device) -> np.ndarray:
    """`model`'s embeddings of table rows from cached pooled features (V, N, D): the mean over the views."""
    model.eval()
    return model.embed_pooled(features[:, torch.as_tensor(rows)].mean(0).to(device)).float().cpu().numpy()


class StoredRows:
    """Rows of one view of a stored (V, N, ...) `.npy` output, read when sliced: each slice maps the file afresh and
    releases the map once its rows are copied, so a pass over a large output holds one slice, not every page it has
    read (a map held open keeps each page read resident in the process). `rows`: the rows of a subset, else all."""

    def __init__(self, path: Path, view: int, n: int, rows: np.ndarray | None = None):
        self.path, self.view, self.rows = Path(path), view, None if rows is None else np.asarray(rows)
        self.n = n if rows is None else len(self.rows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, at: slice) -> np.ndarray:
        stored = np.load(self.path, mmap_mode="r")[self.view]
        return np.array(stored[at]) if self.rows is None else gather(stored, self.rows[at])


def gather_views(views: Sequence[np.ndarray], rows: np.ndarray, view: np.ndarray) -> np.ndarray:
    """views[view[i]][rows[i]] for every i, each memory map read in ascending row order."""
    rows, view = np.asarray(rows), np.asarray(view)
    out = np.empty((len(rows),) + views[0].shape[1:], dtype=views[0].dtype)
    for v in np.unique(view):
        at = np.flatnonzero(view == v)
        out[at] = gather(views[v], rows[at])
    return out


