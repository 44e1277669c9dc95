"""Errors carry facts and the edges word them: no message below the command line names a flag, every remedy the
library names is worded by the command line, and an edge words it with the error's facts."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from ddpm_faces import errors
from ddpm_faces.cli import FIXES as CLI_FIXES
from ddpm_faces.errors import NoFace, RunError, UserError

PACKAGE = Path(errors.__file__).parent
EDGES = ("cli.py", "app/")                      # where flags and buttons may be named
FLAG = re.compile(r"(?:^|[\s(`'\"])--(?!no-deps\b|force-reinstall\b)[a-z][a-z-]*")   # pip's own flags aside


def raised_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """The string pieces of every `raise X(...)` and `return X(...)` of an *Error class, with their lines."""
    found = []
    for node in ast.walk(tree):
        call = getattr(node, "exc", None) if isinstance(node, ast.Raise) else \
            node.value if isinstance(node, ast.Return) else None
        if not isinstance(call, ast.Call) or not getattr(call.func, "id", "").endswith("Error"):
            continue
        for arg in call.args:
            for piece in ast.walk(arg):
                if isinstance(piece, ast.Constant) and isinstance(piece.value, str):
                    found.append((piece.lineno, piece.value))
    return found


def test_no_library_error_names_a_command_line_flag():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name.startswith(EDGES):
            continue
        for line, text in raised_strings(ast.parse(path.read_text())):
            if FLAG.search(text):
                offenders.append(f"{name}:{line}: {text!r}")
    assert not offenders, "\n".join(offenders)


def test_the_flag_check_finds_a_flag_in_a_raised_message():
    tree = ast.parse('def f():\n    raise UserError(f"run {x} is done: pass --resume")\n')
    assert any(FLAG.search(text) for _, text in raised_strings(tree))
    assert not any(FLAG.search(text) for _, text in raised_strings(ast.parse('raise UserError("a-b --")\n')))


def test_every_remedy_the_library_names_is_worded_by_the_command_line():
    remedies = {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)}
    assert remedies == set(CLI_FIXES), remedies ^ set(CLI_FIXES)


def test_an_edge_words_the_fix_with_the_facts_and_the_message_stands_alone():
    err = RunError("run 'tiny' has nothing left to train", fix=errors.RUN_LONGER, run_dir="runs/tiny", steps=8)
    assert str(err) == "run 'tiny' has nothing left to train"
    assert err.worded(CLI_FIXES) == ("run 'tiny' has nothing left to train; to train further raise it: "
                                     "ddpm-faces train --config runs/tiny --resume --set train.max_steps=8")
    assert err.worded({}) == str(err)                       # an edge without a wording adds nothing
    face = NoFace("no face found in the photo", fix=errors.CENTRE_SQUARE)
    assert isinstance(face, UserError) and face.worded(CLI_FIXES).endswith("--no-detect to take its centre square "
                                                                          "as it is")
    assert UserError("a\nb", fix=None).worded(CLI_FIXES) == "a\\nb"      # still one line


def test_the_web_page_words_its_own_fixes_without_flags():
    from ddpm_faces.app.page import FIXES as PAGE_FIXES

    assert set(PAGE_FIXES) <= set(CLI_FIXES)
    assert not any(FLAG.search(text) for text in PAGE_FIXES.values())
