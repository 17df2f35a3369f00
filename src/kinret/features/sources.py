"""Where per-image embeddings come from: raw pixels, a frozen backbone, a trained checkpoint, or a file of
embeddings a team computed elsewhere. Each source maps an image set to {embedding name: (N, D) float32}, the
image and its mirror image averaged (flip test-time augmentation; one view with the config's `flip_views` False),
and names its own content in `key`."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from kinret.data.pixels import decode_pixels
from kinret.dist import local_device
from kinret.errors import KinretInputError
from kinret.features.cache import build_in_chunks, cached_arrays, chunk_bounds, file_digest
from kinret.features.feed import Feed
from kinret.features.feeds import feed_class, load_model
from kinret.features.frozen import CODE, Cut, FrozenPass
from kinret.features.image_set import ImageSet
from kinret.features.network import NetworkCard, record_card, recorded_card
from kinret.features.raw_pixels import RawPixels
from kinret.io import atomic_path
from kinret.models.checkpoint import run_config, shared_backbone
from kinret.models.config import TrainConfig
from kinret.models.losses import trains_pair_head
from kinret.models.networks import PairFn, state_digest
from kinret.readback import DamagedFile, read_npz
from kinret.versions import code_version

__all__ = ["BackboneSource", "CheckpointSource", "ExternalEmbeddings", "ImageSet", "RawPixelSource", "run_config"]


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
        return _key("raw32", code_version("kinret.data.images", "kinret.features.raw_pixels"), images.digest)

    def embeddings(self, images: ImageSet, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        cache = Path(self.cache_dir) / f"raw_pixels_{images.label}_{self.key(images)}.npz"
        found = build_in_chunks(cache, np.asarray(images.ids),
                                lambda a, b: {"pixels": RawPixels()(list(images.paths[a:b]))[0][None]}, shard=True,
                                desc=f"raw pixels {images.label}", keys=("pixels",))
        return _views_mean(found)


@dataclass
class BackboneSource:
    """A frozen network's pooled features (every pooling), shared by the head-only checkpoints trained on it;
    computed by its frozen pass (`kinret.features.frozen`), which also keeps the unit `cuts` the fine-tunes of the
    same network read (their cached prefix), so one pass serves them all."""

    cfg: TrainConfig
    cache_dir: Path
    backbones: dict = field(default_factory=dict)
    pair_fn: PairFn | None = None
    cuts: tuple[Cut, ...] = ()

    @property
    def name(self) -> str:
        return self.cfg.backbone + (f"-{Path(self.cfg.weights).stem}" if self.cfg.weights else "")

    @cached_property
    def features(self) -> FrozenPass:
        return frozen_pass(self.cfg, self.backbones, self.cache_dir)

    def key(self, images: ImageSet) -> str:
        return self.features.key(images.digest)

    def raw(self, images: ImageSet) -> dict[str, np.ndarray]:
        """pooling -> (V, N, D) features of the image and (V = 2, `flip_views`) its mirror image."""
        root, size = images.root, self.features.data_cfg["input_size"][-1]
        found = self.features.outputs(root.paths, self.cache_dir, self.cuts, shard=True,
                                      pixels=lambda: decode_pixels(root.paths, size, self.cache_dir))
        return {k: images.of_root(found[k]) for k in self.features.poolings}

    def embeddings(self, images: ImageSet, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        return _views_mean(self.raw(images))


def embed_set(feed: Feed, model: torch.nn.Module, data_cfg: dict, images: ImageSet) -> dict[str, np.ndarray]:
    """{name: (V, N, D)} of a trained model's embeddings of `images`, computed chunk by chunk as a
    `CheckpointSource` computes them (the same numbers)."""
    inputs = feed.set_inputs(model, data_cfg, images)
    parts = [feed.set_pooled(model, data_cfg, images, inputs, a, b) for a, b in chunk_bounds(len(images.ids))]
    return {k: np.concatenate([part[k] for part in parts], axis=1) for k in parts[0]}


def frozen_network(cfg: TrainConfig, backbones: dict, cache_dir: Path | None = None
                   ) -> tuple[torch.nn.Module, dict, str]:
    """(network, data config, weights digest) of a config's network, built once and kept in `backbones` with its
    digest (a network kept there is frozen: hashed once, not per source); its card recorded under `cache_dir`."""
    backbone, data_cfg = shared_backbone(cfg, backbones)
    memo = ("state_digest", id(backbone))
    if memo not in backbones:
        backbones[memo] = state_digest(backbone)
        if cache_dir is not None:
            record_card(cfg, cache_dir, NetworkCard.of(backbone, data_cfg, backbones[memo]))
    return backbone, data_cfg, backbones[memo]


def frozen_pass(cfg: TrainConfig, backbones: dict, cache_dir: Path) -> FrozenPass:
    """The frozen pass of a config's network, named from the network's recorded card without building it when a
    run here built it before (`kinret.features.network`); the network is built when something is computed. One per
    config's pass settings, kept in `backbones`."""
    memo = ("frozen_pass", cfg.backbone_key, cfg.input_convention, cfg.onnx_output, cfg.eval_batch_size, cfg.gem_p,
            cfg.channels_last, cfg.flip_views, cfg.threads, str(cache_dir))
    if memo not in backbones:
        backbones[memo] = _frozen_pass(cfg, backbones, cache_dir)
    return backbones[memo]


def _frozen_pass(cfg: TrainConfig, backbones: dict, cache_dir: Path) -> FrozenPass:
    card = recorded_card(cfg, cache_dir)
    if card is None:
        backbone, data_cfg, digest = frozen_network(cfg, backbones, cache_dir)
        return FrozenPass.of(cfg, backbone, digest, data_cfg, _device())
    build = lambda: frozen_network(cfg, backbones, cache_dir)[0]  # noqa: E731
    return replace(FrozenPass.of(cfg, None, card.digest, card.data_cfg, _device()), card=card, build=build)


@dataclass
class CheckpointSource:
    """One trained checkpoint: its embedding ("emb", what its cosine compares), for a model that trained its network
    also every pooling of it, and its FC pair head when a pair loss trained it; computed as its feed embeds an image
    set (`kinret.features.feed.Feed.set_pooled`). Embeddings are cached in ``{run_dir}/embeddings/{set}_{key}.npz``;
    the key covers the checkpoint file's content and what its feed reads. `config` is the run's config where the
    caller holds it (the trainer, before the run folder's config.json exists), else read from the run folder."""

    run_dir: Path
    cache_dir: Path
    backbones: dict = field(default_factory=dict)
    config: TrainConfig | None = None

    @cached_property
    def cfg(self) -> TrainConfig:
        return self.config if self.config is not None else run_config(self.run_dir)

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
    def feed(self) -> Feed:
        """The run's feed, its starting network the shared build of the run's network (for a fine-tune's prefix)."""
        return feed_class(self.cfg)(self.cfg, _device(), self.cache_dir,
                                    starting=lambda: frozen_pass(self.cfg, self.backbones, self.cache_dir))

    def key(self, images: ImageSet) -> str:
        """The checkpoint's content, the views, the code and what its feed reads for `images`."""
        return _key(self.digest, code_version(*CODE), f"views{2 if self.cfg.flip_views else 1}",
                    self.feed.set_key(images), images.digest)

    def cache_path(self, images: ImageSet) -> Path:
        return self.run_dir / "embeddings" / f"{images.label}_{self.key(images)}.npz"

    def store(self, images: ImageSet, arrays: dict[str, np.ndarray]) -> Path:
        """Keep `arrays` ({name: (V, N, D)}, as `embed_set` computes them) as the embeddings of `images`, written as
        this source writes its own: what the trainer does with the held-out images it embeds after its last epoch."""
        cache = self.cache_path(images)
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, ids=np.asarray(images.ids), **arrays)
        return cache

    def embeddings(self, images: ImageSet, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """{name: (N, D)} of `images`: `names` and "emb" (None: every output, the poolings the model offers to score
        among them, `Feed.embeddings`), read from the cache; a cache holding fewer (written for a split scored for
        some variants only) is computed again with what it held and what is asked, in one pass."""
        cache = self.cache_path(images)
        need = {"emb", *(self.feed.embeddings(self.cfg) if names is None else names)}
        held = cached_arrays(cache)
        narrower = held is not None and "emb" in held and not need <= held  # "emb" is always kept: else damaged
        want = None if names is None else need | (held if narrower else set())  # None: every output
        model, _, data_cfg = self._loaded
        inputs = [None if cache.is_file() and not narrower else self.feed.set_inputs(model, data_cfg, images)]

        def compute(start: int, stop: int) -> dict[str, np.ndarray]:
            if inputs[0] is None:  # a damaged cache is computed again: what it reads, read now
                inputs[0] = self.feed.set_inputs(model, data_cfg, images)
            return self.feed.set_pooled(model, data_cfg, images, inputs[0], start, stop, want)

        found = build_in_chunks(cache, np.asarray(images.ids), compute, shard=True, replace=narrower,
                                desc=f"embed {self.cfg.name} {images.label}", keys=("emb",))
        return _views_mean({k: v for k, v in found.items() if names is None or k in need})

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

    def embeddings(self, images: ImageSet, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        index, emb = self._table
        missing = [i for i in images.ids if i not in index]
        if missing:
            raise KinretInputError(self.path, f"no embedding for {len(missing)} image(s) of the {images.label} set, "
                                              f"e.g. {missing[0]!r}")
        return {"emb": emb[[index[i] for i in images.ids]]}
