"""The fine-tune's frozen prefix and its embeddings, side by side in one run on the same JPEG files (decoding
included), interleaved, median of repeats. Targets (issue 19): the prefix costs at most 10% over the frozen feature
pass alone, and a fine-tuned model embeds at least as fast as the frozen feature pass.

- features: `FrozenPass.outputs` of the shipped SFace on a cold cache (its graph in cv2.dnn), every pooling;
- features + prefix: the same pass also writing the fine-tune's prefix (SFace's first 24 units, float16);
- tuned model, tail over the prefix: a fine-tuned SFace's embeddings from the stored prefix (`rest_pooled`),
  decoding nothing, the network as trained;
- tuned model, tail, BatchNorms folded: the same with the network's BatchNorms folded into its convolutions (what the
  kit's scoring runs for a `cache_prefix` run: `kinret.models.inference.for_inference`);
- tuned model, whole graph: the same fine-tuned weights written back into the graph and run by cv2.dnn on the
  images (what a run needs for images no pass stored a prefix of).

    python benchmarks/bench_prefix.py                  # 384 synthetic faces
    python benchmarks/bench_prefix.py --images 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_embed import write_faces  # this folder is on sys.path when a benchmark runs as a script

from kinret.data.pixels import decode_pixels
from kinret.features.feeds import CachedPrefix
from kinret.features.frozen import Cut, FrozenPass, rest_pooled
from kinret.features.graph_runtime import GraphRuntime, graph_pooled
from kinret.log import setup_logging
from kinret.models.config import TrainConfig
from kinret.models.inference import for_inference
from kinret.models.networks import build_backbone, state_digest
from kinret.train.experiments import load_experiment

CPU = torch.device("cpu")


def frozen_pass(backbone, data_cfg, paths, cuts: tuple[Cut, ...]) -> float:
    with tempfile.TemporaryDirectory() as cache:  # cold: the whole pass runs (and writes the cut's output)
        start = time.perf_counter()
        FrozenPass(backbone, state_digest(backbone), data_cfg, "bench", CPU, batch=32, flip=False).outputs(
            paths, Path(cache), cuts)
        return len(paths) / (time.perf_counter() - start)


def tail(tuned, frozen: FrozenPass, cut: Cut, paths, cache: Path) -> float:
    start = time.perf_counter()
    rows = frozen.outputs(paths, cache, [cut])[cut.name]  # the stored prefix, memory-mapped
    rest_pooled(tuned, list(rows), cut.units, CPU, 128)
    return len(paths) / (time.perf_counter() - start)


def whole_graph(runtime: GraphRuntime, paths) -> float:
    start = time.perf_counter()
    graph_pooled(runtime, lambda a, b: decode_pixels(paths[a:b], 112, None), len(paths), ["native"], 3.0, False,
                 32, 2)
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    setup_logging(quiet=True)
    cfg = replace(load_experiment("sface_finetune")[0], threads=2)
    backbone, data_cfg = build_backbone(replace(TrainConfig(), backbone="sface"))
    (cut,) = CachedPrefix.cuts(cfg)
    tuned, _ = build_backbone(replace(TrainConfig(), backbone="sface"))
    frozen_units = {id(p) for unit in tuned.chain_units()[:cut.units] for p in unit.parameters()}
    with torch.no_grad():  # a fine-tuned network: every trained unit moved a little
        for param in tuned.parameters():
            if id(param) not in frozen_units:
                param.mul_(1.01)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "faces").mkdir()
        paths = write_faces(Path(folder) / "faces", args.images)
        stored = Path(folder) / "cache"
        frozen = FrozenPass(backbone, state_digest(backbone), data_cfg, "bench", CPU, flip=False)
        frozen.outputs(paths, stored, [cut])  # the prefix the tail sides read
        runtime, folded = GraphRuntime(tuned, nets=2), for_inference(tuned)
        sides = {"features": lambda: frozen_pass(backbone, data_cfg, paths, ()),
                 "features + prefix": lambda: frozen_pass(backbone, data_cfg, paths, (cut,)),
                 "tuned model, tail over the prefix": lambda: tail(tuned, frozen, cut, paths, stored),
                 "tuned model, tail, BatchNorms folded": lambda: tail(folded, frozen, cut, paths, stored),
                 "tuned model, whole graph": lambda: whole_graph(runtime, paths)}
        for side in sides.values():  # warm-up: engines, allocators, the page cache
            side()
        speed: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, side in sides.items():
                speed[name].append(side())
    med = {k: statistics.median(v) for k, v in speed.items()}
    print(f"{args.images} faces of 112 px, one view, {torch.get_num_threads()} torch threads; img/s, median of "
          f"{args.repeats} interleaved runs")
    for name, value in med.items():
        print(f"  {name:<36} {value:8.1f} img/s   runs {', '.join(f'{v:.1f}' for v in speed[name])}")
    cost = med["features"] / med["features + prefix"] - 1
    print(f"prefix cost over the feature pass alone: {cost:+.1%} ({'meets' if cost <= 0.10 else 'misses'} <= 10%)")
    fold = med["tuned model, tail, BatchNorms folded"] / med["tuned model, tail over the prefix"]
    print(f"the tail with its BatchNorms folded / as trained: {fold:.2f}")
    ratio = med["tuned model, tail, BatchNorms folded"] / med["features"]
    print(f"tuned model's embedding (tail) / frozen feature pass: {ratio:.2f} ({'meets' if ratio >= 1 else 'misses'}"
          " >= 1)")


if __name__ == "__main__":
    main()
