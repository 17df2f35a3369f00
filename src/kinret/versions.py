"""The version of the code behind a cached thing, for its cache key: a hash of the source of the modules that compute
it, so a cache made by other code is never reused and nobody has to remember to bump a counter.

The hash is of each module's syntax tree without its docstrings (`ast.dump`), so comments, docstrings and formatting
leave caches valid while any change of what the code does invalidates them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path


def _source_files(module: str) -> list[tuple[str, Path]]:
    """(name, file) of a module, or of every module of a package (sorted), from its import spec."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(module)
    if spec.submodule_search_locations:
        files = []
        for location in spec.submodule_search_locations:
            root = Path(location)
            files += [(f"{module}/{p.relative_to(root).as_posix()}", p) for p in sorted(root.rglob("*.py"))]
        return files
    return [(module, Path(spec.origin))]


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    tree = _without_docstrings(ast.parse(path.read_bytes(), filename=str(path)))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


@functools.cache
def code_version(*modules: str) -> str:
    """A 12-hex-digit hash of what the modules (or packages) `modules` do; e.g.
    ``code_version("kinret.features", "kinret.models")`` changes when any of their code does."""
    h = hashlib.sha256()
    for module in modules:
        for name, path in _source_files(module):
            st = path.stat()
            h.update(f"{name}\0{_file_digest(path, st.st_mtime_ns, st.st_size)}\n".encode())
    return h.hexdigest()[:12]
