"""The frozen feature pass of insightface IResNets on the CPU, side by side with SFace's torch float32 pass in the
same run: images/s and peak memory.

Each side runs in a fresh process (so its peak RSS is its own): the network built (IResNets with random weights: the
speed does not depend on them), eval mode, channels_last, float32, `--threads` torch threads; one warm-up batch, then
`--images` random 112 px faces (uint8 pixels, converted and normalised by the network's data config as the kit does)
through `forward_features` and `forward_native` in batches of `--batch`, under `torch.no_grad()`. One view per image:
the kit's cache with `flip_views` runs each image twice. Sides are interleaved over `--repeats`; the median is
printed with every run. Memory: RSS before the network is built (interpreter, torch and the kit imported), once it
is built, and the process's peak (VmHWM) after the pass.

    python benchmarks/bench_iresnet.py                      # 64 images, batch 32, 2 threads: sface, iresnet50, 100
    python benchmarks/bench_iresnet.py --images 256 --repeats 3 --side sface --side iresnet100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kinret.data.pixels import normalize, to_float
from kinret.models.config import TrainConfig
from kinret.models.iresnet import IRESNETS, build_iresnet
from kinret.models.networks import build_backbone

CPU = torch.device("cpu")
SIDES = ["sface", "iresnet50", "iresnet100"]


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(side: str) -> tuple[torch.nn.Module, dict]:
    if side == "sface":
        return build_backbone(replace(TrainConfig(), backbone="sface"))
    return build_iresnet(side)


@torch.no_grad()
def run_side(side: str, images: int, batch: int, threads: int) -> dict:
    """One side in this process: build, warm up, time the pass; images/s and memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start_rss = _status_mib("VmRSS")  # the interpreter with torch and the kit imported
    net, data_cfg = build(side)
    net.eval().to(memory_format=torch.channels_last)
    built = _status_mib("VmRSS")
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8)

    def one_batch(n: int) -> None:
        x = normalize(to_float(pixels[:n], CPU), data_cfg["mean"], data_cfg["std"])
        net.forward_native(net.forward_features(x.contiguous(memory_format=torch.channels_last)))

    one_batch(batch)  # warm-up: oneDNN builds its kernels for each shape on the first call
    start = time.perf_counter()
    for done in range(0, images, batch):
        one_batch(min(batch, images - done))
    rate = images / (time.perf_counter() - start)
    params = sum(p.numel() for p in net.parameters())
    return {"side": side, "img_s": rate, "rss_start_mib": start_rss, "rss_built_mib": built,
            "peak_mib": _status_mib("VmHWM"), "params_m": params / 1e6}


def child(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--images", str(args.images), "--batch", str(args.batch),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: dict[str, list[dict]], args: argparse.Namespace, load: tuple[float, float]) -> None:
    print(f"{args.images} random 112 px faces, batch {args.batch}, {args.threads} torch threads, float32, "
          f"channels_last, one view an image; median of {args.repeats} interleaved runs, one fresh process each; "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after ({os.cpu_count()} CPUs, shared)")
    base = statistics.median(r["img_s"] for r in results["sface"]) if "sface" in results else None
    for side, runs in results.items():
        rate = statistics.median(r["img_s"] for r in runs)
        ratio = f"{rate / base:6.3f} x sface" if base else ""
        mib = {k: max(r[k] for r in runs) for k in ("rss_start_mib", "rss_built_mib", "peak_mib")}
        each = ", ".join(f"{r['img_s']:.2f}" for r in runs)
        print(f"  {side:<11} {runs[0]['params_m']:6.1f}M params  {rate:7.2f} img/s  {ratio}  RSS MiB: start "
              f"{mib['rss_start_mib']:4.0f}, built {mib['rss_built_mib']:5.0f}, peak {mib['peak_mib']:5.0f}  "
              f"runs {each}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images timed per run (after one warm-up batch)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--side", action="append", choices=["sface", *IRESNETS], help=f"default: {', '.join(SIDES)}")
    p.add_argument("--child", help=argparse.SUPPRESS)  # run one side in this process and print its JSON line
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_side(args.child, args.images, args.batch, args.threads)))
        return
    before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {side: [] for side in args.side or SIDES}
    for _ in range(args.repeats):
        for side in results:
            results[side].append(child(side, args))
    report(results, args, (before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
