"""The notebooks run top to bottom, headless, in a scratch folder, on a small synthetic set with a seconds-long
experiment (`notebooks/execute.py --small`: the same cells, other sizes); the committed copies hold the outputs of
a full run on the embedded default, small plots, and no path of the machine they ran on."""

from __future__ import annotations

import importlib.util
import json
import re

import nbformat
import pytest
from conftest import REPO

from kinret.data.synth import SynthConfig
from kinret.train.experiments import load_experiment

spec = importlib.util.spec_from_file_location("nb_execute", REPO / "notebooks" / "execute.py")
nb_execute = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nb_execute)

NOTEBOOKS = nb_execute.notebooks()
NAMES = [p.name for p in NOTEBOOKS]
ABSOLUTE = re.compile(r"(?<![\w.])(/home/|/work/|/tmp/|/Users/|[A-Z]:\\\\)")


def test_the_three_notebooks_are_there():
    assert NAMES == ["01_data_and_protocol.ipynb", "02_training.ipynb", "03_scores_ensemble_submission.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_notebook_has_small_outputs_and_no_machine_paths(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs is not None for c in code)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom, then commit"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    sizes = nb_execute.image_sizes(nb)
    assert sizes and max(sizes) < nb_execute.PLOT_LIMIT
    for c in code:
        assert not ABSOLUTE.search(c.source), f"absolute path in {path.name}: {c.source[:200]}"
        assert not ABSOLUTE.search(json.dumps([o.get("text", "") for o in c.outputs]))
        assert "import kinret" in c.source or "from kinret" in c.source or "def " not in c.source, \
            "notebooks call the package; they do not define its code"
    assert path.stat().st_size < 600 * 1024


def output_text(nb: nbformat.NotebookNode) -> str:
    """Every printed and displayed text of the notebook's code cells (streams, plain text, markdown)."""
    return "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") + o.get("data", {}).get(
        "text/markdown", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def families_row(synth: SynthConfig) -> str:
    """Notebook 1's row of family counts (train, val) for data made from `synth`."""
    return f"| families | {synth.n_train} | {synth.n_val} |"


def small_table_row() -> str:
    return families_row(SynthConfig(**json.loads(nb_execute.SMALL["KINRET_SYNTH"])))


def test_the_committed_outputs_are_a_full_run():
    """`--small` is for checks only, never saved: the committed outputs show `quick` and the default data."""
    text = {p.name: output_text(nbformat.read(p, as_version=4)) for p in NOTEBOOKS}
    assert "name = 'quick'" in text["02_training.ipynb"] and families_row(SynthConfig()) in text[NAMES[0]]
    assert not [name for name, t in text.items() if nb_execute.SMALL["KINRET_NOTEBOOK_EXPERIMENT"] in t]
    assert small_table_row() not in text[NAMES[0]]
    with pytest.raises(SystemExit):
        nb_execute.main(["--small", NAMES[0]])  # refused before anything runs: a small run is never saved


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_top_to_bottom(path, workdir, capsys):
    nb, seconds = nb_execute.execute(path, workdir, env=nb_execute.SMALL)
    with capsys.disabled():
        print(f"\n{path.name}: {seconds:.0f} s")  # printed, never asserted: the machine may be busy
    sizes = nb_execute.image_sizes(nb)
    assert sizes and max(sizes) < nb_execute.PLOT_LIMIT
    text = output_text(nb)
    if path.name.startswith("01"):
        assert (workdir / "data" / "synthetic" / "test_truth" / "probe_list.csv").is_file()
        assert "oracle" in text and len(sizes) == 2 and small_table_row() in text  # the small set was used
    cfg = load_experiment(nb_execute.SMALL["KINRET_NOTEBOOK_EXPERIMENT"])[0]
    if path.name.startswith("02"):
        found = sorted((workdir / "runs").glob(f"synthetic-*/{cfg.name}/fold0/summary.csv"))  # the small set's own
        assert len(found) == 1, "notebook 2 trains into runs/{data set}/"
        summary = found[0].read_text().splitlines()
        assert len(summary) == 1 + 1 + cfg.epochs and f"{cfg.eval_pairs} kin pairs" in text  # header, epoch 0
        assert f"name = '{cfg.name}'" in text
    if path.name.startswith("03"):
        out = workdir / "submissions" / "notebook"
        drawn = sorted(p.name for p in (out / "report").iterdir() if not p.name.startswith("."))
        assert drawn == ["cmc.png", "retrieval_grid.png", "score_histogram.png", "variants.md"]
        assert len(list(out.glob("*.zip"))) == 1 and "Average = (mAP + Rank@5) / 2" in text
        assert f"--experiments {cfg.name} " in text
        written = [p.parent.name for p in (workdir / "submissions").glob("*/predictions.csv")]
        assert written == ["notebook"], "the default run's outputs are kept"
        assert len(list((workdir / "runs").glob(f"*/{cfg.name}"))) == 1, "one runs folder: notebook 2's fold reused"
