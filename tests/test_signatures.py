"""No function in ``medseg/`` or ``pipelines/`` takes more than :data:`MAX_PARAMETERS` named parameters.

A long parameter list is usually a group of settings that wants a name: a frozen dataclass (``SeriesFaults``,
``SegOptions``, ``SlidingWindow``, ...) that is validated once, documented once and passed on whole.
Counted: positional and keyword parameters; not counted: a method's ``self`` / ``cls``, ``*args`` and
``**kwargs``. Exempt: ``__init__`` of a ``@dataclass`` (one parameter per field is the point of a dataclass)
and Typer commands, whose parameters *are* the command line's options (``pipelines/`` functions named
``*_command`` and the ``@app.command`` functions of ``pipelines/cli.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMETERS = 8

#: Files not checked (yet), each with its reason.
KNOWN_EXCEPTIONS = {}

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _decorators(node: Function | ast.ClassDef) -> set[str]:
    """Dotted names of the decorators: ``@dataclasses.dataclass(frozen=True)`` → ``dataclasses.dataclass``."""
    return {ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list}


def count_parameters(node: Function, method: bool) -> int:
    """Named parameters of ``node`` (positional-only, ordinary, keyword-only), less a method's self / cls."""
    named = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
    if method and named and named[0].arg in ("self", "cls"):
        named = named[1:]
    return len(named)


def _exempt(node: Function, owner: ast.ClassDef | None, relative: str) -> bool:
    if owner is not None and node.name == "__init__":
        return bool(_decorators(owner) & {"dataclass", "dataclasses.dataclass"})
    if owner is None and relative.startswith("pipelines/"):
        return node.name.endswith("_command") or (
            relative == "pipelines/cli.py" and any(d.endswith(".command") for d in _decorators(node))
        )
    return False


def offenders(tree: ast.Module, relative: str) -> list[str]:
    """``file:line name (n parameters)`` for every function of the module over the limit, nested ones too."""
    found = []

    def visit(node: ast.AST, owner: ast.ClassDef | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = count_parameters(child, method=owner is not None)
                if n > MAX_PARAMETERS and not _exempt(child, owner, relative):
                    name = child.name if owner is None else f"{owner.name}.{child.name}"
                    found.append(f"{relative}:{child.lineno} {name} ({n} parameters)")
                visit(child, None)

    visit(tree, None)
    return found


def test_no_function_takes_more_than_eight_parameters():
    found = []
    for path in sorted([*(ROOT / "medseg").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative not in KNOWN_EXCEPTIONS:
            found += offenders(ast.parse(path.read_text(), filename=relative), relative)
    assert not found, (
        f"functions with more than {MAX_PARAMETERS} parameters (group related ones in a frozen dataclass):\n"
        + "\n".join(found)
    )


PROBE = """
from dataclasses import dataclass

def nine(a, b, c, d, e, f, g, h, i): ...
def eight_and_stars(a, b, c, d, /, e, f, *args, g, h, **kwargs): ...
def outer():
    def inner(a, b, c, d, e, f, g, h, i): ...

class Plain:
    def __init__(self, a, b, c, d, e, f, g, h): ...
    def method(self, a, b, c, d, e, f, g, h, i): ...

@dataclass(frozen=True)
class Data:
    def __init__(self, a, b, c, d, e, f, g, h, i): ...

def train_command(a, b, c, d, e, f, g, h, i): ...

@app.command("x")
def x(a, b, c, d, e, f, g, h, i): ...
"""


def test_the_check_counts_what_it_says():
    """self, *args and **kwargs are free; a dataclass ``__init__`` is exempt, a plain method is not; Typer
    commands are exempt only in pipelines/ (``@app.command`` only in cli.py)."""
    tree = ast.parse(PROBE)
    assert [line.split(" ", 1)[1] for line in offenders(tree, "medseg/probe.py")] == [
        "nine (9 parameters)",
        "inner (9 parameters)",
        "Plain.method (9 parameters)",
        "train_command (9 parameters)",
        "x (9 parameters)",
    ]
    assert len(offenders(tree, "pipelines/probe.py")) == 4  # train_command exempt
    assert len(offenders(tree, "pipelines/cli.py")) == 3  # and the @app.command
