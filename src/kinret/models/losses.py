"""Loss registry. A loss owns everything its kind changes in training, so the trainer never asks which kind it holds:
what a global batch holds and how an epoch's batches are drawn (`epoch_batches`), how many row blocks a batch has
and so how it is sliced over DDP processes (`blocks`, `local_batch`), what the model computes for a batch
(`batch_loss`), whether it trains the FC pair head (`trains_pair_head`) and which configs it refuses (`check`).

Pair losses (the seed paper's BCE and focal) score kin/non-kin pairs through the FC head; family losses (beyond the
paper) use every member of a family at once on the embeddings that cosine similarity compares. The samplers the
kinds draw from (`sample_pairs`, `family_batches`, `random_batches`) live here, below the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig

Batch = tuple[np.ndarray, np.ndarray]  # a global batch: its input rows (`blocks` blocks of len(target) rows), target


def sample_pairs(family: np.ndarray, member: np.ndarray, rows: np.ndarray, n: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` kin pairs (same family, different member) and `n` non-kin pairs (different families) among `rows`,
    shuffled together: returns row indices a, b and the 0/1 kin label. Anchors are drawn uniformly over images."""
    rows = np.asarray(rows)
    fam, mem = family[rows], member[rows]
    by_family: dict[int, np.ndarray] = {}
    for f in np.unique(fam):
        by_family[int(f)] = np.flatnonzero(fam == f)
    multi = {f: len(np.unique(mem[idx])) > 1 for f, idx in by_family.items()}  # families with two members
    eligible = np.array([multi[int(f)] for f in fam], dtype=bool)
    if not eligible.any() or len(by_family) < 2:
        raise KinretInputError(None, "pair sampling needs a family with two members holding images, and two families")
    anchors = rng.choice(np.flatnonzero(eligible), size=n)
    kin_b = np.empty(n, dtype=np.int64)
    for i, a in enumerate(anchors):
        pool = by_family[int(fam[a])]
        pool = pool[mem[pool] != mem[a]]
        kin_b[i] = pool[rng.integers(len(pool))]
    non_a = rng.integers(len(rows), size=n)
    non_b = rng.integers(len(rows), size=n)
    clash = fam[non_a] == fam[non_b]
    while clash.any():  # resample only the collisions; ends fast since families are many
        non_b[clash] = rng.integers(len(rows), size=int(clash.sum()))
        clash = fam[non_a] == fam[non_b]
    a = np.concatenate([anchors, non_a])
    b = np.concatenate([kin_b, non_b])
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    order = rng.permutation(2 * n)
    return rows[a[order]], rows[b[order]], y[order]


def family_batches(family: np.ndarray, rows: np.ndarray, batch_size: int, per_family: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of `batch_size // per_family` families × `per_family` images (drawn without replacement when the
    family has enough); one epoch has about as many images as `rows`. Used by the family losses."""
    rows = np.asarray(rows)
    fams = np.unique(family[rows])
    members = {int(f): rows[family[rows] == f] for f in fams}
    n_batches = max(1, len(rows) // batch_size)
    per_batch = max(2, batch_size // per_family)
    batches, queue = [], []
    for _ in range(n_batches):
        batch = []
        for _ in range(per_batch):
            if not queue:
                queue = list(rng.permutation(fams))
            pool = members[int(queue.pop())]
            batch.append(rng.choice(pool, size=per_family, replace=len(pool) < per_family))
        batches.append(np.concatenate(batch)[:batch_size])
    return batches


def random_batches(rows: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The rows shuffled and cut into full batches of `batch_size` (the last partial batch dropped): every image
    once an epoch, families as they fall. The alternative to `family_batches` for the family losses."""
    order = rng.permutation(np.asarray(rows))
    n = len(order) // batch_size * batch_size
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@dataclass(frozen=True)
class TrainingSet:
    """What a run's batches are drawn from: every image-table row's family and (table-wide) member number, the rows
    trained on, and every row's training-family label (a family loss's class index; -1 off the training families)."""

    family: np.ndarray
    member: np.ndarray
    rows: np.ndarray
    label: np.ndarray


@dataclass(frozen=True)
class LocalBatch:
    """One DDP process's share of a global batch: its input rows in the order the model takes them, their target,
    each block's positions in the global batch (augmentation draws one number per position, so N processes augment
    as one would) and the global batch's image count."""

    rows: np.ndarray
    target: np.ndarray
    blocks: tuple[np.ndarray, ...]
    total: int

    @property
    def positions(self) -> np.ndarray:
        return np.concatenate(self.blocks)


class Loss(nn.Module):
    """A registered loss with its kind's training behaviour. A global batch is (rows, target) whose rows are `blocks`
    blocks of len(target) rows; `from_config` builds the loss for a run. A loss with one weight vector per family
    (`has_classes`) can start them at the families' mean embeddings (`init_classes`)."""

    blocks = 1
    trains_pair_head = False  # True: the FC head's kin logit is trained (and scored); False: the head stays frozen
    has_classes = False

    @classmethod
    def from_config(cls, cfg: TrainConfig, dim: int, n_families: int) -> Loss:
        return cls()

    def epoch_batches(self, data: TrainingSet, cfg: TrainConfig, rng: np.random.Generator) -> list[Batch]:
        """An epoch's global batches, each of `cfg.batch_size` targets, drawn from `rng`."""
        raise NotImplementedError

    def local_batch(self, batch: Batch, rank: int, world: int) -> LocalBatch:
        """Process `rank`'s share of a global batch among `world`: the same slice of every block."""
        rows, target = batch
        n = len(target)
        sl = slice(rank * (n // world), (rank + 1) * (n // world))
        blocks = tuple(k * n + np.arange(n)[sl] for k in range(self.blocks))
        return LocalBatch(rows[np.concatenate(blocks)], target[sl], blocks, self.blocks * n)

    def batch_loss(self, model: nn.Module, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of a batch from the model's embeddings of its rows, in `local_batch`'s order."""
        return self(emb, target)

    def init_classes(self, means: torch.Tensor) -> None:
        raise TypeError(f"{type(self).__name__} has no class weights to initialise")


def family_means(emb: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, D) class prototypes: w_c = normalize(sum_{i: y_i = c} normalize(e_i)), the L2-normalised mean of
    the unit embeddings of class c (the "mean embedding" a probe gets at scoring time). A class without a sample gets
    a zero row (its cosine with anything is 0). Vectorised: one index_add over all rows."""
    unit = F.normalize(emb.float(), dim=1)
    sums = torch.zeros(n_classes, emb.shape[1], dtype=unit.dtype, device=emb.device).index_add_(0, labels, unit)
    return F.normalize(sums, dim=1)


class PairLoss(Loss):
    """A loss on kin/non-kin pairs through the FC head: a batch holds the pairs' first images, then their second
    images, with the 0/1 kin target, cut in order from `sample_pairs`."""

    blocks = 2
    trains_pair_head = True

    def epoch_batches(self, data: TrainingSet, cfg: TrainConfig, rng: np.random.Generator) -> list[Batch]:
        a, b, y = sample_pairs(data.family, data.member, data.rows, cfg.pairs_per_epoch, rng)
        size = cfg.batch_size
        n = len(y) // size * size  # drop the last partial batch: every process gets equal work
        return [(np.concatenate([a[i:i + size], b[i:i + size]]), y[i:i + size]) for i in range(0, n, size)]

    def batch_loss(self, model: nn.Module, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = len(target)
        return self(model.pair_logits(emb[:n], emb[n:]), target)


BATCHINGS: dict[str, Callable[[TrainingSet, TrainConfig, np.random.Generator], list[np.ndarray]]] = {
    "families": lambda data, cfg, rng: family_batches(data.family, data.rows, cfg.batch_size, cfg.images_per_family,
                                                      rng),
    "random": lambda data, cfg, rng: random_batches(data.rows, cfg.batch_size, rng),
}


class FamilyLoss(Loss):
    """A loss on the embeddings of a batch of images and their training-family labels, the images drawn as
    `cfg.batching` says (`BATCHINGS`)."""

    def epoch_batches(self, data: TrainingSet, cfg: TrainConfig, rng: np.random.Generator) -> list[Batch]:
        return [(rows, data.label[rows]) for rows in BATCHINGS[cfg.batching](data, cfg, rng)
                if len(rows) == cfg.batch_size]


class BCEPairLoss(PairLoss):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.float())


class FocalPairLoss(PairLoss):
    """Sigmoid focal loss: alpha_t (1 - p_t)^gamma BCE, which down-weights the easy pairs (Lin et al. 2017), as
    torchvision computes it (`torchvision.ops.sigmoid_focal_loss`; a negative alpha: no class weighting)."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    @classmethod
    def from_config(cls, cfg: TrainConfig, dim: int, n_families: int) -> Loss:
        return cls(cfg.focal_gamma, cfg.focal_alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import sigmoid_focal_loss

        return sigmoid_focal_loss(logits, target.float(), alpha=self.alpha, gamma=self.gamma, reduction="mean")


class CosFaceFamilyLoss(FamilyLoss):
    """Large-margin cosine softmax over the training families (a family is a class), as the 2020 winner trained:
    logits s·(cos θ_c − m·[c = family])."""

    has_classes = True

    def __init__(self, dim: int, n_families: int, margin: float = 0.35, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_families, dim) * 0.01)
        self.margin, self.scale = margin, scale

    @classmethod
    def from_config(cls, cfg: TrainConfig, dim: int, n_families: int) -> Loss:
        return cls(dim, n_families, cfg.margin, cfg.scale)

    @torch.no_grad()
    def init_classes(self, means: torch.Tensor) -> None:
        """Start every family's weight at its (normalised) mean embedding: the first logits are then the cosines
        to the family prototypes, and the loss trains from the pretrained network's own geometry."""
        if means.shape != self.weight.shape:
            raise ValueError(f"class means of shape {tuple(means.shape)} for weights {tuple(self.weight.shape)}")
        self.weight.copy_(means.to(self.weight))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(emb, dim=1) @ F.normalize(self.weight, dim=1).t()
        logits = self.scale * (cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype))
        return F.cross_entropy(logits, labels)


class SupConFamilyLoss(FamilyLoss):
    """Supervised contrastive loss (Khosla et al. 2020) with family as the label: every other in-batch image of the
    same family is a positive. Anchors without a positive are left out of the mean."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: TrainConfig, dim: int, n_families: int) -> Loss:
        return cls(cfg.temperature)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(emb, dim=1)
        sim = z @ z.t() / self.temperature
        self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
        sim = sim.masked_fill(self_mask, float("-inf"))
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
        pos = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = pos.sum(1)
        has = n_pos > 0
        if not has.any():
            return emb.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
        mean_log_prob = log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has]
        return -mean_log_prob.mean()


LOSSES: dict[str, type[Loss]] = {"bce": BCEPairLoss, "focal": FocalPairLoss, "cosface": CosFaceFamilyLoss,
                                  "supcon": SupConFamilyLoss}


def loss_class(name: str) -> type[Loss]:
    """The registered loss class `name`, whose kind's behaviour is readable without building the loss."""
    if name not in LOSSES:
        raise KinretInputError(None, f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def trains_pair_head(name: str) -> bool:
    """Whether the loss `name` trains the FC pair head (so the head's kin logit is a score), without building it."""
    return loss_class(name).trains_pair_head


def build_loss(cfg: TrainConfig, dim: int, n_families: int) -> Loss:
    """The run's loss."""
    return loss_class(cfg.loss).from_config(cfg, dim, n_families)
