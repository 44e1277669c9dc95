"""The package's layers (docs/architecture.md): the import-linter contract in pyproject.toml holds, no module
imports another module's underscore names, and imports inside functions are either optional heavy
dependencies or the command line's own (it keeps `ddpm-faces --help` fast)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ddpm_faces"
LAZY_OK = {"cli.py"}                         # the command line imports each command's library when it runs


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def internal_imports(tree: ast.AST, path: Path):
    """(node, imported module name or '', names) for every import of ddpm_faces' own modules."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("ddpm_faces")):
            yield node, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ddpm_faces"):
                    module, _, name = alias.name.rpartition(".")
                    yield node, module, [name]


def test_the_layer_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is missing: pip install 'ddpm-faces[test]'")
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "0 broken" in out.stdout, out.stdout + out.stderr


def test_no_module_imports_another_modules_underscore_names():
    crossing = []
    for path in modules():
        tree = ast.parse(path.read_text())
        for node, module, names in internal_imports(tree, path):
            crossing += [f"{path.relative_to(PACKAGE)}:{node.lineno} {module}.{n}" for n in names
                         if n.startswith("_") and n != "__version__"]
    assert crossing == []


def test_imports_inside_functions_are_only_optional_dependencies_or_the_clis():
    lazy = []
    for path in modules():
        if path.name in LAZY_OK:
            continue
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for node, _, _ in
                         internal_imports(func, path)]
    assert lazy == []
