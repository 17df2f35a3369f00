"""Where per-image embeddings come from: raw pixels, a frozen backbone, a trained checkpoint, or a file of
embeddings a team computed elsewhere. Each source maps an image set to {embedding name: (N, D) float32}, the
image and its mirror image averaged (flip test-time augmentation; one view with the config's `flip_views` False),
and names its own content in `key`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from kinret.data.pixels import decode_pixels, file_list_digest
from kinret.dist import dist_rank_world, local_device
from kinret.errors import KinretInputError
from kinret.features.cache import (
    FEATURE_CODE_VERSION,
    FrozenFeatures,
    build_in_chunks,
    file_digest,
    forward_pooled,
    rest_pooled,
)
from kinret.features.prefix import Prefix, prefix_cut
from kinret.features.raw_pixels import RawPixels
from kinret.models.checkpoint import load_model, run_config, shared_backbone
from kinret.models.config import TrainConfig
from kinret.models.losses import trains_pair_head
from kinret.models.networks import PairFn, state_digest
from kinret.readback import DamagedFile, read_npz


@dataclass(frozen=True)
class ImageSet:
    """The images one split needs ("oof0", "val", "test", ...). `ids` are the paths relative to the data root, as
    external files name images. An out-of-fold set is `rows` of its `parent`, every training image in the
    trainer's order, so a frozen backbone's features come from the one cache the trainer filled."""

    label: str
    paths: tuple[Path, ...]
    ids: tuple[str, ...]
    parent: ImageSet | None = None
    rows: tuple[int, ...] = ()

    @cached_property
    def digest(self) -> str:
        return file_list_digest(self.paths)


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _views_mean(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(V, N, D) -> (N, D): the mean over the views (the image and its mirror image, or the image alone)."""
    return {k: v.mean(axis=0) for k, v in feats.items()}


def _device() -> torch.device:
    """This process's device: its GPU under torchrun (LOCAL_RANK), else the first GPU, else the CPU."""
    return local_device(torch.cuda.is_available())


@dataclass
class RawPixelSource:
    """The training-free baseline: a 32 px thumbnail, centred, unit norm. No flip (a baseline, kept plain)."""

    cache_dir: Path
    name: str = "raw_pixels"
    pair_fn: PairFn | None = None

    def key(self, images: ImageSet) -> str:
        return _key("raw32", FEATURE_CODE_VERSION, images.digest)

    def embeddings(self, images: ImageSet) -> dict[str, np.ndarray]:
        cache = Path(self.cache_dir) / f"raw_pixels_{images.label}_{self.key(images)}.npz"
        found = build_in_chunks(cache, np.asarray(images.ids),
                                lambda a, b: {"pixels": RawPixels()(list(images.paths[a:b]))[0][None]}, shard=True,
                                desc=f"raw pixels {images.label}", keys=("pixels",))
        return _views_mean(found)


@dataclass
class BackboneSource:
    """A frozen backbone's pooled features (every pooling), shared by the head-only checkpoints trained on it;
    computed by the runtime `kinret.features.runtime.frozen_runtime` picks (an ONNX network's graph on a CPU). With
    `prefix_cfg`, a fine-tune's config whose views match, the same pass also writes that fine-tune's prefix."""

    cfg: TrainConfig
    cache_dir: Path
    backbones: dict = field(default_factory=dict)
    pair_fn: PairFn | None = None
    prefix_cfg: TrainConfig | None = None

    @property
    def name(self) -> str:
        return self.cfg.backbone + (f"-{Path(self.cfg.weights).stem}" if self.cfg.weights else "")

    @cached_property
    def _model(self) -> tuple[torch.nn.Module, dict, str]:
        backbone, data_cfg = shared_backbone(self.cfg, self.backbones)
        memo = ("state_digest", id(backbone))  # a backbone kept in `backbones` is frozen: hashed once, not per source
        if memo not in self.backbones:
            self.backbones[memo] = state_digest(backbone)
        return backbone, data_cfg, self.backbones[memo]

    @cached_property
    def features(self) -> FrozenFeatures:
        backbone, data_cfg, digest = self._model
        prefix, ft = None, self.prefix_cfg
        if ft is not None and ft.flip_views == self.cfg.flip_views and not (ft.augment and ft.grey_p > 0):
            prefix = Prefix.of(ft, backbone, prefix_cut(ft, backbone), data_cfg, _device())
        return FrozenFeatures.of(self.cfg, backbone, digest, data_cfg, _device(), prefix)

    def key(self, images: ImageSet) -> str:
        return self.features.key(images.digest)

    def raw(self, images: ImageSet) -> dict[str, np.ndarray]:
        """pooling -> (V, N, D) features of the image and (V = 2, `flip_views`) its mirror image."""
        if images.parent is not None:
            return {k: v[:, list(images.rows)] for k, v in self.raw(images.parent).items()}
        size = self.features.data_cfg["input_size"][-1]
        return self.features.cached(images.paths, lambda: decode_pixels(images.paths, size, self.cache_dir),
                                    self.cache_dir, shard=True)

    def embeddings(self, images: ImageSet) -> dict[str, np.ndarray]:
        return _views_mean(self.raw(images))


@dataclass
class CheckpointSource:
    """One trained checkpoint: its embedding ("emb", what its cosine compares), for end-to-end checkpoints also every
    pooling of its fine-tuned backbone, and its FC pair head when a pair loss trained it. Embeddings are cached in
    ``{run_dir}/embeddings/{set}_{key}.npz``; the key covers the checkpoint file's content."""

    run_dir: Path
    cache_dir: Path
    backbones: dict = field(default_factory=dict)

    @cached_property
    def cfg(self) -> TrainConfig:
        return run_config(self.run_dir)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def has_fc(self) -> bool:
        return trains_pair_head(self.cfg.loss)

    @cached_property
    def digest(self) -> str:
        path = self.run_dir / "checkpoint.pt"
        if not path.is_file():
            raise KinretInputError(None, f"{path} does not exist: train this run first")
        return file_digest(path)

    @cached_property
    def _loaded(self):
        return load_model(self.run_dir, _device(), self.backbones)

    @cached_property
    def prefix(self) -> Prefix | None:
        """The cached prefix an end-to-end run with `cache_prefix` trained on (its frozen units are unchanged)."""
        if self.cfg.mode != "e2e" or not self.cfg.cache_prefix:
            return None
        model, _, data_cfg = self._loaded
        return Prefix.of(self.cfg, model.backbone, prefix_cut(self.cfg, model.backbone), data_cfg, _device())

    def _from_prefix(self, images: ImageSet, start: int, stop: int) -> dict[str, np.ndarray]:
        """Every pooling and the embedding of rows start..stop by the rest of the network over their cached prefix
        (the image and, with `flip_views`, its mirror image; computed here when no pass stored them)."""
        model, cfg, prefix = self._loaded[0], self.cfg, self.prefix
        rows = prefix.read([str(p) for p in images.paths[start:stop]], self.cache_dir)
        if rows is None:
            rows = prefix.stored(prefix.compute(images.paths[start:stop]))
        return rest_pooled(model.backbone, rows[:2 if cfg.flip_views else 1], prefix.cut, _device(),
                           cfg.eval_batch_size, cfg.gem_p, model.neck, cfg.pool, cfg.channels_last)

    @cached_property
    def frozen(self) -> BackboneSource:
        """The frozen backbone's features a head-only checkpoint embeds."""
        return BackboneSource(self.cfg, self.cache_dir, self.backbones)

    def key(self, images: ImageSet) -> str:
        """The checkpoint's content, the views and, for a head-only run, the key of the frozen features it embeds
        (their runtime included)."""
        frozen = self.frozen.key(images) if self.cfg.mode == "head" else ""
        return _key(self.digest, FEATURE_CODE_VERSION, f"views{2 if self.cfg.flip_views else 1}", frozen,
                    images.digest)

    def embeddings(self, images: ImageSet) -> dict[str, np.ndarray]:
        cache = self.run_dir / "embeddings" / f"{images.label}_{self.key(images)}.npz"
        cfg = self.cfg
        inputs: list[np.ndarray] = []  # the decoded pixels, or the frozen backbone's features: read on first need

        def compute(start: int, stop: int) -> dict[str, np.ndarray]:
            model, _, data_cfg = self._loaded
            if cfg.mode == "head":
                pooled = torch.from_numpy(inputs[0][:, start:stop])
                with torch.no_grad():
                    emb = torch.stack([model.embed_pooled(v.to(_device())) for v in pooled])
                return {"emb": emb.float().cpu().numpy()}
            if self.prefix is not None:
                return self._from_prefix(images, start, stop)
            if not inputs:  # under torchrun a process decodes only its chunks
                inputs.append(decode_pixels(images.paths, data_cfg["input_size"][-1], self.cache_dir)
                              if dist_rank_world()[1] == 1 else None)
            pixels = (inputs[0][start:stop] if inputs[0] is not None
                      else decode_pixels(images.paths[start:stop], data_cfg["input_size"][-1], None))
            return forward_pooled(model.backbone, pixels, data_cfg, _device(), cfg.eval_batch_size,
                                  cfg.gem_p, f"embed {cfg.name} {images.label}", cfg.channels_last, model.neck,
                                  cfg.pool, flip=cfg.flip_views)

        if cfg.mode == "head" and not cache.is_file():  # under torchrun every process reaches this cache together
            inputs.append(self.frozen.raw(images)[cfg.pool])
        return _views_mean(build_in_chunks(cache, np.asarray(images.ids), compute, shard=True,
                                           desc=f"embed {cfg.name} {images.label}", keys=("emb",)))

    @property
    def pair_fn(self) -> PairFn | None:
        if not self.has_fc:
            return None
        model = self._loaded[0]

        @torch.no_grad()
        def logits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return model.pair_logits(torch.from_numpy(a).to(_device()),
                                     torch.from_numpy(b).to(_device())).float().cpu().numpy()

        return logits


@dataclass
class ExternalEmbeddings:
    """``embeddings.npz`` with `image_ids` (paths relative to the data root) and `embeddings` (M, D): features a
    team computed elsewhere, one row per image, covering every image of the splits it is scored on."""

    path: Path
    name: str
    pair_fn: PairFn | None = None

    @cached_property
    def _table(self) -> tuple[dict[str, int], np.ndarray]:
        try:
            data = read_npz(self.path, ("image_ids", "embeddings"))
            ids, emb = data["image_ids"].astype(str), np.asarray(data["embeddings"], dtype=np.float32)
        except ValueError as exc:  # DamagedFile among them: a file that is no .npz, or lacks one of the two
            why = exc.reason if isinstance(exc, DamagedFile) else exc
            raise KinretInputError(self.path, f"expected arrays image_ids and embeddings ({why})") from None
        if emb.ndim != 2 or len(emb) != len(ids):
            raise KinretInputError(self.path, f"embeddings have shape {emb.shape} for {len(ids)} image_ids")
        if not np.isfinite(emb).all():
            row = int(np.argwhere(~np.isfinite(emb))[0, 0])
            raise KinretInputError(self.path, f"non-finite embedding at row {row} ({ids[row]})")
        index = {}
        for i, k in enumerate(ids):
            if k in index:
                raise KinretInputError(self.path, f"image id {k!r} appears twice (rows {index[k]} and {i})")
            index[k] = i
        return index, emb

    def key(self, images: ImageSet) -> str:
        return _key(file_digest(self.path), images.digest)

    def embeddings(self, images: ImageSet) -> dict[str, np.ndarray]:
        index, emb = self._table
        missing = [i for i in images.ids if i not in index]
        if missing:
            raise KinretInputError(self.path, f"no embedding for {len(missing)} image(s) of the {images.label} set, "
                                              f"e.g. {missing[0]!r}")
        return {"emb": emb[[index[i] for i in images.ids]]}
