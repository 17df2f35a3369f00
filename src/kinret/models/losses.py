"""Loss registry. Pair losses (the seed paper's BCE and focal) score kin/non-kin pairs through the FC head; family
losses (beyond the paper) use every member of a family at once on the embeddings that cosine similarity compares.

Every loss has `kind` ("pair" or "family"), which decides how the trainer samples batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig


class Loss(nn.Module):
    """A registered loss: `kind` says how the trainer samples batches; `from_config` builds it for a run. A loss with
    one weight vector per family (`has_classes`) can start them at the families' mean embeddings (`init_classes`)."""

    kind = "pair"
    has_classes = False

    @classmethod
    def from_config(cls, cfg: TrainConfig, dim: int, n_families: int) -> Loss:
        return cls()

    def init_classes(self, means: torch.Tensor) -> None:
        raise TypeError(f"{type(self).__name__} has no class weights to initialise")


def family_means(emb: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, D) class prototypes: w_c = normalize(sum_{i: y_i = c} normalize(e_i)), the L2-normalised mean of
    the unit embeddings of class c (the "mean embedding" a probe gets at scoring time). A class without a sample gets
    a zero row (its cosine with anything is 0). Vectorised: one index_add over all rows."""
    unit = F.normalize(emb.float(), dim=1)
    sums = torch.zeros(n_classes, emb.shape[1], dtype=unit.dtype, device=emb.device).index_add_(0, labels, unit)
    return F.normalize(sums, dim=1)


class BCEPairLoss(Loss):
    kind = "pair"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.float())


class FocalPairLoss(Loss):
    """Sigmoid focal loss: alpha_t (1 - p_t)^gamma BCE, which down-weights the easy pairs (Lin et al. 2017)."""

    kind = "pair"

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    @classmethod
    def from_config(cls, cfg: TrainConfig, dim: int, n_families: int) -> Loss:
        return cls(cfg.focal_gamma, cfg.focal_alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float()
        bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p_t = torch.exp(-bce)  # the probability given to the true class
        alpha_t = self.alpha * t + (1 - self.alpha) * (1 - t) if self.alpha >= 0 else 1.0
        return (alpha_t * (1 - p_t) ** self.gamma * bce).mean()


class CosFaceFamilyLoss(Loss):
    """Large-margin cosine softmax over the training families (a family is a class), as the 2020 winner trained:
    logits s·(cos θ_c − m·[c = family])."""

    kind = "family"
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


class SupConFamilyLoss(Loss):
    """Supervised contrastive loss (Khosla et al. 2020) with family as the label: every other in-batch image of the
    same family is a positive. Anchors without a positive are left out of the mean."""

    kind = "family"

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


def _loss_class(name: str) -> type[Loss]:
    if name not in LOSSES:
        raise KinretInputError(None, f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def loss_kind(name: str) -> str:
    """"pair" (trains the FC head) or "family" (trains the embedding), without building the loss."""
    return _loss_class(name).kind


def build_loss(cfg: TrainConfig, dim: int, n_families: int) -> Loss:
    return _loss_class(cfg.loss).from_config(cfg, dim, n_families)
