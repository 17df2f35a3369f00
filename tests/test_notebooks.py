"""The notebooks run top to bottom, headless, on the embedded default, in a scratch folder; the committed copies
hold their outputs, small plots, and no path of the machine they ran on."""

from __future__ import annotations

import importlib.util
import json
import re

import nbformat
import pytest
from conftest import REPO

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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_top_to_bottom_on_the_default(path, workdir, capsys):
    nb, seconds = nb_execute.execute(path, workdir)
    with capsys.disabled():
        print(f"\n{path.name}: {seconds:.0f} s")  # printed, never asserted: the machine may be busy
    sizes = nb_execute.image_sizes(nb)
    assert sizes and max(sizes) < nb_execute.PLOT_LIMIT
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if path.name.startswith("01"):
        assert (workdir / "data" / "synthetic" / "test_truth" / "probe_list.csv").is_file()
        assert "oracle" in text and len(sizes) == 2
    if path.name.startswith("02"):
        summary = (workdir / "runs" / "quick" / "fold0" / "summary.csv").read_text().splitlines()
        assert len(summary) == 1 + 1 + 4 and "1000 kin pairs" in text  # header, epoch 0, 4 epochs
    if path.name.startswith("03"):
        out = workdir / "submissions" / "notebook"
        drawn = sorted(p.name for p in (out / "report").iterdir() if not p.name.startswith("."))
        assert drawn == ["cmc.png", "retrieval_grid.png", "score_histogram.png", "variants.md"]
        assert len(list(out.glob("*.zip"))) == 1 and "Average = (mAP + Rank@5) / 2" in text
        assert not (workdir / "submissions" / "predictions.csv").exists(), "the default run's outputs are kept"
