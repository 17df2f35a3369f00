"""Frozen SFace features: the kit's path against the fastest known runtime of the network, side by side in one run
on the same JPEG files, decoding included on every side; interleaved, median of repeats. Target: ratio >= 0.9.

- kit: `kinret.features.frozen.FrozenPass` on a cold cache, with the runtime it picks for the shipped SFace
  (its graph in cv2.dnn; batches capped at `GRAPH_BATCH` images): every pooling of the image and its mirror image,
  chunks saved, the final `.npz` written.
- bare cv2: a batch decoded, then ``net = cv2.dnn.readNet(file); net.setInput(blob, "data"); net.forward()`` on the
  image and its mirror image (cv2's default threads): the embedding only, no feature map, no pooling, no cache.
- for reference, the torch module: the kit's torch runtime forced (float32, channels_last) and a bare bfloat16
  autocast loop (image and mirror, feature map and embedding). On a CPU without native bf16 (AVX512-BF16 / AMX)
  autocast is emulated and very slow (0.3 img/s measured on the 2-core AMD EPYC): it is then timed on 4 images
  only, once, and labelled so.

    python benchmarks/bench_embed.py                   # 256 synthetic faces, batch 32
    python benchmarks/bench_embed.py --images 512 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from kinret.data.pixels import decode_pixels, normalize, to_float
from kinret.data.synth_faces import make_family, render_face
from kinret.features.frozen import FrozenPass
from kinret.features.runtime import TORCH_FP32, frozen_runtime
from kinret.log import setup_logging
from kinret.models.config import TrainConfig
from kinret.models.networks import build_backbone, state_digest
from kinret.models.sface import sface_onnx_path

CPU = torch.device("cpu")


def write_faces(folder: Path, n: int) -> list[Path]:
    """`n` synthetic 112 px face photos as JPEG files (families of the synthetic default's renderer)."""
    rng = np.random.default_rng(0)
    paths: list[Path] = []
    while len(paths) < n:
        for member in make_family(f"F{len(paths):05d}", rng).members:
            for _ in range(member.n_images):
                if len(paths) < n:
                    paths.append(folder / f"face{len(paths):05d}.jpg")
                    render_face(member, rng).save(paths[-1], quality=90)
    return paths


def kit(backbone, data_cfg, digest, paths, batch: int, runtime: str | None) -> float:
    with tempfile.TemporaryDirectory() as cache:  # a cold cache each time: the whole path runs
        start = time.perf_counter()
        FrozenPass(backbone, digest, data_cfg, "bench", CPU, batch=batch, runtime=runtime or "").outputs(
            paths, Path(cache), pixels=lambda: decode_pixels(paths, 112, None))
        return len(paths) / (time.perf_counter() - start)


def bgr_views(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (2N, 3, H, W) BGR 0..255, the images then their mirror images."""
    x = np.ascontiguousarray(np.asarray(pixels)[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    return np.concatenate([x, x[..., ::-1]])


def bare_cv2(net, paths: list[Path], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        net.setInput(bgr_views(decode_pixels(paths[i:i + batch], 112, None)), "data")
        net.forward()
    return len(paths) / (time.perf_counter() - start)


@torch.no_grad()
def bare_bf16(backbone, data_cfg, paths: list[Path], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        x = normalize(to_float(decode_pixels(paths[i:i + batch], 112, None), CPU), data_cfg["mean"], data_cfg["std"])
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for view in (x, x.flip(3)):
                backbone.forward_native(backbone.forward_features(view))
    return len(paths) / (time.perf_counter() - start)


def native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="images per forward (each with its mirror image)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    setup_logging(quiet=True)
    backbone, data_cfg = build_backbone(replace(TrainConfig(), backbone="sface"))
    backbone.eval().to(memory_format=torch.channels_last)
    digest = state_digest(backbone)
    runtime = frozen_runtime(backbone, CPU)
    net = cv2.dnn.readNet(str(sface_onnx_path()))
    with tempfile.TemporaryDirectory() as folder:
        paths = write_faces(Path(folder), args.images)
        sides: dict[str, Callable[[], float]] = {
            f"kit ({runtime})": lambda: kit(backbone, data_cfg, digest, paths, args.batch, None),
            "bare cv2.dnn loop": lambda: bare_cv2(net, paths, args.batch),
            "kit (torch-fp32, forced)": lambda: kit(backbone, data_cfg, digest, paths, args.batch, TORCH_FP32),
        }
        bf16 = native_bf16()
        if bf16:
            sides["bare torch bf16 autocast"] = lambda: bare_bf16(backbone, data_cfg, paths, args.batch)
        kit(backbone, data_cfg, digest, paths[:args.batch], args.batch, None)  # warm-up: each engine's first run
        bare_cv2(net, paths[:args.batch], args.batch)
        few = paths[:args.batch if bf16 else 4]  # emulated bf16 is timed on 4 images only
        few_bf16 = bare_bf16(backbone, data_cfg, few, len(few))
        speed: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, side in sides.items():
                speed[name].append(side())
    print(f"{args.images} faces of 112 px, batch {args.batch} (+ mirror), torch threads {torch.get_num_threads()}, "
          f"cv2 threads {cv2.getNumThreads()}; img/s (each image with its mirror), median of {args.repeats} "
          "interleaved runs")
    med = {k: statistics.median(v) for k, v in speed.items()}
    bare = med["bare cv2.dnn loop"]
    for name, value in med.items():
        print(f"  {name:<28} {value:7.1f} img/s   {value / bare:5.2f} x bare cv2   runs "
              f"{', '.join(f'{v:.1f}' for v in speed[name])}")
    if not bf16:
        print(f"  {'bare torch bf16 autocast':<28} {few_bf16:7.1f} img/s   (4 images once, not interleaved: this CPU "
              "has no native bf16, autocast is emulated)")
    ratio = med[f"kit ({runtime})"] / bare
    print(f"kit / bare cv2 = {ratio:.2f} ({'meets' if ratio >= 0.9 else 'misses'} >= 0.9)")


if __name__ == "__main__":
    main()
