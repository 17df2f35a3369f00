"""The package's layout: every kinret import (lazy ones inside functions included) runs from a stage to itself or
to a stage before it in the data flow, the module graph has no circle, and no module outgrows one screenful of
responsibility (400 lines, 60-line functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "src" / "kinret"
# the order of the stages; a module may import its own stage and the ones before it
STAGES = ["base", "data", "models", "features", "scoring", "train", "ensemble", "submission", "commands"]
BASE = {"kinret", "kinret.errors", "kinret.io", "kinret.readback", "kinret.log", "kinret.cli", "kinret.dist",
        "kinret.metrics", "kinret.plots", "kinret.versions"}
COMMANDS = {"kinret.evaluate", "kinret.protocol", "kinret.synth", "kinret.grid"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    if module in BASE:
        return "base"
    if module in COMMANDS:
        return "commands"
    sub = module.split(".")[1]
    if sub not in STAGES:
        raise AssertionError(f"{module} belongs to no stage: add it to STAGES, BASE or COMMANDS in this test")
    return sub


def kinret_imports(path: Path, modules: set[str]) -> set[str]:
    """The kinret modules `path` imports anywhere in its body (relative imports resolved; `from a import b` counts
    as a.b when a.b is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kinret"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "kinret":
                continue
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            found |= subs if subs and len(subs) == len(node.names) else {base} | subs
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if "experiments" not in p.parts or
             p.name == "__init__.py"}
    return {m: kinret_imports(p, set(files)) - {m} for m, p in files.items()}


def test_every_import_runs_downward(graph):
    upward = []
    for module, imports in graph.items():
        for imported in imports:
            if STAGES.index(stage(imported)) > STAGES.index(stage(module)):
                upward.append(f"{module} ({stage(module)}) imports {imported} ({stage(imported)})")
    assert not upward, "imports against the data flow:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_stage_rule_would_catch_an_upward_import(tmp_path):
    assert STAGES.index(stage("kinret.submission.make")) > STAGES.index(stage("kinret.data.fiw"))
    assert stage("kinret.metrics") == "base" and stage("kinret.grid") == "commands"


def test_modules_and_functions_stay_small():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "split these:\n" + "\n".join(sorted(too_long))


def test_every_subpackage_says_what_it_holds_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        if init.parent.name == "__pycache__":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init.relative_to(PACKAGE)} has no docstring"
        if init.parent.name != "experiments":
            assert "May import" in doc, f"{init.relative_to(PACKAGE)} does not say what it may import"


# ---- dependencies declared where pip reads them -------------------------------------------------------------------
DISTRIBUTION = {"PIL": "pillow", "cv2": "opencv-python-headless", "sklearn": "scikit-learn"}  # import -> distribution


def _third_party_imports() -> set[str]:
    stdlib = set(__import__("sys").stdlib_module_names)
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {DISTRIBUTION.get(n, n) for n in names if n not in stdlib and n not in ("kinret", "__future__")}


def _requirement_names(lines: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~ \[]", ln.strip())[0].lower() for ln in lines if ln.strip() and ln.strip()[0].isalpha()}


def test_every_imported_distribution_is_declared_and_pinned():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    pinned = _requirement_names((REPO / "requirements.txt").read_text().splitlines())
    imported = _third_party_imports()
    assert imported <= declared, f"imported but not in pyproject.toml: {sorted(imported - declared)}"
    assert declared <= pinned, f"declared but not pinned in requirements.txt: {sorted(declared - pinned)}"
    readme = (REPO / "README.md").read_text()
    version = project["requires-python"].removeprefix(">=")
    assert f"Python {version}" in readme, f"README and requires-python ({version}) disagree"
