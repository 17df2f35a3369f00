"""What a frozen pass's key needs to know of a network, kept so a later run knows it without building the network.

Building a face network costs seconds (SFace's graph is converted, checked against cv2 and hashed), and a warm rerun
needs only the keys of its caches to find that nothing is to be done. A `NetworkCard` holds what those keys take from
the built network: the digest of its weights, its data config, its input convention, whether it runs as its ONNX
graph on a CPU and whether it has its own embedding layer. It is recorded, once the network was built, under
``{cache}/networks/{id}.json``, the id naming what the network is built from without building it (`source_id`: the
builder's inputs, the content of its files, the seed of a scratch network and the code that builds it). A network
whose id cannot be told without building it (timm's hub weights) is built every time, as before. A record that does
not read back is built again, with one warning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from kinret.features.cache import file_digest
from kinret.io import write_text_atomic
from kinret.models.config import TrainConfig, seed_of
from kinret.models.networks import FACE_NETWORKS
from kinret.models.onnx_net import OnnxBackbone
from kinret.models.units import NativeEmbedding
from kinret.readback import DamagedFile, read_json, rebuilt
from kinret.versions import code_version


@dataclass(frozen=True)
class NetworkCard:
    """A built network as a frozen pass's key sees it (see the module docstring)."""

    digest: str
    data_cfg: dict
    convention: str  # repr of an ONNX network's input convention, "None" for any other network
    graph: bool  # an ONNX network: run as its graph on a CPU
    native: bool  # it has its own embedding layer (the "native" pooling)

    @classmethod
    def of(cls, net: nn.Module, data_cfg: dict, digest: str) -> NetworkCard:
        graph = isinstance(net, OnnxBackbone)
        return cls(digest, {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data_cfg.items()},
                   repr(net.convention) if graph else "None", graph, isinstance(net, NativeEmbedding))


def source_id(cfg: TrainConfig) -> str | None:
    """A name for what `cfg`'s network is built from, told without building it: the builder's inputs, the content of
    its files (the bundled SFace's, a weights file's), the seed a scratch network starts from, the versions of the
    libraries that define it and the code that builds it; None for timm's hub weights (only building tells)."""
    if cfg.pretrained and not cfg.weights and cfg.backbone not in FACE_NETWORKS:
        return None
    files = [Path(cfg.weights)] if cfg.weights else []
    if cfg.backbone == "sface":
        from kinret.models.sface import sface_onnx_path

        files.insert(0, sface_onnx_path())
    if not all(f.is_file() for f in files):
        return None  # a missing file: building says so
    versions = [importlib.metadata.version(p) for p in ("torch", "timm", "onnx")]
    parts = [cfg.backbone, cfg.pretrained, cfg.input_size, cfg.input_convention, cfg.onnx_output,
             seed_of(cfg.seed), *versions, code_version("kinret.models"), *(file_digest(f) for f in files)]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _record(cache_dir: Path, cfg: TrainConfig) -> Path | None:
    found = source_id(cfg)
    return None if found is None else Path(cache_dir) / "networks" / f"{cfg.backbone}_{found}.json"


def recorded_card(cfg: TrainConfig, cache_dir: Path) -> NetworkCard | None:
    """The card recorded for `cfg`'s network, or None (never built here, or not nameable without building)."""
    path = _record(cache_dir, cfg)
    if path is None or not path.is_file():
        return None
    try:
        data = read_json(path, dict, ("digest", "data_cfg", "convention", "graph", "native"))
        data["data_cfg"] = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(data["data_cfg"]).items()}
        return NetworkCard(**{k: data[k] for k in ("digest", "data_cfg", "convention", "graph", "native")})
    except (DamagedFile, TypeError, ValueError, AttributeError) as exc:
        rebuilt(exc if isinstance(exc, DamagedFile) else DamagedFile(path, str(exc)), "the network is built again")
        return None


def record_card(cfg: TrainConfig, cache_dir: Path, card: NetworkCard) -> None:
    """Keep `card` for the next run (nothing when the network cannot be named without building it)."""
    path = _record(cache_dir, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(asdict(card), indent=1, sort_keys=True) + "\n")
