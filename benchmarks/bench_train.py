"""Training throughput of the kit's trainer against a bare forward + backward loop of the same model and batch on
preloaded tensors, measured side by side in one run (interleaved, median of repeats). The ratio is what the data
pipeline (sampling, pixel gather, augmentation, normalisation) costs; the target is >= 0.8.

    python benchmarks/bench_train.py                        # e2e resnet18 at 64 px and head-only, on CPU
    python benchmarks/bench_train.py --backbone resnet50 --size 112 --batch 32

Data: a small synthetic FIW set generated in a temporary folder (deterministic, a few seconds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from kinret.data.synth import SynthConfig, generate
from kinret.log import setup_logging
from kinret.models.config import TrainConfig
from kinret.train.trainer import Trainer


def bare_loop(trainer: Trainer, steps: int) -> float:
    """images/s of forward + backward + step on tensors made once, shaped like the trainer's batches."""
    x, t = trainer.local_inputs(*trainer.epoch_batches(0)[0], torch.Generator().manual_seed(0))
    x, t = x.detach().clone(), t.clone()
    trainer.ddp.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.ddp(x, t)
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()
    return steps * len(x) / (time.perf_counter() - start)


def measure(cfg: TrainConfig, label: str, repeats: int) -> None:
    trainer = Trainer(cfg, fold=0)
    trainer.train_epoch()  # warm-up: allocator, caches, first-call overheads
    kit, bare = [], []
    for _ in range(repeats):
        kit.append(trainer.train_epoch()["images_per_s"])
        bare.append(bare_loop(trainer, trainer.steps_per_epoch))
    k, b = statistics.median(kit), statistics.median(bare)
    print(f"{label:<34} trainer {k:9.1f} img/s   bare loop {b:9.1f} img/s   ratio {k / b:5.2f}  (target >= 0.8)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="pairs per batch (2x images)")
    p.add_argument("--steps", type=int, default=12, help="batches per measured epoch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    setup_logging(quiet=True)
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synthetic", SynthConfig(seed=0, n_train=40, n_val=0, n_test=2, size=args.size))
        base = replace(TrainConfig(), data_root=str(root), out_root=str(Path(tmp) / "runs"), backbone=args.backbone,
                       input_size=args.size, batch_size=args.batch, pairs_per_epoch=args.batch * args.steps // 2,
                       epochs=100, eval_pairs=10)
        print(f"{args.backbone} at {args.size} px, batch {args.batch} pairs, {torch.get_num_threads()} threads, "
              f"device cpu")
        measure(replace(base, name="bench_e2e"), "end-to-end (augment on)", args.repeats)
        measure(replace(base, name="bench_head", mode="head", neck="residual", batch_size=256,
                        pairs_per_epoch=256 * 40), "head-only on cached features", args.repeats)


if __name__ == "__main__":
    main()
