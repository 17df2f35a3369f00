"""The frozen feature pass of face networks on the CPU, side by side in the same run: images/s, GFLOPs an image
and peak memory, in each runtime the kit uses for them.

Sides:
- torch (what the kit runs for an arcface_torch `backbone.pth`, and for any network on a GPU): `sface` (the bundled
  SFace converted to torch) and `iresnet18` ... `iresnet200` (random weights: the speed does not depend on them);
  eval mode, channels_last, float32, `--threads` torch threads, `forward_features` and `forward_native` in batches
  of `--batch` under `torch.no_grad()`.
- graph (what the kit runs for an ONNX backbone on a CPU, `kinret.features.runtime.GRAPH`): `sface-graph` (the
  bundled file) and `onnx-iresnet50`, `onnx-iresnet100`, ... (a random IResNet exported to ONNX here, as insightface's
  `w600k_r50.onnx` and `glintr100.onnx` are built, loaded by `backbone=onnx` with the insightface convention): the
  kit's graph runtime with `--threads` engines side by side (`graph_pooled`), every pooling and the embedding.

Each side runs in a fresh process (so its peak RSS is its own); one warm-up batch, then `--images` random 112 px
faces (uint8 pixels, prepared as the kit prepares them; JPEG decoding not included). One view per image: the kit's
cache with `flip_views` runs each image twice. Sides are interleaved over `--repeats`; the median is printed with
every run. GFLOPs: torch's FlopCounterMode over one image of the torch module (2 per multiply-add). Memory: RSS
before the network is built (interpreter, torch and the kit imported), once it is built, and the process's peak
(VmHWM) after the pass.

    python benchmarks/bench_iresnet.py                      # 64 images, batch 32, 2 threads: the default sides
    python benchmarks/bench_iresnet.py --images 256 --repeats 3 --side sface --side iresnet100
    python benchmarks/bench_iresnet.py --side sface-graph --side onnx-iresnet50 --side onnx-iresnet100
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kinret.data.pixels import normalize, to_float
from kinret.features.graph_runtime import graph_pooled
from kinret.features.runtime import GRAPH_BATCH, graph_runtime
from kinret.models.config import TrainConfig
from kinret.models.iresnet import IRESNETS, build_iresnet
from kinret.models.networks import build_backbone, pool_names, state_digest
from kinret.models.onnx_net import build_onnx_backbone

CPU = torch.device("cpu")
SIDES = ["sface", "iresnet50", "iresnet100"]
GRAPH_SIDES = ["sface-graph", *(f"onnx-{name}" for name in IRESNETS)]


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export_iresnet(name: str, folder: Path) -> Path:
    """A random `name` exported to ONNX as insightface exports its packs (input `data`, dynamic batch)."""
    torch.manual_seed(0)
    net, _ = build_iresnet(name)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(net.eval(), torch.zeros(1, 3, 112, 112), buf, input_names=["data"],
                          output_names=["embedding"], dynamic_axes={"data": {0: "N"}, "embedding": {0: "N"}},
                          dynamo=False)
    path = folder / f"{name}.onnx"
    path.write_bytes(buf.getvalue())
    return path


def build(side: str, folder: Path) -> tuple[torch.nn.Module, dict]:
    if side in ("sface", "sface-graph"):
        return build_backbone(replace(TrainConfig(), backbone="sface"))
    if side.startswith("onnx-"):
        return build_onnx_backbone(export_iresnet(side.removeprefix("onnx-"), folder), "insightface")
    return build_iresnet(side)


def torch_pass(net: torch.nn.Module, data_cfg: dict, pixels: np.ndarray):
    def one_batch(a: int, b: int) -> None:
        x = normalize(to_float(pixels[a:b], CPU), data_cfg["mean"], data_cfg["std"])
        net.forward_native(net.forward_features(x.contiguous(memory_format=torch.channels_last)))

    return one_batch


def graph_pass(net: torch.nn.Module, threads: int, pixels: np.ndarray, batch: int):
    """The kit's graph runtime of `net` (built and checked against the torch module here, as the kit does)."""
    runtime = graph_runtime(net, state_digest(net), (), threads, 3.0)
    names = pool_names(net)

    def one_batch(a: int, b: int) -> None:
        graph_pooled(runtime, lambda i, j: pixels[a + i:a + j], b - a, names, 3.0, False,
                     min(batch, GRAPH_BATCH), threads)

    return one_batch


def network_gflops(backbone, size: int) -> float:
    """GFLOPs (2 per multiply-add, torch's FlopCounterMode) of one `size` px image through the backbone's feature
    pass and its own embedding layer when it has one: printed beside each side's rate."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(backbone.parameters(), None)
    x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
    with FlopCounterMode(display=False) as counter:
        fmap = backbone.forward_features(x)
        if hasattr(backbone, "forward_native"):
            backbone.forward_native(fmap)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def run_side(side: str, images: int, batch: int, threads: int) -> dict:
    """One side in this process: build, warm up, time the pass; images/s, GFLOPs an image and memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start_rss = _status_mib("VmRSS")  # the interpreter with torch and the kit imported
    with tempfile.TemporaryDirectory() as folder:
        net, data_cfg = build(side, Path(folder))
    net.eval().to(memory_format=torch.channels_last)
    gflops = network_gflops(net, data_cfg["input_size"][-1])
    pixels = np.random.default_rng(0).integers(0, 256, (max(batch, images), 112, 112, 3), dtype=np.uint8)
    one_batch = graph_pass(net, threads, pixels, batch) if side in GRAPH_SIDES else torch_pass(net, data_cfg, pixels)
    built = _status_mib("VmRSS")
    one_batch(0, batch)  # warm-up: oneDNN (or the graph engine) prepares its kernels on the first call
    start = time.perf_counter()
    for done in range(0, images, batch):
        one_batch(done, min(done + batch, images))
    rate = images / (time.perf_counter() - start)
    params = sum(p.numel() for p in net.parameters())
    return {"side": side, "img_s": rate, "rss_start_mib": start_rss, "rss_built_mib": built,
            "peak_mib": _status_mib("VmHWM"), "params_m": params / 1e6, "gflops": gflops}


def child(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--images", str(args.images), "--batch", str(args.batch),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: dict[str, list[dict]], args: argparse.Namespace, load: tuple[float, float]) -> None:
    print(f"{args.images} random 112 px faces, batch {args.batch}, {args.threads} threads, float32, channels_last, "
          f"one view an image; median of {args.repeats} interleaved runs, one fresh process each; load average "
          f"{load[0]:.1f} before, {load[1]:.1f} after ({os.cpu_count()} CPUs, shared), {time.strftime('%Y-%m-%d')}")
    base = statistics.median(r["img_s"] for r in results["sface"]) if "sface" in results else None
    for side, runs in results.items():
        rate = statistics.median(r["img_s"] for r in runs)
        ratio = f"{rate / base:6.3f} x sface" if base else ""
        mib = {k: max(r[k] for r in runs) for k in ("rss_start_mib", "rss_built_mib", "peak_mib")}
        each = ", ".join(f"{r['img_s']:.2f}" for r in runs)
        print(f"  {side:<16} {runs[0]['params_m']:6.1f}M params {runs[0]['gflops']:6.2f} GFLOPs  {rate:7.2f} img/s "
              f"({rate * runs[0]['gflops']:5.1f} GFLOP/s)  {ratio}  RSS MiB: start {mib['rss_start_mib']:4.0f}, "
              f"built {mib['rss_built_mib']:5.0f}, peak {mib['peak_mib']:5.0f}  runs {each}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images timed per run (after one warm-up batch)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads, or graph engines side by side")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--side", action="append", choices=["sface", *IRESNETS, *GRAPH_SIDES],
                   help=f"default: {', '.join(SIDES)}")
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
