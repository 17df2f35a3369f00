"""A competitor's own face networks through the kit's commands: a small ONNX network exported here with insightface's
input convention and random IResNet-18 weights saved under insightface's key names join make_submission.py's variant
table (each one's zero-shot group and a head trained on it), `--set EXPERIMENT:key=value` reaches an experiment from
make_submission.py and kinret.ensemble, the dry run estimates each network's cost, the ONNX network fine-tunes with a
cached prefix and embeds as its torch tail does, wrong files stop both commands with exit code 2 and one line naming
the file, and the example experiment refuses to run without its file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO
from torch import nn

from kinret.data.pixels import decode_pixels, normalize, to_float
from kinret.data.synth import SynthConfig, generate
from kinret.ensemble import cli as ensemble
from kinret.features.feeds import load_model
from kinret.features.sources import CheckpointSource, ImageSet
from kinret.models.config import TrainConfig
from kinret.models.iresnet import LAYERS, IResNet
from kinret.models.onnx_graph import with_outputs
from kinret.models.onnx_net import build_onnx_backbone
from kinret.submission import make as submit
from kinret.submission.estimate import read_record
from kinret.submission.workload import train_work
from kinret.train import cli as train
from kinret.train.experiments import load_experiment, scoped_overrides

CPU = torch.device("cpu")
FINE_TUNE = dict(backbone="onnx", mode="e2e", pool="native", neck="none", loss="cosface", class_init="means",
                 optimizer="adamw", lr=1e-3, classifier_lr=1e-2, epochs=1, batch_size=8, batching="random",
                 freeze_bn=True, freeze_units=2, cache_prefix=True, flip_views=False, flip_p=0.0, color_jitter=0.0,
                 affine_degrees=0.0, affine_translate=0.0, affine_scale=0.0, n_folds=2, eval_pairs=50)
HEADS = dict(mode="head", pool="native", neck="residual", loss="cosface", class_init="means", epochs=2,
             batch_size=8, batching="random", n_folds=2, flip_views=False, eval_pairs=50)


# ---- the networks and the data -------------------------------------------------------------------------------------
class Block(nn.Module):
    """An IResNet-style block: BN, conv, BN, PReLU, conv (stride), BN, plus the downsampled input."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                                  nn.PReLU(c), nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, 2, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.down(x)


class TinyArcFace(nn.Module):
    """A 112 px, 32-d face network shaped like insightface's (stem, residual blocks to 7x7, BN, fc, BatchNorm1d)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))
        self.blocks = nn.Sequential(Block(8), Block(8), Block(8))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 7 * 7, 32)
        self.features = nn.BatchNorm1d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.bn(self.blocks(self.stem(x))), 1)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The 112 px synthetic families, the tiny network as ONNX (input `data`, dynamic batch) and random IResNet-18
    weights saved as arcface_torch saves backbone.pth."""
    folder = tmp_path_factory.mktemp("facenets")
    torch.manual_seed(0)
    net = TinyArcFace()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(net.eval(), torch.zeros(1, 3, 112, 112), buf, input_names=["data"],
                          output_names=["embedding"], dynamic_axes={"data": {0: "N"}, "embedding": {0: "N"}},
                          dynamo=False)
    (folder / "tiny_arcface.onnx").write_bytes(buf.getvalue())
    torch.manual_seed(1)
    torch.save(IResNet(LAYERS["iresnet18"]).state_dict(), folder / "backbone.pth")
    data = generate(folder / "synthetic", SynthConfig(seed=5, n_train=6, n_val=2, n_test=2, max_members=4,
                                                      max_images=2))
    return {"onnx": folder / "tiny_arcface.onnx", "pth": folder / "backbone.pth", "data": data}


def experiment(path: Path, **fields) -> Path:
    """An experiment file: TrainConfig with these fields."""
    body = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    path.write_text(f"from dataclasses import replace\n\nfrom kinret.models.config import TrainConfig\n\n"
                    f"cfg = replace(TrainConfig(), {body})\n")
    return path


def submission_args(files: dict[str, Path], work: Path, *extra: str) -> list[str]:
    return ["--data-root", str(files["data"]), "--out", str(work / "out"), "--runs", str(work / "runs"),
            "--ensemble-dir", str(work / "ens"), "--bootstrap", "100", "--quiet", *extra]


# ---- both networks in one make_submission.py run --------------------------------------------------------------------
def test_onnx_and_iresnet_sources_join_the_variant_table(files, tmp_path, capsys):
    onnx_exp = experiment(tmp_path / "face_onnx.py", backbone="onnx", input_convention="insightface", **HEADS)
    iresnet_exp = experiment(tmp_path / "face_iresnet.py", backbone="iresnet", weights=str(files["pth"]), **HEADS)
    argv = submission_args(files, tmp_path, "--experiments", str(onnx_exp), str(iresnet_exp), "--set",
                           f"face_onnx:weights={files['onnx']}")
    assert submit.main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    print(dry)
    lines = [ln for ln in dry.splitlines() if ln.startswith("estimate")]
    for network in ("iresnet-backbone", "onnx-tiny_arcface"):  # each network by its variants' name, not pretended
        assert any(f"features {network} " in ln and "time unknown" in ln for ln in lines), lines
    assert any(ln.startswith("estimate train face_onnx") and " runs" in ln for ln in lines), lines

    assert submit.main(argv) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "out" / "variants.md").read_text()
    for variant in ("onnx-tiny_arcface:cos-native-meanemb", "iresnet-backbone:cos-native-meanemb",
                    "face_onnx:cos-emb-meanemb", "face_iresnet:cos-emb-meanemb"):
        assert f"| {variant} |" in table, variant  # each network's zero-shot group and the head trained on it
    settings = json.loads((tmp_path / "out" / "selection.json").read_text())["settings"]
    assert settings["overrides"] == [f"face_onnx:weights={files['onnx']}"]
    assert "submitted: " in out
    found = read_record(tmp_path / "runs")
    assert {"features:iresnet-backbone", "train:face_onnx", "train:face_iresnet"} <= set(found), found

    # the ensemble stage alone finds the same trained runs through the same override; without it, the experiment
    # as written has no graph, and the command says which override it needs
    ens = ["--data-root", str(files["data"]), "--runs", str(tmp_path / "runs"), "--ensemble-dir",
           str(tmp_path / "ens"), "--bootstrap", "100", "--quiet", "--experiments", str(onnx_exp)]
    assert ensemble.main([*ens, "--set", f"face_onnx:weights={files['onnx']}"]) == 0
    capsys.readouterr()
    assert ensemble.main(ens) == 2
    assert "face_onnx: backbone=onnx needs the network's graph" in capsys.readouterr().err
    assert submit.main([*argv, "--dry-run"]) == 0  # everything built: nothing left to estimate
    assert "estimate: nothing to build" in capsys.readouterr().out


def test_scoped_overrides(tmp_path):
    mine = str(experiment(tmp_path / "face_onnx.py", backbone="onnx"))
    exps = ["sface_heads", mine]
    got = scoped_overrides(exps, ["epochs=3", "face_onnx:weights=/m/w600k_r50.onnx", "sface_heads:lr=0.1"])
    assert got == {"sface_heads": ("epochs=3", "lr=0.1"), mine: ("epochs=3", "weights=/m/w600k_r50.onnx")}
    assert scoped_overrides(exps, [f"{mine}:input_convention=sface"])[mine] == ("input_convention=sface",)
    from kinret.errors import KinretInputError
    for bad, message in (("other:lr=1", "none of the experiments"), ("lr", "key=value"),
                         ("data_root=/x", "--data-root")):
        with pytest.raises(KinretInputError, match=message):
            scoped_overrides(exps, [bad])


# ---- what the dry run says a network costs ------------------------------------------------------------------------
def test_an_unmeasured_networks_checkpoints_are_estimated_from_its_size_and_its_time_is_not_pretended(files, tmp_path):
    from kinret.submission.estimate import estimate, estimate_lines
    from kinret.train.experiments import Run

    cfg = replace(TrainConfig(), **{**FINE_TUNE, "weights": str(files["onnx"]), "name": "tuned"})
    work = train_work([Run(cfg, 0), Run(cfg, 1)], 100, known={})
    assert [(w.key, w.runs, w.units) for w in work] == [("train:tuned", 2, 200.0)]
    n = sum(p.numel() for p in build_onnx_backbone(files["onnx"], "insightface")[0].parameters())
    assert work[0].size == (4 * n, f"{n / 1e6:.1f}M parameters x 4 bytes a run")
    found = estimate(work[0], {}, {})
    assert found.seconds is None and found.nbytes == 2 * 4 * n
    lines = estimate_lines([found])
    print("\n".join(lines))
    assert "time unknown" in lines[0] and lines[-1] == "estimate total ~0 s + train tuned (not measured)"


# ---- fine-tuning the ONNX network over its cached prefix ------------------------------------------------------------
def train_run(exp: Path, files: dict[str, Path], runs: Path, *extra: str) -> int:
    return train.main(["-C", str(exp), "--fold", "0", "--quiet", "--set", f"data_root={files['data']}", "--set",
                       f"out_root={runs}", *extra])


def test_onnx_fine_tune_with_cached_prefix_embeds_as_its_torch_tail(files, tmp_path):
    exp = experiment(tmp_path / "ft.py", weights=str(files["onnx"]), **FINE_TUNE)
    runs = tmp_path / "runs"
    assert train_run(exp, files, runs) == 0
    assert list((runs / "_cache").glob("frozen_onnx_*/cut2-float16.npy"))  # training ran the tail over the prefix
    run_dir = runs / "ft" / "fold0"
    model, _, data_cfg = load_model(run_dir)
    # the tail's weights moved; the two frozen units' did not
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    fresh, _ = build_onnx_backbone(files["onnx"], "insightface")
    before = {f"backbone.{k}": v for k, v in fresh.state_dict().items()}
    moved = {k for k, v in saved.items() if k in before and not torch.equal(v, before[k])}
    assert moved and not any(k.startswith(("backbone.units.0.", "backbone.units.1.")) for k in moved)

    paths = sorted((files["data"] / "train").rglob("*.jpg"))[:12]
    images = ImageSet("few", tuple(paths), tuple(str(p) for p in paths))
    source = CheckpointSource(run_dir, runs / "_cache")
    emb = source.embeddings(images)["emb"]
    x = normalize(to_float(decode_pixels(paths, 112, None), CPU), data_cfg["mean"], data_cfg["std"])
    with torch.no_grad():
        whole = model(x).numpy()
        tail = model.embed_rest(model.backbone.forward_prefix(x, 2), 2).numpy()
    cos = (emb * whole).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(whole, axis=1))
    print(f"\nfine-tuned ONNX network: kit embedding (tail over the cached prefix) vs torch: cosine {cos.min():.7f}")
    assert cos.min() >= 0.999
    np.testing.assert_allclose(tail, whole, atol=1e-5)


@pytest.mark.slow
def test_onnx_fine_tune_under_torchrun_matches_one_process(files, tmp_path):
    """The GPU path's DDP, on the CPU: two gloo processes fine-tune the ONNX network over its cached prefix (the
    global batch split between them) to the weights one process reaches."""
    exp = experiment(tmp_path / "ddp.py", weights=str(files["onnx"]), **{**FINE_TUNE, "optimizer": "sgd", "lr": 0.05})
    runs = tmp_path / "runs"
    assert train_run(exp, files, runs, "--set", "name=single") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kinret.train",
           "-C", str(exp), "--fold", "0", "--quiet", "--set", f"data_root={files['data']}", "--set", f"out_root={runs}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KINRET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = (torch.load(runs / name / "fold0" / "checkpoint.pt", weights_only=False)["model"]
                   for name in ("single", "ddp"))
    diff = max((single[k].float() - ddp[k].float()).abs().max().item() for k in single)
    print(f"\nONNX fine-tune, 2-process DDP (gloo) vs one process: largest weight difference {diff:.2e}")
    assert diff < 1e-5


# ---- wrong files ------------------------------------------------------------------------------------------------
def wrong_file(case: str, files: dict[str, Path], folder: Path) -> tuple[Path, dict]:
    """(the file, the experiment fields that use it) of each kind of wrong file."""
    if case == "not_a_graph":
        path = folder / "notes.onnx"
        path.write_bytes(b"\x08\x07 not a protobuf graph" * 10)
        return path, {"backbone": "onnx"}
    if case == "wrong_input_size":
        return files["onnx"], {"backbone": "onnx", "input_size": 96}
    if case == "two_outputs":
        model = onnx.load(files["onnx"])
        second = model.graph.node[-3].output[0]
        path = folder / "two.onnx"
        onnx.save(with_outputs(model, [model.graph.output[0].name, second], {}), path)
        return path, {"backbone": "onnx"}
    return files["pth"], {"backbone": "iresnet50"}  # IResNet-18 weights for an IResNet-50


@pytest.mark.parametrize("case, message", [("not_a_graph", "not an ONNX graph"),
                                           ("wrong_input_size", "input_size 96 was asked"),
                                           ("two_outputs", "2 outputs"),
                                           ("other_depth", "keys of another depth")])
def test_wrong_files_stop_both_commands_naming_the_file(files, tmp_path, capsys, case, message):
    path, fields = wrong_file(case, files, tmp_path)
    exp = experiment(tmp_path / "bad.py", weights=str(path), **{**HEADS, **fields})
    code = train.main(["-C", str(exp), "--fold", "0", "--quiet", "--set", f"data_root={files['data']}", "--set",
                       f"out_root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(path) in err[0] and message in err[0], err
    code = submit.main(submission_args(files, tmp_path, "--experiments", str(exp)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(path) in err[0] and message in err[0], err


def test_example_experiment_needs_its_file(files, tmp_path):
    """arcface_onnx_heads is sface_heads' grid on a graph given at run time; without one both commands say so."""
    cfg, grid = load_experiment("arcface_onnx_heads")
    heads, heads_grid = load_experiment("sface_heads")
    assert (cfg.backbone, cfg.weights, cfg.input_convention, cfg.name) == ("onnx", "", "insightface",
                                                                          "arcface_onnx_heads")
    assert grid == heads_grid and replace(cfg, backbone="sface", name="sface_heads") == heads
    env = {**os.environ, "KINRET_NO_PROGRESS": "1"}
    for cmd in (["-m", "kinret.train", "-C", "arcface_onnx_heads", "--quiet", "--set", f"data_root={files['data']}",
                 "--set", f"out_root={tmp_path / 'runs'}"],
                ["make_submission.py", *submission_args(files, tmp_path, "--experiments", "arcface_onnx_heads")]):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and "--set weights=FILE.onnx" in err[0], proc.stderr
