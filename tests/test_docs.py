"""The architecture page and the docstrings stay true to the code: docs/architecture.md names every module, and
the code in docstrings (examples, literal blocks, `inline code`) names only things that exist."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ddpm_faces"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def module_files() -> list[str]:
    """Every module file of the package by its path under src/ddpm_faces (pipeline/edit.py), packages' __init__
    and __main__ left out."""
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                  if p.name not in ("__init__.py", "__main__.py"))


def unmentioned(page: str, files: list[str]) -> list[str]:
    """The files whose path does not appear in `page` as a whole path (io.py is not mentioned by audio.py, nor
    config.py by data/config.py)."""
    return [f for f in files if not re.search(rf"(?<![\w/.-]){re.escape(f)}(?!\w)", page)]


def test_the_architecture_page_names_every_module():
    missing = unmentioned(ARCHITECTURE.read_text(encoding="utf-8"), module_files())
    assert not missing, f"docs/architecture.md does not mention: {', '.join(missing)}"


def test_a_module_is_mentioned_only_by_its_whole_path():
    page = "`pipeline/edit.py` edits; see also data/io.py and sampling.py"
    assert unmentioned(page, ["pipeline/edit.py", "io.py", "pipeline/generate.py", "data/io.py", "ing.py"]) == [
        "io.py", "pipeline/generate.py", "ing.py"]


# ---------------------------------------------------------------------------------------------------------------
# Docstring code. What counts as code: doctest lines (>>> and ...), indented lines (examples, literal blocks after
# "::") and inline `code` spans. What is checked there, chosen to give no false alarms on prose or maths:
#   - `from ddpm_faces... import a, b` and `import ddpm_faces...`: the module imports and has those names;
#   - every dotted name that starts with ddpm_faces: it exists;
#   - a call head.name(...) whose head is a module or a class, either the module's own global or a name the
#     example imported: the attribute exists. Other heads (codec.encode(x) where codec is a variable) are left.
# ---------------------------------------------------------------------------------------------------------------
SPAN = re.compile(r"``(.+?)``|`([^`\n]+)`")
FROM_IMPORT = re.compile(r"^from\s+(ddpm_faces[\w.]*)\s+import\s+\(?([\w\s,]+?)\)?\s*(?:#.*)?$")
IMPORT = re.compile(r"^import\s+(ddpm_faces[\w.]*)(?:\s+as\s+(\w+))?\s*(?:#.*)?$")
DOTTED = re.compile(r"(?<![\w.])([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)(\s*\()?")
MISSING = object()


def docstrings(source: str) -> Iterator[str]:
    """Every docstring in `source`, its lines taken back to the indentation of the code around it, so that an
    indented line is one indented in the docstring (even where every line after the first is)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines = first.value.value.expandtabs().splitlines() or [""]
                margin = " " * first.col_offset
                yield "\n".join([lines[0]] + [line.removeprefix(margin) for line in lines[1:]])


def code_fragments(doc: str) -> Iterator[str]:
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith((">>> ", "... ")):
            yield stripped[4:]
        elif line[:1].isspace():
            yield stripped
    for match in SPAN.finditer(doc):
        yield match.group(1) or match.group(2)


def resolve_dotted(name: str):
    """The object a dotted name starting with a module names (importing as far as needed), or MISSING."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        if parts[cut - 1] == "__main__":                    # importing it would run the command line
            continue
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, MISSING)
            if obj is MISSING:
                return MISSING
        return obj
    return MISSING


def stale_names(source: str, namespace: Callable[[], dict]) -> list[str]:
    """The names that the docstrings' code in `source` uses and that do not exist. `namespace()` gives the
    module's globals; it is called only when a call's head needs them (so most modules are not imported)."""
    stale, globals_ = set(), None
    for doc in docstrings(source):
        imported: dict[str, object] = {}                    # what this docstring's examples import
        fragments = list(code_fragments(doc))
        for fragment in fragments:
            if match := FROM_IMPORT.match(fragment):
                module = match.group(1)
                for item in match.group(2).split(","):
                    name, _, alias = item.strip().partition(" as ")
                    if name:
                        obj = resolve_dotted(f"{module}.{name}")
                        if obj is MISSING:
                            stale.add(f"{module}.{name}")
                        imported[(alias or name).strip()] = obj
            elif match := IMPORT.match(fragment):
                if resolve_dotted(match.group(1)) is MISSING:
                    stale.add(match.group(1))
        for fragment in fragments:
            if FROM_IMPORT.match(fragment) or IMPORT.match(fragment):
                continue
            for match in DOTTED.finditer(fragment):
                head, rest, called = match.group(1), match.group(2), match.group(3)
                if head == "ddpm_faces":
                    if resolve_dotted(head + rest) is MISSING:
                        stale.add(head + rest)
                    continue
                if not called:
                    continue
                if head in imported:
                    obj = imported[head]
                else:
                    globals_ = namespace() if globals_ is None else globals_
                    obj = globals_.get(head, MISSING)
                if obj is MISSING or not isinstance(obj, (types.ModuleType, type)):
                    continue
                for attr in rest.lstrip(".").split("."):
                    obj = getattr(obj, attr, MISSING)
                    if obj is MISSING:
                        stale.add(head + rest)
                        break
    return sorted(stale)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("path", sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                                        if p.name != "__main__.py"))
def test_docstring_code_names_only_what_exists(path):
    file = PACKAGE / path
    stale = stale_names(file.read_text(encoding="utf-8"), lambda: vars(importlib.import_module(module_name(file))))
    assert not stale, f"{path}: docstrings use names that do not exist: {', '.join(stale)}"


FAKE = '''
"""A module whose docstrings hold good and stale code.

    from ddpm_faces.diffusion import sample_ddim, sample_nothing
    from ddpm_faces.pipeline import SamplingRequest as Request
    x = torch.zeros(3)
    y = torch.no_such_function(x)
    Request(num=2).replace(num=3)
    Request.no_such_method()
    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))
"""
import torch


def f():
    """Prose may say codec.encode(x) or run.finish() of variables, and a call k(x_i, x_j) in maths; the code
    `x0 = codec.encode(images)` too. Inline code is checked: `ddpm_faces.runs.find_model`,
    `ddpm_faces.runs.find_modle`, ``torch.nn.functional.interpolate(x)``, `torch.nn.functionl.pad(x)`.

    >>> import ddpm_faces.no_such_module
    >>> torch.linspace(0, 1, 5).no_such_tensor_method()
    """
'''


def fake_module() -> types.ModuleType:
    module = types.ModuleType("fake")
    exec(compile(FAKE, "fake.py", "exec"), module.__dict__)
    return module


def test_the_docstring_check_finds_stale_names_and_only_those():
    module = fake_module()
    assert stale_names(FAKE, lambda: vars(module)) == [
        "Request.no_such_method", "ddpm_faces.diffusion.sample_nothing", "ddpm_faces.no_such_module",
        "ddpm_faces.runs.find_modle", "torch.nn.functionl.pad", "torch.no_such_function"]


def test_the_docstring_check_passes_a_module_whose_code_exists():
    good = '"""Good.\n\n    from ddpm_faces.diffusion import sample_ddim\n    torch.zeros(3)\n"""\nimport torch\n'
    loaded: list = []
    assert stale_names(good, lambda: loaded.append(1) or {"torch": __import__("torch")}) == []
    assert loaded == [1]                                    # the module's globals were consulted for torch.zeros
    assert stale_names('"""Only prose: see codec.encode(x)."""', lambda: loaded.append(2) or {}) == []
