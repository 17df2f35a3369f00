"""What a training step's images go through: batched tensor augmentation drawn from a CPU generator (so a run is
reproducible on any device, and a CPU step costs the model, not the data). The batches themselves are drawn by the
loss (`kinret.models.losses`: each kind says what its batch holds)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kinret.models.config import TrainConfig

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
