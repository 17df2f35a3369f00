"""What a newcomer meets first: a dry run that writes nothing, external features that belong to their data, a data
check that names every image it leaves out, an offline answer for pretrained weights, README figures made by the
kit, and the smaller frictions of a first run (help texts, messages, the old zip, the histogram's axis, progress)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from kinret.data.layout import DataLayout
from kinret.data.workspace import dataset_name, work_dirs
from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig
from kinret.models.networks import build_backbone


# ---- pretrained weights offline -------------------------------------------------------------------------------------
def test_pretrained_weights_offline_answer_at_once_without_retries(monkeypatch):
    """The hub client imported online (as when HF_HUB_OFFLINE is unset) and no network: one connection attempt,
    then the clear error; the hub client's download retries would take a minute."""
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    attempts = []
    real = socket.getaddrinfo

    def unreachable(host, *args, **kwargs):
        if "huggingface" in str(host):
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    t0 = time.perf_counter()
    with pytest.raises(KinretInputError, match="offline .* not in the local cache.*--set weights=FILE"):
        build_backbone(TrainConfig(backbone="resnet18", pretrained=True))
    print(f"pretrained=true offline answered in {time.perf_counter() - t0:.2f} s after {len(attempts)} attempt(s)")
    assert len(attempts) <= 1
    assert hub.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # offline only for that call


# ---- shared: a run folder --------------------------------------------------------------------------------------------
def sub(work: Path) -> Path:
    """The submission folder of data/small's runs in `work`."""
    return work / "submissions" / dataset_name(work / "data" / "small")


def fast(data: Path | str, *extra: str) -> list[str]:
    """make_submission.py's arguments for a training-free run (raw pixels only: seconds) in the current folder."""
    return ["--data-root", str(data), "--experiments", *extra]


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root`: folders, links (their target) and files (their bytes' SHA-1)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "folder"
        else:
            out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ran(tiny_data, tmp_path_factory):
    """A folder a run already ran in: data/small (a tiny synthetic set), data/synthetic (a tiny set standing in for
    the default, of another seed), an experiment file of its own, and a training-free run's outputs."""
    from conftest import write_experiment

    from kinret.submission.make import main

    work = tmp_path_factory.mktemp("ran")
    shutil.copytree(tiny_data, work / "data" / "small")
    shutil.copytree(tiny_data, work / "data" / "synthetic")
    (work / "exp").mkdir()
    write_experiment(work / "exp" / "mine.py", epochs=1)
    cwd = Path.cwd()
    os.chdir(work)
    try:
        assert main(fast("data/small", "--quiet")) == 0
    finally:
        os.chdir(cwd)
    return work


# ---- 1. a dry run writes nothing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    fast("data/small", "--dry-run"),                                        # everything built already
    ["--data-root", "data/small", "--experiments", "exp/mine.py", "--dry-run"],  # an untrained experiment file
    ["--dry-run"],                                                           # the default data would be generated
    ["--dry-run", "--data-seed", "1"],
    ["--dry-run", "--regenerate"],
], ids=["already-ran", "experiment-file", "default", "data-seed", "regenerate"])
def test_a_dry_run_writes_nothing_anywhere(ran, argv, monkeypatch, capsys):
    from kinret.submission.make import main

    monkeypatch.chdir(ran)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as a plain `python` would: an imported file leaves .pyc
    before = tree(ran)
    assert main(argv) == 0
    assert tree(ran) == before
    assert sys.dont_write_bytecode is False
    assert "estimate" in capsys.readouterr().out


# ---- 2. external features belong to their data -----------------------------------------------------------------------
def _external(folder: Path, ids: list[str]) -> None:
    import numpy as np

    folder.mkdir(parents=True)
    np.savez(folder / "embeddings.npz", image_ids=np.array(ids),
             embeddings=np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32))


def test_an_external_folder_of_other_data_is_left_out_with_one_warning(tiny_data, tmp_path, monkeypatch, capsys):
    from kinret.submission.make import main

    monkeypatch.chdir(tmp_path)
    ensemble = work_dirs(tiny_data).ensemble  # the data set's own ensemble folder, where its external folders go
    _external(ensemble / "external" / "elsewhere", [f"train/F9{i:03d}/MID1/a.jpg" for i in range(5)])
    assert main(fast(tiny_data)) == 0
    err = capsys.readouterr().err
    assert err.count("left out") == 1 and f"{ensemble}/external/elsewhere left out: its embeddings.npz covers" in err
    assert "elsewhere" not in (ensemble / "variants.csv").read_text()


def test_an_external_folder_covering_part_of_the_data_stops_the_run_naming_it(tiny_data, tmp_path, monkeypatch,
                                                                              capsys):
    from kinret.data.images import is_image_file
    from kinret.submission.make import main

    monkeypatch.chdir(tmp_path)
    test_images = [str(p.relative_to(tiny_data)) for p in sorted((tiny_data / "test").rglob("*")) if is_image_file(p)]
    _external(work_dirs(tiny_data).ensemble / "external" / "half", test_images)
    assert main(fast(tiny_data, "--quiet")) == 2
    err = capsys.readouterr().err
    assert f"{work_dirs(tiny_data).ensemble}/external/half/embeddings.npz: no embedding for" in err
    assert "--ensemble-dir" in err


# ---- 3. the data check names every image it leaves out ---------------------------------------------------------------
@pytest.fixture
def data(tiny_data, tmp_path):
    return shutil.copytree(tiny_data, tmp_path / "my data")


def test_data_check_lists_every_image_it_does_not_count_and_why(data, capsys):
    from kinret.data.check import main

    face = next((data / "train" / "F0001" / "MID1").glob("*.jpg"))
    extra = [data / "train" / "F0001" / "loose.jpg", data / "train" / "F0002" / "MID1" / "scan.tif",
             data / "extra" / "x.jpg", data / "train" / "F0003" / "MID1" / "deeper" / "y.jpg"]
    for path in extra:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(face, path)
    assert main(["check", str(data)]) == 0
    out = capsys.readouterr().out
    assert "skipped  4 image file(s) a run does not read" in out
    for path, why in zip(extra, ["outside a MID* folder", "extension .tif is not read",
                                 "in extra/, a folder the layout does not use",
                                 "in a subfolder of a member folder"], strict=True):
        assert str(path) in out and why in out
    assert out.rstrip().splitlines()[-1] == f"usable: python make_submission.py --data-root '{data.resolve()}'"


def test_data_check_suggests_the_move_for_a_layout_one_level_too_deep(data, capsys):
    from kinret.data.check import main

    (data / "test").rename(data / "inner")
    (data / "test").mkdir()
    (data / "inner").rename(data / "test" / "test")
    assert main(["check", str(data)]) == 2
    out = capsys.readouterr().out
    assert f"hint     {data}/test/test looks like DATA/test one level too deep: move its contents up (mv " in out
    assert "not in the test layout" not in out  # its images are what the hint moves, not listed one by one


def test_a_run_warns_once_about_images_it_does_not_read(data, tmp_path, monkeypatch, capsys):
    from kinret.submission.make import main

    monkeypatch.chdir(tmp_path)
    shutil.copy(next((data / "train" / "F0001" / "MID1").glob("*.jpg")), data / "train" / "F0001" / "loose.jpg")
    assert main(fast(data, "--quiet")) == 0
    err = capsys.readouterr().err
    assert err.count("are not read") == 1
    assert f"1 image file(s) under {data} are not read, e.g. {data}/train/F0001/loose.jpg (outside a MID*" in err


# ---- 5. the README's figures are made by the kit ---------------------------------------------------------------------
def readme_figures():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "benchmarks" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_holds_the_figures_the_script_fills():
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    for name in ("results", "timings"):
        assert text.count(f"<!-- figures:{name} -->\n") == 1 and text.count(f"\n<!-- /figures:{name} -->") == 1


def test_readme_figures_disagreeing_with_the_run_fail_the_check(ran, tmp_path, capsys):
    figures = readme_figures()
    readme = tmp_path / "README.md"
    readme.write_text("# kit\n\n<!-- figures:timings -->\ntyped by hand: 141 s\n<!-- /figures:timings -->\n\n## Results"
                      "\n\n<!-- figures:results -->\n| typed | 0.1642 |\n<!-- /figures:results -->\n")
    assert figures.main(["--run", str(ran), "--check", str(readme)]) == 1
    assert "figures results, timings differ" in capsys.readouterr().err
    assert figures.main(["--run", str(ran), "--write", str(readme)]) == 0
    assert figures.main(["--run", str(ran), "--check", str(readme)]) == 0
    text = readme.read_text()
    record = json.loads((sub(ran) / "run.json").read_text())
    assert f"{record['process_seconds']:.0f} s from a fresh folder" in " ".join(text.split()) and "typed" not in text
    chosen = json.loads((sub(ran) / "selection.json").read_text())["name"]
    row = next(line for line in text.splitlines() if line.startswith(f"| chosen here: `{chosen}`"))
    readme.write_text(text.replace(row, row.replace("0.", "1.", 1)))  # one figure typed over
    assert figures.main(["--run", str(ran), "--check", str(readme)]) == 1


def test_a_run_records_its_stage_times_and_sizes(ran):
    record = json.loads((sub(ran) / "run.json").read_text())
    assert record["command"] == ["make_submission.py", *fast("data/small", "--quiet")]
    test = DataLayout.of(ran / "data" / "small").test_split
    assert record["splits"]["test"] == {"probes": len(test.probes), "gallery": len(test.gallery)}
    assert record["cores"] >= 1
    assert [name for name, _ in record["stages"]] == ["score and choose", "submission and report"]
    assert record["zip"] == f"{record['choice']}.zip" and (sub(ran) / record["zip"]).is_file()


# ---- 7. the smaller frictions ----------------------------------------------------------------------------------------
def test_help_gives_each_default_once():
    from kinret.submission.make import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: named after the choice)" in text
    assert "named after the choice) (default" not in text and "(default: z)" in text


def test_the_variant_table_names_its_real_probe_count(ran):
    ensemble = ran / "ensemble" / dataset_name(ran / "data" / "small")
    text = (ensemble / "variants.md").read_text()
    per_probe = __import__("pandas").read_csv(ensemble / "per_probe.csv.gz")
    oof = per_probe[per_probe["group"] == "oof"].drop_duplicates(["split", "probe"])
    assert f"{len(oof)} probes scored here, intervals about ±" in text and "~190" not in text


def test_the_blend_decision_is_said_once_and_never_as_lost_0_000(ran, monkeypatch, capsys):
    import numpy as np

    from kinret.ensemble.selection import Scorer, select
    from kinret.submission.make import main

    rng = np.random.default_rng(0)
    fids = [f"F{i}" for i in range(8)]
    scorers = {f"oof{k}": Scorer(fids, fids * 3) for k in range(2)}
    same = {k: rng.normal(size=(8, 24)).astype(np.float32) for k in scorers}
    sel = select({"a": same, "b": same}, scorers, "auto", n_boot=200)  # a blend of equals gains exactly nothing
    assert "did as well as the best single variant" in sel.reason
    assert "0.000 against" not in sel.reason and "+0.000" not in sel.reason.split("interval")[0]
    monkeypatch.chdir(ran)
    assert main(fast("data/small", "--out", "sub_once")) == 0
    captured = capsys.readouterr()
    reason = json.loads((ran / "sub_once" / "selection.json").read_text())["reason"]
    assert (captured.out + captured.err).count(reason) == 1


def test_an_earlier_zip_is_moved_aside_and_said(ran, monkeypatch, capsys):
    from kinret.submission.make import main

    monkeypatch.chdir(ran)
    assert main(fast("data/small", "--out", "sub_zips", "--choose", "best", "--quiet")) == 0
    first = json.loads((ran / "sub_zips" / "run.json").read_text())["zip"]
    assert main(fast("data/small", "--out", "sub_zips", "--choose", "blend")) == 0
    second = json.loads((ran / "sub_zips" / "run.json").read_text())["zip"]
    assert first != second and [p.name for p in (ran / "sub_zips").glob("*.zip")] == [second]
    assert (ran / "sub_zips" / "old" / first).is_file()
    out = capsys.readouterr().out
    assert f"moved the earlier zip(s) {first} to sub_zips/old/: {second} is the one to upload" in out


def test_scoring_against_another_data_sets_truth_says_the_lists_do_not_match(ran, tmp_path, capsys):
    from kinret.evaluate import main

    truth = ran / "data" / "small" / "test_truth"
    other = tmp_path / "other_truth"
    other.mkdir()
    for name, keep in (("probe_list.csv", 4), ("gallery_list.csv", 60)):  # 3 probes, 59 gallery faces: another set
        lines = (truth / name).read_text().splitlines()[:keep]
        (other / name).write_text("\n".join(lines) + "\n")
    predictions = sub(ran) / "predictions.csv"
    assert main(["--predictions", str(predictions), "--probes", str(other / "probe_list.csv"),
                 "--gallery", str(other / "gallery_list.csv")]) == 2
    err = capsys.readouterr().err
    n = len(DataLayout.of(ran / "data" / "small").test_split.gallery)
    assert f"ranks {n} gallery faces for each of 4 probes, but the truth lists" in err
    assert "hold 3 probes and 59 gallery faces: the predictions and the lists are not of the same data set" in err
    assert "which is not a gallery index" not in err


def test_the_truth_line_says_what_the_truth_holds(ran, capsys):
    from kinret.data.check import main

    assert main(["check", str(ran / "data" / "small")]) == 0
    out = capsys.readouterr().out
    n = len(DataLayout.of(ran / "data" / "small").test_split.gallery)
    assert f"DATA/test_truth: family labels of 4 probes and {n} gallery faces, 4 families" in out


def test_the_score_histogram_says_what_its_axis_holds(ran, monkeypatch):
    from kinret.submission.make import make
    from kinret.submission.report import report_figures

    monkeypatch.chdir(ran)
    outcome = make(fast("data/small", "--out", "sub_axis", "--quiet", "--choose", "best"))
    figs, _ = report_figures(outcome.result)
    label = " ".join(figs["score_histogram.png"].axes[0].get_xlabel().split())
    assert label.startswith("score: cosine similarity of the embeddings, -1 to 1"), label


def test_progress_to_a_file_shows_a_line_while_a_slow_first_item_runs(monkeypatch, capsys):
    from kinret import log as klog

    monkeypatch.setattr(klog, "_on_screen", lambda: False)
    monkeypatch.setattr(klog, "FIRST_LINE", 0.2)
    monkeypatch.setenv("KINRET_PROGRESS_SECONDS", "60")
    monkeypatch.delenv("KINRET_NO_PROGRESS", raising=False)
    klog.setup_logging()

    def slow():
        time.sleep(1.0)  # one item that takes longer than the first line's delay
        yield 1
        yield 2

    seen = []
    for item in klog.progress(slow(), desc="features", total=2, unit="chunk"):
        seen.append((item, capsys.readouterr().err))
    assert "features: 0/2 chunk" in seen[0][1]  # said while the first item was still running
    assert list(klog.progress(range(3), desc="short", unit="it")) == [0, 1, 2]
    assert "short" not in capsys.readouterr().err  # a loop shorter than that stays silent
