"""What a run's model consumes, one registered class each (`FEEDS`), asked by the trainer, the held-out evaluation,
the embedding sources and the variant discovery alike, so none of them tests a run's mode:

- `CachedFeatures` (head-only runs, ``mode="head"``): the pooled features of the frozen network, from its frozen
  pass (`kinret.features.frozen`); the model is the neck and head alone.
- `CachedPrefix` (``mode="e2e"`` with ``cache_prefix``): the output of the frozen network's first `freeze_units`
  units, one more output of the same frozen pass; the model runs the rest of the network on it.
- `Pixels` (any other end-to-end run): the decoded images, augmented; the model runs the whole network.

A feed class says what its runs need built before training and which frozen outputs they read (`cuts`), whether
they train the backbone, and what a trained model of it offers to score; a feed instance holds one run's inputs
(`load`), draws its training inputs (`batch`), runs the model on them (`forward`) and embeds image-table rows
(`embed_rows`) or an image set of a split (`set_inputs`, `set_pooled`). Adding a way to consume images is one class
and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kinret.data.pixels import ImageTable, decode_pixels, gather, normalize, to_float
from kinret.dist import autocast, dist_rank_world
from kinret.errors import KinretInputError
from kinret.features.augment import augment
from kinret.features.feed import Feed, StoredRows, embed_pooled_rows, gather_views
from kinret.features.frozen import Cut, FrozenPass, forward_pooled, rest_pooled
from kinret.features.image_set import ImageSet
from kinret.models.checkpoint import read_checkpoint, shared_backbone
from kinret.models.config import TrainConfig, seed_of
from kinret.models.losses import LocalBatch, loss_class
from kinret.models.networks import FACE_NETWORKS, KinNet, build_backbone, pooled_dim, state_digest
from kinret.models.units import UnitChain


class CachedFeatures(Feed):
    """Head-only runs: the frozen network's pooled features (every view), cached by its frozen pass."""

    name = "features"
    trains_backbone = False

    @staticmethod
    def serves(cfg: TrainConfig) -> bool:
        return cfg.mode == "head"

    @classmethod
    def check(cls, cfg: TrainConfig, backbone: nn.Module) -> None:
        if not loss_class(cfg.loss).trains_pair_head and cfg.neck == "none":
            raise KinretInputError(None, f"{cfg.name}: head-only mode with the embedding loss {cfg.loss!r} has "
                                         "nothing to train; set neck=residual (starts as the identity) or "
                                         "neck=linear")

    @classmethod
    def zero_shot(cls, cfg: TrainConfig) -> bool:
        return True

    @classmethod
    def rebuild(cls, cfg: TrainConfig, ckpt: dict, path: Path, backbones: dict | None) -> tuple[KinNet, dict]:
        """The head on its frozen network, rebuilt from its source (shared through `backbones`), which must hash to
        the digest recorded at training time, so features never come from other weights."""
        backbone, data_cfg = shared_backbone(cfg, backbones) if backbones is not None else build_backbone(cfg)
        model = KinNet(backbone, pooled_dim(backbone, cfg.pool), cfg)
        digest = state_digest(backbone)
        if digest != ckpt["backbone_digest"]:
            raise KinretInputError(path, f"the frozen backbone {cfg.backbone!r} now has other weights (digest "
                                         f"{digest}, trained with {ckpt['backbone_digest']}): retrain the head")
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            raise KinretInputError(path, f"checkpoint does not fit the model (missing {missing[:3]}, unexpected "
                                         f"{unexpected[:3]})")
        return model, data_cfg

    def starting_network(self, model: KinNet) -> nn.Module:
        return model.backbone  # the frozen network itself, checked against the digest when the head was loaded

    def load(self, start: nn.Module, data_cfg: dict, table: ImageTable, frozen: bool = True) -> None:
        self.digest = self.digest or state_digest(start)
        size = data_cfg["input_size"][-1]
        outputs = self.frozen_pass(start, data_cfg, self.digest).outputs(
            table.paths, self.cache_dir, pixels=lambda: decode_pixels(table.paths, size, self.cache_dir))
        self.features = self.frozen = torch.from_numpy(outputs[self.cfg.pool])

    def model(self, backbone: nn.Module, data_cfg: dict) -> KinNet:
        return KinNet(None, pooled_dim(backbone, self.cfg.pool), self.cfg)

    def batch(self, local: LocalBatch, gen: torch.Generator) -> torch.Tensor:
        flip = torch.rand(local.total, generator=gen)[local.positions] < (self.cfg.flip_p if self.cfg.augment
                                                                          else 0.0)
        view = flip.long().clamp(max=len(self.features) - 1)  # one view (flip_views off): no flip to draw
        return self.features[view, torch.as_tensor(local.rows)].to(self.device)

    def forward(self, model: KinNet, x: torch.Tensor) -> torch.Tensor:
        return model.embed_pooled(x)

    def embed_rows(self, model: KinNet, rows: np.ndarray) -> np.ndarray:
        return embed_pooled_rows(model, self.features, rows, self.device)

    def set_key(self, images: ImageSet) -> str:
        return self.starting_pass().key(images.digest)

    def set_inputs(self, model: KinNet, data_cfg: dict, images: ImageSet) -> np.ndarray:
        """The frozen network's features of `images` (the network a head is tied to: checked when it was loaded)."""
        frozen, root = self.starting_pass(), images.root
        size = frozen.data_cfg["input_size"][-1]
        outputs = frozen.outputs(root.paths, self.cache_dir, shard=True,
                                 pixels=lambda: decode_pixels(root.paths, size, self.cache_dir))
        return images.of_root(outputs[self.cfg.pool])

    def set_pooled(self, model: KinNet, data_cfg: dict, images: ImageSet, inputs: np.ndarray, start: int,
                   stop: int, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        with torch.no_grad():
            views = torch.from_numpy(inputs[:, start:stop])
            return {"emb": torch.stack([model.embed_pooled(v.to(self.device)) for v in views]).float().cpu().numpy()}


class EndToEnd(Feed):
    """What the two end-to-end feeds share: the whole network is the model, and the starting network's pooled
    features (for class weights at the family means) come from its frozen pass."""

    @classmethod
    def rebuild(cls, cfg: TrainConfig, ckpt: dict, path: Path, backbones: dict | None) -> tuple[KinNet, dict]:
        """The whole network from the checkpoint: a face network built from its local file first, a timm network
        as its bare structure (no download)."""
        bare = cfg if cfg.backbone in FACE_NETWORKS else replace(cfg, pretrained=False, weights="")
        backbone, data_cfg = build_backbone(bare)
        model = KinNet(backbone, pooled_dim(backbone, cfg.pool), cfg)
        model.load_state_dict(ckpt["model"])
        return model, data_cfg

    def forward_views(self, model: KinNet, view: Callable[[int, np.ndarray], torch.Tensor], rows: np.ndarray,
                      amp: bool = False) -> np.ndarray:
        """`embed_rows` over batches of rows, `view(v, chunk)` giving the model's input of view v (under autocast
        with `amp`, as the config asks)."""
        model.eval()
        views = 2 if self.cfg.flip_views else 1
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), self.cfg.eval_batch_size):
                chunk = np.asarray(rows[i:i + self.cfg.eval_batch_size])
                with autocast(self.device, self.cfg.amp and amp, self.cfg.amp_cpu and amp):
                    e = sum(self.forward(model, view(v, chunk)).float() for v in range(views)) / views
                out.append(e.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x


class CachedPrefix(EndToEnd):
    """End-to-end runs whose first `freeze_units` units stay frozen (`cache_prefix`): their output, one more output
    of the starting network's frozen pass (a `Cut`), stored as `prefix_dtype`; the views are the image, its mirror
    image (`flip_views`) and the greyscale copies of both (with `grey_p`): index = mirror + n_mirror * grey."""

    name = "prefix"

    @staticmethod
    def serves(cfg: TrainConfig) -> bool:
        return cfg.mode == "e2e" and cfg.cache_prefix

    @classmethod
    def check(cls, cfg: TrainConfig, backbone: nn.Module) -> None:
        """Refuse a config a cached prefix cannot serve: a network without a chain of units, augmentations the
        cached views cannot give, no frozen leading unit, a prefix over `prefix_cache_gb`."""
        name = cfg.name
        if not isinstance(backbone, UnitChain):
            raise KinretInputError(None, f"{name}: cache_prefix needs a face network written as a chain of units "
                                         f"({', '.join(FACE_NETWORKS)}), not {cfg.backbone!r}")
        if cfg.augment and (cfg.color_jitter > 0 or cfg.affine_degrees > 0 or cfg.affine_translate > 0
                            or cfg.affine_scale > 0):
            raise KinretInputError(None, f"{name}: with cache_prefix only flip and greyscale augmentation can apply "
                                         "(cached views); set color_jitter=0 and affine_degrees, affine_translate, "
                                         "affine_scale to 0, or cache_prefix=false to augment pixels")
        if cfg.augment and cfg.flip_p > 0 and not cfg.flip_views:
            raise KinretInputError(None, f"{name}: flip augmentation needs the mirror view cached: set "
                                         "flip_views=true, or flip_p=0")
        if cfg.freeze_units == 0:
            raise KinretInputError(None, f"{name}: cache_prefix needs frozen leading units: set freeze_units")
        backbone.check_cut(cfg.freeze_units, f"{name}: freeze_units")

    @classmethod
    def zero_shot(cls, cfg: TrainConfig) -> bool:
        return cfg.backbone in FACE_NETWORKS

    @classmethod
    def cuts(cls, cfg: TrainConfig) -> tuple[Cut, ...]:
        colour = Cut(cfg.freeze_units, cfg.prefix_dtype)
        return (colour, Cut(cfg.freeze_units, cfg.prefix_dtype, grey=True)) if cfg.augment and cfg.grey_p > 0 else (
            colour,)

    @property
    def cut(self) -> int:
        return self.cfg.freeze_units

    def check_size(self, frozen: FrozenPass, n_images: int) -> None:
        """Refuse a prefix of `n_images` over `prefix_cache_gb` (before anything is computed or reused)."""
        cuts = self.cuts(self.cfg)
        nbytes = (len(cuts) * frozen.views * n_images * int(np.prod(frozen.cut_shape(self.cut)))
                  * np.dtype(self.cfg.prefix_dtype).itemsize)
        if nbytes > self.cfg.prefix_cache_gb * 1e9:
            raise KinretInputError(None, f"the prefix cache would take {nbytes / 1e9:.1f} GB, over prefix_cache_gb="
                                         f"{self.cfg.prefix_cache_gb}: freeze more units (a deeper, smaller cut), "
                                         "use prefix_dtype=float16, or raise prefix_cache_gb")

    def _outputs(self, frozen: FrozenPass, data_cfg: dict, paths: Sequence[Path], shard: bool = False
                 ) -> dict[str, np.ndarray]:
        self.check_size(frozen, len(paths))
        size = data_cfg["input_size"][-1]
        return frozen.outputs(paths, self.cache_dir, self.cuts(self.cfg), shard,
                              pixels=lambda: decode_pixels(paths, size, self.cache_dir))

    def _views(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every stored view, in view-index order: the colour views, then the greyscale ones."""
        return [v for cut in self.cuts(self.cfg) for v in outputs[cut.name]]

    def load(self, start: nn.Module, data_cfg: dict, table: ImageTable, frozen: bool) -> None:
        outputs = self._outputs(self.frozen_pass(start, data_cfg), data_cfg, table.paths)
        self._frozen_of(outputs, frozen)
        self.prefix = self._views(outputs)
        if self.cfg.prefix_dtype == "float16":  # float16 moves embeddings by ~1e-3 relative: a tie may turn
            self.tolerance = 2e-3

    def batch(self, local: LocalBatch, gen: torch.Generator) -> torch.Tensor:
        """The stored views drawn as `augment` draws them (flip, then greyscale when on), so a run on the cache
        takes the views a run on pixels would."""
        on, pos = self.cfg.augment, local.positions
        mirrors = 2 if self.cfg.flip_views else 1
        view = (torch.rand(local.total, generator=gen)[pos] < (self.cfg.flip_p if on else 0.0)).long().clamp(
            max=mirrors - 1)
        if len(self.prefix) > mirrors:
            view += mirrors * (torch.rand(local.total, generator=gen)[pos] < self.cfg.grey_p).long()
        return self._layout(torch.from_numpy(gather_views(self.prefix, local.rows, view.numpy())).to(
            self.device).float())

    def forward(self, model: KinNet, x: torch.Tensor) -> torch.Tensor:
        return model.embed_rest(x, self.cut)

    def embed_rows(self, model: KinNet, rows: np.ndarray) -> np.ndarray:
        return self.forward_views(model, lambda v, chunk: self._layout(
            torch.from_numpy(gather(self.prefix[v], chunk)).to(self.device)).float(), rows)

    def set_key(self, images: ImageSet) -> str:
        return self.starting_pass().key(images.digest)

    def set_inputs(self, model: KinNet, data_cfg: dict, images: ImageSet) -> list[np.ndarray]:
        """The stored views (not the greyscale ones) of `images`, from the frozen pass of the network the model
        was fine-tuned from (whose first units it shares: checked)."""
        frozen = self.starting_pass()
        if frozen.net.units_digest(self.cut) != model.backbone.units_digest(self.cut):
            raise KinretInputError(None, f"{self.cfg.name}: the checkpoint's first {self.cut} units differ from the "
                                         f"network {self.cfg.backbone!r} it was fine-tuned from: retrain it")
        stored = self._outputs(frozen, frozen.data_cfg, images.root.paths, shard=True)[self.cuts(self.cfg)[0].name]
        rows = None if images.parent is None else np.asarray(images.rows)
        return [StoredRows(stored.filename, v, len(images.root.paths), rows) for v in range(len(stored))]

    def set_pooled(self, model: KinNet, data_cfg: dict, images: ImageSet, inputs: list[StoredRows], start: int,
                   stop: int, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        cfg = self.cfg
        return rest_pooled(self.inference_network(model), [v[start:stop] for v in inputs], self.cut, self.device,
                           cfg.eval_batch_size, cfg.gem_p, model.neck, cfg.pool, cfg.channels_last, names)


class Pixels(EndToEnd):
    """Any other end-to-end run: the decoded images (cached per input size), augmented on the fly."""

    name = "pixels"

    @staticmethod
    def serves(cfg: TrainConfig) -> bool:
        return cfg.mode == "e2e" and not cfg.cache_prefix

    def load(self, start: nn.Module, data_cfg: dict, table: ImageTable, frozen: bool) -> None:
        size = data_cfg["input_size"][-1]
        if frozen:
            self._frozen_of(self.frozen_pass(start, data_cfg).outputs(
                table.paths, self.cache_dir, pixels=lambda: decode_pixels(table.paths, size, self.cache_dir)),
                True)
        self.pixels = decode_pixels(table.paths, size, self.cache_dir)
        self.data_cfg = data_cfg

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self._layout(normalize(x, self.data_cfg["mean"], self.data_cfg["std"]))

    def batch(self, local: LocalBatch, gen: torch.Generator) -> torch.Tensor:
        x = to_float(gather(self.pixels, local.rows), self.device)
        if self.cfg.augment:
            parts, start = [], 0  # each block is a run of positions in the global batch, augmented as one slice
            for block in local.blocks:
                parts.append(augment(x[start:start + len(block)], self.cfg, gen,
                                     offset=int(block[0]) if len(block) else 0, total=local.total))
                start += len(block)
            x = torch.cat(parts)
        return self._input(x)

    def forward(self, model: KinNet, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def embed_rows(self, model: KinNet, rows: np.ndarray) -> np.ndarray:
        def view(v: int, chunk: np.ndarray) -> torch.Tensor:
            x = self._input(to_float(gather(self.pixels, chunk), self.device))
            return x.flip(3) if v else x

        return self.forward_views(model, view, rows, amp=True)

    def set_inputs(self, model: KinNet, data_cfg: dict, images: ImageSet) -> np.ndarray | None:
        if dist_rank_world()[1] > 1:  # under torchrun a process decodes only its chunks
            return None
        return decode_pixels(images.paths, data_cfg["input_size"][-1], self.cache_dir)

    def set_pooled(self, model: KinNet, data_cfg: dict, images: ImageSet, inputs: np.ndarray | None, start: int,
                   stop: int, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        cfg, size = self.cfg, data_cfg["input_size"][-1]
        pixels = inputs[start:stop] if inputs is not None else decode_pixels(images.paths[start:stop], size, None)
        return forward_pooled(self.inference_network(model), pixels, data_cfg, self.device, cfg.eval_batch_size,
                              cfg.gem_p, f"embed {cfg.name} {images.label}", cfg.channels_last, model.neck, cfg.pool,
                              flip=cfg.flip_views, names=names)


FEEDS: dict[str, type[Feed]] = {cls.name: cls for cls in (CachedFeatures, CachedPrefix, Pixels)}


def feed_class(cfg: TrainConfig) -> type[Feed]:
    """The feed a config's runs consume: the registered feed that serves it, the most specific one when a feed
    derived from another serves it too (a specialised feed overrides the one it derives from)."""
    found = [cls for cls in FEEDS.values() if cls.serves(cfg)]
    best = [cls for cls in found if all(issubclass(cls, other) for other in found)]
    if len(best) != 1:
        raise KinretInputError(None, f"{cfg.name}: mode={cfg.mode!r}, cache_prefix={cfg.cache_prefix} is served by "
                                     f"{', '.join(c.name for c in found) or 'no feed'} (feeds: {', '.join(FEEDS)})")
    return best[0]


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", backbones: dict | None = None
               ) -> tuple[KinNet, TrainConfig, dict]:
    """(model in eval mode, its config, its data config) from ``run_dir/checkpoint.pt``, rebuilt as its feed says.

    `backbones`, a dict kept by the caller, shares one frozen network between the head-only checkpoints built on
    it (they never change it), so scoring a grid of heads builds it once."""
    ckpt, cfg, path = read_checkpoint(run_dir)
    torch.manual_seed(seed_of(cfg.seed))  # as the trainer did: a scratch backbone is rebuilt identically
    model, data_cfg = feed_class(cfg).rebuild(cfg, ckpt, path, backbones)
    return model.to(device).eval(), cfg, ckpt["data_config"]
