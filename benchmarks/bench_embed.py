"""Embedding throughput of the kit's cached path against a bare forward loop of the same model on preloaded
tensors, side by side in one run (interleaved, median of repeats). Target: ratio >= 0.9.

The kit's path (`kinret.features.cache.cached_features`) reads the decoded pixels, converts and normalises each
batch, runs the image and its mirror, reads every pooling off the feature map, and saves each chunk and the final
`.npz`. The
bare loop runs the same two views of the same batches through the same model, from float tensors made beforehand,
pooling once. The ratio is what the cache, the conversion and the extra poolings cost.

    python benchmarks/bench_embed.py                         # resnet18 at 112 px and SFace, on CPU
    python benchmarks/bench_embed.py --backbones resnet50 --images 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kinret.data.pixels import normalize, to_float
from kinret.features.cache import cached_features
from kinret.log import setup_logging
from kinret.models.config import TrainConfig
from kinret.models.networks import build_backbone, state_digest


@torch.no_grad()
def bare_loop(backbone: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """images/s: forward_features of each preloaded batch and its mirror, average pooling, nothing else."""
    start = time.perf_counter()
    n = 0
    for x in batches:
        for view in (x, x.flip(3)):
            backbone.forward_features(view).mean((2, 3))
        n += len(x)
    return n / (time.perf_counter() - start)


def kit_path(backbone, digest, data_cfg, paths, pixels, batch) -> float:
    with tempfile.TemporaryDirectory() as cache:  # a cold cache each time: the whole path runs
        start = time.perf_counter()
        cached_features(backbone, digest, data_cfg, paths, lambda: pixels, Path(cache), "bench", torch.device("cpu"),
                        batch=batch, channels_last=True)
        return len(paths) / (time.perf_counter() - start)


def measure(name: str, size: int, n: int, batch: int, repeats: int) -> float:
    cfg = replace(TrainConfig(), backbone=name, input_size=0 if name == "sface" else size)
    torch.manual_seed(0)
    backbone, data_cfg = build_backbone(cfg)
    backbone.eval().to(memory_format=torch.channels_last)
    side = data_cfg["input_size"][-1]
    pixels = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    stub_dir = Path(tempfile.mkdtemp())  # the cache key stats the files; the pixels are given, no image is read
    paths = [stub_dir / f"img{i}.jpg" for i in range(n)]
    for p in paths:
        p.touch()
    digest = state_digest(backbone)
    batches = [normalize(to_float(pixels[i:i + batch], torch.device("cpu")), data_cfg["mean"], data_cfg["std"])
               .contiguous(memory_format=torch.channels_last) for i in range(0, n, batch)]
    bare_loop(backbone, batches[:2])  # warm-up
    kit, bare = [], []
    for _ in range(repeats):
        kit.append(kit_path(backbone, digest, data_cfg, paths, pixels, batch))
        bare.append(bare_loop(backbone, batches))
    k, b = statistics.median(kit), statistics.median(bare)
    print(f"{name:<10} {side:>4}px  {n:>5} images  kit {k:8.1f} img/s   bare loop {b:8.1f} img/s   "
          f"ratio {k / b:5.2f}  ({'meets' if k / b >= 0.9 else 'misses'} >= 0.9)")
    return k / b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet18", "sface"])
    p.add_argument("--size", type=int, default=112, help="input size of timm backbones (SFace is 112)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    setup_logging(quiet=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; each figure is the median of {args.repeats} interleaved runs")
    for name in args.backbones:
        measure(name, args.size, args.images, args.batch, args.repeats)


if __name__ == "__main__":
    main()
