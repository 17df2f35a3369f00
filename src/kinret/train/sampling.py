"""What a training step sees: seeded kin/non-kin pairs, batches of families, and batched tensor augmentation drawn
from a CPU generator (so a run is reproducible on any device, and a CPU step costs the model, not the data)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig


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
    family has enough); one epoch has about as many images as `rows`. Used by the family-level losses."""
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


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B (torchvision's rgb_to_grayscale)


def grey_images(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> the same shape, every channel = 0.299 R + 0.587 G + 0.114 B."""
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def pixel_views(x: torch.Tensor, flip: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """Each image as the view a cached prefix stores for it: mirrored where `flip`, then greyscale where `grey`."""
    x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    return torch.where(grey.to(x.device).view(-1, 1, 1, 1), grey_images(x), x)


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, offset: int = 0, total: int | None = None
            ) -> torch.Tensor:
    """Random flip, colour (brightness, contrast, saturation), small affine and greyscale (`grey_p`; drawn last and
    only when on, so older configs draw the same numbers), drawn per image from `gen` (a CPU generator, so a run is
    reproducible on any device) and applied to the whole batch at once.

    Under DDP `x` is rows offset..offset+n of a global batch of `total`: parameters are drawn for the global batch
    and sliced, so N processes augment exactly as one process would."""
    n = x.shape[0]
    total = total or n

    def draw() -> torch.Tensor:
        return torch.rand(total, generator=gen)[offset:offset + n]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * draw()).to(x.device)

    flip = (draw() < cfg.flip_p).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    c = cfg.color_jitter
    if c > 0:
        x = x * uniform(1 - c, 1 + c).view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * uniform(1 - c, 1 + c).view(-1, 1, 1, 1) + mean
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * uniform(1 - c, 1 + c).view(-1, 1, 1, 1) + grey
        x = x.clamp(0, 1)
    if cfg.affine_degrees > 0 or cfg.affine_translate > 0 or cfg.affine_scale > 0:
        angle = uniform(-cfg.affine_degrees, cfg.affine_degrees) * math.pi / 180
        scale = uniform(1 - cfg.affine_scale, 1 + cfg.affine_scale)
        tx = uniform(-cfg.affine_translate, cfg.affine_translate) * 2
        ty = uniform(-cfg.affine_translate, cfg.affine_translate) * 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.grey_p > 0:
        grey = (draw() < cfg.grey_p).to(x.device)
        x = torch.where(grey.view(-1, 1, 1, 1), grey_images(x), x)
    return x
