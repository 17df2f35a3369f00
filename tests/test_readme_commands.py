"""The README cannot drift from the code: its set-up commands are the ones CI runs, the blocks marked
`<!-- runnable -->` run as written (in order, in one shell, in a scratch folder), and every option any other
command line of the README passes to a kinret entry point exists."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from kinret.data.workspace import dataset_name
from kinret.train.experiments import load_experiment

README = (REPO / "README.md").read_text()
FENCE = re.compile(r"(<!-- runnable -->\n)?```(bash|python)\n(.*?)```", flags=re.S)


def blocks(runnable: bool | None = None) -> list[tuple[str, str]]:
    """(language, body) of the README's bash/python blocks; `runnable` True/False keeps the marked/unmarked."""
    return [(lang, body) for mark, lang, body in FENCE.findall(README) if runnable is None or bool(mark) == runnable]


def bash_blocks() -> list[str]:
    return [body for lang, body in blocks() if lang == "bash"]


def test_ci_runs_the_readme_test_command_as_written():
    skip = ("#", "set ", "cd ", "export ")
    ci_lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(skip)]
    assert len(ci_lines) == 1
    assert ci_lines[0] in [b.strip() for b in bash_blocks()]
    assert "pytest" in ci_lines[0]


def test_readme_main_command_runs_make_submission():
    assert any(b.strip().endswith("python make_submission.py") and "requirements.txt" in b for b in bash_blocks())


# ---- every kinret command line of the README, runnable or not, uses options that exist ----------------------------
ENTRY = {"make_submission.py": "kinret.submission.make", "ensemble/choose.py": "kinret.ensemble.cli",
         "kinret.ensemble": "kinret.ensemble.cli", "kinret.train": "kinret.train.cli",
         "kinret.data": "kinret.data.check"}


def command_lines() -> list[list[str]]:
    """The README's kinret command lines as argument lists: [entry module, arg, ...]."""
    out = []
    for body in bash_blocks():
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            for i, w in enumerate(words):
                target = words[i + 1] if w == "-m" and i + 1 < len(words) else w
                if target.startswith("kinret.") or target in ENTRY:
                    start = i + 2 if w == "-m" else i + 1
                    out.append([ENTRY.get(target, target), *words[start:]])
                    break
    return out


def test_readme_mentions_every_entry_point():
    used = {cmd[0] for cmd in command_lines()}
    assert {"kinret.submission.make", "kinret.ensemble.cli", "kinret.train.cli", "kinret.grid", "kinret.evaluate",
            "kinret.protocol", "kinret.synth", "kinret.data.check"} <= used


@pytest.mark.parametrize("cmd", command_lines(), ids=lambda c: " ".join(c)[:60])
def test_readme_command_options_exist(cmd):
    module = __import__(cmd[0], fromlist=["main"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        module.main(["--help"])
    if "-C" in cmd:
        load_experiment(cmd[cmd.index("-C") + 1])  # an experiment the README names exists
    for word in cmd[1:]:
        if word.startswith("--"):
            assert re.search(rf"{re.escape(word.split('=')[0])}\b", buf.getvalue()), \
                f"README passes {word} to {cmd[0]}, whose --help does not list it"


# ---- the runnable blocks run ------------------------------------------------------------------------------------
def script() -> str:
    parts = ["set -euo pipefail"]
    for lang, body in blocks(runnable=True):
        parts.append(body if lang == "bash" else f"python - <<'PYTHON'\n{body}PYTHON")
    return "\n".join(parts) + "\n"


def test_runnable_blocks_are_marked():
    runnable = blocks(runnable=True)
    assert len(runnable) >= 10 and any(lang == "python" for lang, _ in runnable)
    assert "make_submission.py" in script() and "torchrun" in script()


@pytest.mark.slow
def test_readme_runnable_blocks_run_as_written(tmp_path):
    (tmp_path / "make_submission.py").symlink_to(REPO / "make_submission.py")
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / "choose.py").symlink_to(REPO / "ensemble" / "choose.py")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "KINRET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-c", script()], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"a README block failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    small, small2 = (dataset_name(tmp_path / "data" / name) for name in ("small", "small2"))
    assert (tmp_path / "submissions" / small / "report" / "retrieval_grid.png").is_file()
    assert '"mAP"' in proc.stdout and "my_features:cos-emb-meanemb" in proc.stdout
    assert (tmp_path / "data" / "small" / "val_codalab" / "probe.txt").is_file()
    assert (tmp_path / "runs_ddp" / "tiny" / "fold0" / "summary.csv").is_file()
    # the second data set's work sits beside the first's, and going back to the first finds it all built
    for part in ("runs", "submissions"):
        assert {p.name for p in (tmp_path / part).iterdir() if p.is_dir()} >= {small, small2}
    assert (tmp_path / "submissions" / small2 / "predictions.csv").is_file()
    assert "estimate: nothing to build" in proc.stdout


def test_the_data_folder_is_spelled_one_way():
    """`$DATA` (set once with DATA=...) wherever a command takes the data folder, never a literal `DATA`."""
    literal = re.findall(r"(?:--data-root|data_root=|kinret\.data check)\s*(DATA\b[^\n]*)", README)
    assert literal == [], literal
    assert "DATA=" in README
