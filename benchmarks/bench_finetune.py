"""Fine-tuning throughput with the cached frozen prefix against the full forward-backward, side by side in one run.

Both trainers train the same layers (everything after the cut) with the same recipe; one feeds the cached output of
the frozen units (`cache_prefix=true`), the other runs the whole network on pixels. Two measures, interleaved,
median of repeats:
- step: forward + backward + optimizer step on one fixed batch of tensors (the model alone);
- epoch: the trainer's own epoch (sampling, gather, augmentation or cached views included);
- optimizer: AdamW's step over the trained parameters alone, fused (what the trainer runs) against one tensor at a
  time (torch's default on a CPU), with the gradients of one batch.

    python benchmarks/bench_finetune.py                        # the sface_finetune recipe's cut
    python benchmarks/bench_finetune.py --cut 6 --cut 12 --cut 23

Data: a small synthetic FIW set generated in a temporary folder. The prefix cache's size per image is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_train import bare_loop  # this folder is on sys.path when a benchmark runs as a script

from kinret.data.synth import SynthConfig, generate
from kinret.log import setup_logging
from kinret.models.config import TrainConfig
from kinret.train.experiments import load_experiment
from kinret.train.trainer import Trainer


def compare(base: TrainConfig, cut: int, repeats: int, steps: int) -> None:
    cached = Trainer(replace(base, name=f"bench_cached_{cut}", freeze_units=cut, cache_prefix=True), fold=0)
    full = Trainer(replace(base, name=f"bench_full_{cut}", freeze_units=cut, cache_prefix=False, grey_p=0.0), fold=0)
    per_image = sum(v[0].nbytes for v in cached.feed.prefix)
    trained = sum(p.numel() for p in cached.model.parameters() if p.requires_grad)
    for t in (cached, full):
        bare_loop(t, 2)  # warm-up: allocator, first-call overheads
    rates: dict[str, list[float]] = {"cached step": [], "full step": [], "cached epoch": [], "full epoch": []}
    for _ in range(repeats):
        rates["cached step"].append(bare_loop(cached, steps))
        rates["full step"].append(bare_loop(full, steps))
        rates["cached epoch"].append(cached.train_epoch()["images_per_s"])
        rates["full epoch"].append(full.train_epoch()["images_per_s"])
    m = {k: statistics.median(v) for k, v in rates.items()}
    print(f"cut {cut:2d} (prefix {tuple(cached.feed.prefix[0].shape[1:])}, {per_image / 1e3:.0f} KB an image with its "
          f"views, {trained / 1e6:.2f}M trained parameters)")
    for kind in ("step", "epoch"):
        c, f = m[f"cached {kind}"], m[f"full {kind}"]
        print(f"  {kind:<5}  cached prefix {c:7.1f} img/s   full forward-backward {f:7.1f} img/s   ratio {c / f:5.2f}")
    optimizer_steps(cached, repeats, steps)


def optimizer_steps(trainer, repeats: int, steps: int) -> None:
    """AdamW over `trainer`'s trained parameters, fused against one tensor at a time, interleaved: ms a step."""
    params = [p for p in trainer.objective.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    times: dict[str, list[float]] = {"fused": [], "one tensor at a time": []}
    for _ in range(repeats):
        for name, kw in (("fused", {"fused": True}), ("one tensor at a time", {"foreach": False})):
            copies = [p.detach().clone().requires_grad_(True) for p in params]
            opt = torch.optim.AdamW(copies, lr=1e-4, weight_decay=1e-4, **kw)
            for c, gr in zip(copies, grads, strict=True):
                c.grad = gr
            opt.step()  # the first step allocates the moments
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    fused, single = (statistics.median(v) for v in times.values())
    print(f"  AdamW step over {sum(p.numel() for p in params) / 1e6:.2f}M parameters: fused {fused:.1f} ms, "
          f"one tensor at a time {single:.1f} ms, ratio {single / fused:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cut", type=int, action="append", help="units frozen and cached (default: the recipe's)")
    p.add_argument("--families", type=int, default=12, help="synthetic training families")
    p.add_argument("--steps", type=int, default=4, help="steps per measured step rate")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    setup_logging(quiet=True)
    recipe = load_experiment("sface_finetune")[0]
    cuts = args.cut or [recipe.freeze_units]
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synthetic", SynthConfig(seed=0, n_train=args.families, n_val=0, n_test=2,
                                                             max_members=5, max_images=4))
        base = replace(recipe, data_root=str(root), out_root=str(Path(tmp) / "runs"), epochs=100, eval_pairs=10,
                       class_init="random")
        print(f"sface_finetune recipe, batch {base.batch_size} ({base.batching}), {torch.get_num_threads()} threads, "
              f"device cpu, float32 storage {base.prefix_dtype == 'float32'}")
        for cut in cuts:
            compare(base, cut, args.repeats, args.steps)


if __name__ == "__main__":
    main()
