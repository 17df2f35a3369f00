"""What a run leaves on disk and what the next one will cost: disk use of the outputs and caches, `--clean-cache`,
and the per-stage estimates of time and disk space that `--dry-run` (and, for space, the start of a run) gives, from
what earlier runs measured on this machine.

Throughput is recorded in ``{runs}/throughput.json`` after every stage that did work (units per second: images for
data, image views for each frozen network's features (``features:NAME``), runs for head-only training, image passes
for each network's end-to-end training (``train:NAME``), matrices for scoring), and so are the bytes a unit left on
disk (``{stage}_bytes``); until a stage (or that network) has run once here, the estimate uses the figures measured on
the kit's reference machine (2 CPU cores), and says so. A score matrix's size follows from its split (probes x
gallery x 4 bytes).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kinret.io import free_bytes, human_bytes, write_text_atomic
from kinret.log import minutes
from kinret.readback import read_record

# units per second of the default run on the reference machine (2 cores, `benchmarks/bench_pipeline.py`, see
# DEVELOPERS.md): 4,707 photos generated in 13 s, their SFace features in 60 s, 9 head runs in 41 s, 165 score
# matrices in 11 s. Scoring grows faster than the matrix count with the gallery (the re-scorings cluster it): at the
# real size 165 matrices took 156 s, which a run there records for the next estimate.
REFERENCE_RATES = {"data": 360.0, "features": 78.0, "train": 0.22, "score": 15.0}
# bytes a unit leaves on disk in the default run (2026-12-03): 21.7 MB of photos for 4,707 images, 120 MB of frozen
# features and pixel caches for them, 5.7 MB for 9 head runs (checkpoints, summaries)
REFERENCE_BYTES = {"data": 4_600.0, "features": 25_500.0, "train": 650_000.0}
SCORE_OVERHEAD = 1.5  # a score matrix's ids file and the embedding caches behind it, on top of its P x N x 4 bytes
UNITS = {"data": "images", "features": "images", "train": "runs", "score": "matrices"}
THROUGHPUT_FILE = "throughput.json"
def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when absent); links are not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_paths(runs: Path, ensemble_dir: Path) -> list[Path]:
    """What `--clean-cache` removes: frozen-feature and pixel caches, each run's embedding caches, score matrices.
    Checkpoints, configs and summaries stay: everything removed is rebuilt from them on the next run."""
    runs, ensemble_dir = Path(runs), Path(ensemble_dir)
    found = [runs / "_cache", ensemble_dir / "scores"]
    if runs.is_dir():
        found += sorted(p for p in runs.rglob("embeddings") if p.is_dir())
    return [p for p in found if p.exists()]


def disk_use(runs: Path, ensemble_dir: Path) -> list[tuple[str, int]]:
    """(label, bytes) of the run folder, the ensemble folder and, last, the caches inside them."""
    caches = sum(tree_bytes(p) for p in cache_paths(runs, ensemble_dir))
    return [(f"{runs}/", tree_bytes(runs)), (f"{ensemble_dir}/", tree_bytes(ensemble_dir)), ("caches", caches)]


def disk_line(runs: Path, ensemble_dir: Path) -> str:
    *folders, (_, caches) = disk_use(runs, ensemble_dir)
    return ("disk: " + ", ".join(f"{label} {human_bytes(n)}" for label, n in folders)
            + f"; {human_bytes(caches)} of it caches (make_submission.py --clean-cache frees them; checkpoints stay)")


def clean_cache(runs: Path, ensemble_dir: Path) -> int:
    """Remove every cache under `runs` and `ensemble_dir` (see `cache_paths`); returns the bytes freed."""
    freed = 0
    for path in cache_paths(runs, ensemble_dir):
        freed += tree_bytes(path)
        shutil.rmtree(path)
    return freed


def _recorded(runs: Path) -> dict:
    return read_record(Path(runs) / THROUGHPUT_FILE, "its rates are measured again as the stages run")


def _record(runs: Path, key: str, value: float) -> None:
    found = _recorded(runs)
    found[key] = value
    Path(runs).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(runs) / THROUGHPUT_FILE, json.dumps(found, indent=1, sort_keys=True) + "\n")


def _positive(found: dict, keys: dict, suffix: str = "") -> dict[str, float]:
    return {k: float(found[k + suffix]) for k in keys
            if isinstance(found.get(k + suffix), (int, float)) and found[k + suffix] > 0}


def read_rates(runs: Path) -> dict[str, float]:
    """The rates measured on this machine: a stage's (``features``) or one network's in it (``features:NAME``)."""
    return {k: float(v) for k, v in _recorded(runs).items()
            if k.partition(":")[0] in REFERENCE_RATES and isinstance(v, (int, float)) and v > 0}


def record_rate(runs: Path, stage: str, units: float, seconds: float) -> None:
    """Remember `units / seconds` for `stage` (a stage, or ``stage:NAME`` for one network in it; only when the
    stage did measurable work)."""
    if units > 0 and seconds >= 0.5:
        _record(runs, stage, units / seconds)


def read_sizes(runs: Path) -> dict[str, float]:
    """Bytes per unit measured here, by stage."""
    return _positive(_recorded(runs), REFERENCE_BYTES, "_bytes")


def record_size(runs: Path, stage: str, units: float, nbytes: float) -> None:
    """Remember the bytes a unit of `stage` left on disk (when it did work and wrote something)."""
    if units > 0 and nbytes > 0:
        _record(runs, f"{stage}_bytes", nbytes / units)


def disk_need(runs: Path, work: dict[str, float], score_bytes: float = 0.0) -> dict[str, float]:
    """Bytes each stage with work to do will write: its units times the bytes per unit measured here (else the
    reference's); the score stage from its matrices' sizes (`score_bytes`, P x N x 4 each) and their overhead."""
    sizes = REFERENCE_BYTES | read_sizes(runs)
    need = {stage: units * sizes[stage] for stage, units in work.items() if stage in sizes and units > 0}
    if score_bytes > 0:
        need["score"] = score_bytes * SCORE_OVERHEAD
    return need


def _device(folder: Path) -> int:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def space_lines(need: dict[Path, float]) -> tuple[list[str], bool]:
    """Per disk, the bytes the folders on it will receive (`need`: folder -> bytes) against the space free there:
    one line each, and whether any disk is short."""
    by_disk: dict[int, list[Path]] = {}
    for folder, nbytes in need.items():
        if nbytes > 0:
            by_disk.setdefault(_device(folder), []).append(Path(folder))
    lines, short = [], False
    for folders in by_disk.values():
        total, free = sum(need[f] for f in folders), free_bytes(folders[0])
        where = ", ".join(f"{f}/" for f in folders)
        lacking = free is not None and total > free
        short |= lacking
        lines.append(f"disk: about {human_bytes(total)} to write under {where}, "
                     f"{'an unknown amount' if free is None else human_bytes(free)} free there"
                     + (": not enough, the run will stop when the disk fills (exit code 3); free space first "
                        "(make_submission.py --clean-cache) or pass --runs, --ensemble-dir, --out on another disk"
                        if lacking else ""))
    return lines, short


@dataclass(frozen=True)
class Work:
    """`units` of a stage's work (`UNITS[stage]`, or `unit`), done by `what` (a network; "" for the stage as a
    whole) at `reference` units/s on the reference machine (0: the stage's `REFERENCE_RATES`), found as `basis`
    says."""

    stage: str
    units: float
    what: str = ""
    reference: float = 0.0
    basis: str = ""
    unit: str = ""

    @property
    def key(self) -> str:
        """The key of its measured rate in throughput.json."""
        return f"{self.stage}:{self.what}" if self.what else self.stage


def estimate_lines(runs: Path, work: Mapping[str, float] | Iterable[Work]) -> list[str]:
    """One line per piece of work (stage -> units, or `Work`s): its units, the rate used (measured here, else the
    reference) and the estimated wall time; then the total."""
    measured = read_rates(runs)
    items = [Work(k, v) for k, v in work.items()] if isinstance(work, Mapping) else list(work)
    lines, total = [], 0.0
    for w in items:
        if w.units <= 0:
            continue
        here = w.key in measured
        rate = measured[w.key] if here else (w.reference or REFERENCE_RATES[w.stage])
        seconds = w.units / rate
        total += seconds
        source = "measured here" if here else "reference machine" + (f", {w.basis}" if w.basis else "")
        what = f" through {w.what}" if w.what else ""
        lines.append(f"estimate {w.stage:<9} {w.units:>8,.0f} {w.unit or UNITS[w.stage]:<8}{what} at {rate:.3g}/s "
                     f"({source}): ~{minutes(seconds)}")
    lines.append(f"estimate total    ~{minutes(total)}" if lines else "estimate: nothing to build")
    return lines


# ---- what a network costs ------------------------------------------------------------------------------------------
# Images/s of one view through a network's frozen feature pass (every pooling and its embedding) on the reference
# machine (2 CPU cores), by runtime: the graph (cv2.dnn, what the kit runs for an ONNX network on a CPU) or torch
# float32 (an arcface_torch IResNet; training). SFace's graph is the default run's own (bench_pipeline.py, JPEG decoding
# and caching included); every other entry is SFace's graph rate times the speed relative to it measured side by side
# on 2026-12-03, so the load of the shared machine then cancels out: the IResNets by `python
# benchmarks/bench_iresnet.py --images 64 --repeats 3 --side sface-graph --side iresnet18 ...` (medians: SFace's graph
# 28.2 img/s; IResNet-18 8.48, -34 4.90, -50 4.20, -100 1.72, -200 1.12), SFace in torch by `python
# benchmarks/bench_embed.py --images 256 --repeats 3` (torch-fp32 8.0 against the graph's 14.2, both with the mirror
# image). See benchmarks/README.md.
NETWORK_RATES: dict[tuple[str, str], float] = {
    ("sface", "graph"): REFERENCE_RATES["features"], ("sface", "torch-fp32"): 44.0,
    ("iresnet18", "torch-fp32"): 23.0, ("iresnet34", "torch-fp32"): 13.5, ("iresnet50", "torch-fp32"): 11.6,
    ("iresnet100", "torch-fp32"): 4.8, ("iresnet200", "torch-fp32"): 3.1}
# GFLOP/s of each runtime on the reference machine, from the same run and scaled the same way (graph: random IResNet-50
# and -100 exported to ONNX, as insightface's w600k_r50.onnx and glintr100.onnx, 2.80 and 1.89 img/s; torch-fp32: the
# IResNets' median): a network the table lacks (an ONNX file, a timm name) is estimated at this over its GFLOPs an
# image (`network_gflops`, 2 per multiply-add).
RUNTIME_GFLOPS: dict[str, float] = {"graph": 110.0, "torch-fp32": 120.0}
# A training image costs about three forward passes (forward, backward through the activations and to the weights);
# with a cached prefix only the unfrozen units' share of them. Not measured for every network: the SFace fine-tune
# (cut 24, 15% of its GFLOPs after the cut) ran at ~43 images/s where this predicts ~100, the rest being the gather of
# the cached prefix and the optimizer; a run on this machine records its own rate.
TRAIN_PASSES = 3.0


def network_gflops(backbone, size: int, cut: int = 0) -> float:
    """GFLOPs (2 per multiply-add, torch's FlopCounterMode) of one `size` px image through the backbone's feature
    pass and its own embedding layer when it has one; with `cut`, through the units after the first `cut` only."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = backbone.training
    backbone.eval()
    param = next(backbone.parameters(), None)
    x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
    with torch.no_grad():
        h = backbone.forward_prefix(x, cut) if cut else x
        with FlopCounterMode(display=False) as counter:
            fmap = backbone.forward_rest(h, cut) if cut else backbone.forward_features(x)
            if hasattr(backbone, "forward_native"):
                backbone.forward_native(fmap)
    backbone.train(was)
    return counter.get_total_flops() / 1e9


def network_key(cfg, backbone=None) -> str:
    """The name a config's network goes by in the rates: ``sface``, an IResNet by its depth (``iresnet100``, read off
    the built `backbone` or the weights file, whatever the file is called), else the backbone and its weights file's
    stem (``onnx-w600k_r50``, ``resnet50``)."""
    from kinret.models.iresnet import INFER, LAYERS, blocks_per_layer, read_state

    if cfg.backbone == "sface" or cfg.backbone in LAYERS:
        return cfg.backbone
    if cfg.backbone == INFER and cfg.weights:
        layers = getattr(backbone, "layers", None) or blocks_per_layer(read_state(cfg.weights))
        return next((name for name, blocks in LAYERS.items() if tuple(layers) == blocks), cfg.backbone)
    return cfg.backbone + (f"-{Path(cfg.weights).stem}" if cfg.weights else "")


def network_rate(backbone, cfg, runtime: str, size: int) -> tuple[float, str]:
    """(images/s of one view through the backbone's feature pass on the reference machine in `runtime`, where that
    figure comes from): the measured table, else the runtime's GFLOP/s over the network's GFLOPs."""
    key = (network_key(cfg, backbone), runtime)
    if key in NETWORK_RATES:
        return NETWORK_RATES[key], ""
    per_s = RUNTIME_GFLOPS.get(runtime, RUNTIME_GFLOPS["torch-fp32"])
    gflops = network_gflops(backbone, size)
    return per_s / gflops, f"{gflops:.3g} GFLOPs an image at {per_s:.3g} GFLOP/s in {runtime}"


def feature_units(todo: Sequence[tuple]) -> dict[int, tuple[object, float]]:
    """id(source) -> (source, image views) of the frozen-feature work `todo` ((BackboneSource, ImageSet) pairs):
    an out-of-fold set is rows of the training set, counted once; the mirror view, when cached, counts as an image."""
    sets: dict[int, tuple[object, dict[str, int]]] = {}
    for source, images in todo:
        root = images.parent or images
        sets.setdefault(id(source), (source, {}))[1][root.label] = len(root.paths)
    return {i: (src, (2 if src.cfg.flip_views else 1) * sum(n.values())) for i, (src, n) in sets.items()}


def feature_work(todo: Sequence[tuple]) -> list[Work]:
    """One `Work` per frozen backbone of `todo` (see `feature_units`), at its network's reference rate."""
    out = []
    for source, units in feature_units(todo).values():
        feats = source.features
        rate, basis = network_rate(feats.net, source.cfg, feats.engine, feats.data_cfg["input_size"][-1])
        out.append(Work("features", units, network_key(source.cfg, feats.net), rate, basis,
                        "views" if source.cfg.flip_views else ""))
    return out


def training_images(splits: Mapping) -> int:
    """The training set's size: the parent image set of the out-of-fold protocols (0 without one)."""
    return next((len(sd.images.parent.paths) for sd in splits.values() if sd.images.parent is not None), 0)


def run_passes(cfg, fold: int, n_train: int, share: float = 1.0) -> float:
    """Forward-pass equivalents an end-to-end run makes through its network: every epoch's training images
    (`TRAIN_PASSES` each; a pair loss draws 4 x pairs_per_epoch images, a family loss the fold's training images once)
    and the held-out evaluation after every epoch and before the first (one pass a view); times `share`, the part of
    the network a run with a cached prefix runs (`tail_share`)."""
    from kinret.models.losses import trains_pair_head

    held = n_train if fold < 0 else n_train / cfg.n_folds
    trained = n_train - (0 if fold < 0 else held)
    per_epoch = 4 * cfg.pairs_per_epoch if trains_pair_head(cfg.loss) else trained
    views = 2 if cfg.flip_views else 1
    return share * (cfg.epochs * TRAIN_PASSES * per_epoch + (cfg.epochs + 1) * held * views)


def tail_share(backbone, cfg, size: int) -> float:
    """The share of the network's GFLOPs a run computes per image: 1, or with `cache_prefix` the units after its cut."""
    if not cfg.cache_prefix:
        return 1.0
    cut = cfg.freeze_units
    return network_gflops(backbone, size, cut) / network_gflops(backbone, size) if cut else 1.0


def e2e_passes(todo: Sequence, n_train: int) -> dict[str, list]:
    """network -> [forward passes, reference rate, its basis] of the end-to-end runs among `todo` ((Run, state))."""
    from kinret.models.checkpoint import shared_backbone

    out: dict[str, list] = {}
    built: dict = {}
    for run, _ in todo:
        if run.cfg.mode == "e2e":
            backbone, data_cfg = shared_backbone(replace(run.cfg, pretrained=False), built)  # cost, not weights
            key, size = network_key(run.cfg, backbone), data_cfg["input_size"][-1]
            if key not in out:
                out[key] = [0.0, *network_rate(backbone, run.cfg, "torch-fp32", size)]
            out[key][0] += run_passes(run.cfg, run.fold, n_train, tail_share(backbone, run.cfg, size))
    return out


def train_work(todo: Sequence, n_train: int) -> list[Work]:
    """The training stage's work for unfinished runs `todo` ((Run, state) pairs): every run's fixed cost (start,
    data, evaluation, checkpoints) counted as a head-only run, at the stage's rate in runs; and each end-to-end
    network's forward passes (`run_passes`) at its torch rate."""
    out = [Work("train", len(todo))] if todo else []
    return out + [Work("train", units, key, rate, basis, "passes")
                  for key, (units, rate, basis) in e2e_passes(todo, n_train).items()]


def record_train_rate(runs: Path, todo: Sequence, n_train: int, seconds: float) -> None:
    """Record the rate of an experiment's training stage over its runs `todo` ((Run, state) pairs): head-only runs in
    runs/s, end-to-end runs of one network in forward passes/s (`run_passes`); a mix of both is not recorded."""
    modes = {run.cfg.mode for run, _ in todo}
    if modes == {"head"}:
        record_rate(runs, "train", len(todo), seconds)
    elif modes == {"e2e"}:
        passes = e2e_passes(todo, n_train)
        if len(passes) == 1:
            key, (units, _, _) = passes.popitem()
            record_rate(runs, f"train:{key}", units, seconds)


def expected_images(cfg) -> float:
    """The number of images a synthetic config makes, on average (members and photos drawn uniformly)."""
    families = cfg.n_train + cfg.n_val + cfg.n_test
    return families * (cfg.min_members + cfg.max_members) / 2 * (cfg.min_images + cfg.max_images) / 2
