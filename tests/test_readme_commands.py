"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re

from conftest import REPO


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command_as_written():
    skip = ("#", "set ", "cd ", "export ")
    ci_lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(skip)]
    assert len(ci_lines) == 1
    assert ci_lines[0] in [b.strip() for b in bash_blocks()]
    assert "pytest" in ci_lines[0]


def test_readme_main_command_runs_make_submission():
    assert any(b.strip().endswith("python make_submission.py") and "requirements.txt" in b for b in bash_blocks())
