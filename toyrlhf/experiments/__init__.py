"""Registry of experiments: one module per lecture claim.

An experiment is a module ``toyrlhf/experiments/<name>.py`` exposing

``NAME : str``
    Equal to the module name; used on the command line and for output file names.
``TITLE : str``
    One line shown by ``toyrlhf list``.
``Config``
    A frozen dataclass with a default for every field and a string literal (docstring)
    under each field, which becomes the ``--field`` help of ``toyrlhf run NAME``.  A
    classmethod ``Config.quick()`` returns a tiny configuration for tests and ``--quick``.
``run(config, progress=False) -> Result``
    Pure computation; ``Result`` is a frozen dataclass saveable with
    :func:`toyrlhf._io.save_result` (arrays, numbers, strings, nested dataclasses).
``figure(result) -> matplotlib.figure.Figure``
    Draws the result by calling ``plot_*(result, ax)`` functions on axes from
    :func:`toyrlhf.plotting.new_figure`.

To register one, add its module name to :data:`MODULES`.  Modules are imported lazily with
:func:`importlib.import_module` when first asked for, so ``import toyrlhf.experiments`` is cheap.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
from types import ModuleType

__all__ = ["MODULES", "names", "get", "all_experiments", "field_docs"]

#: Registered experiment modules (names inside this package), in the order they are listed.
MODULES: tuple[str, ...] = (
    "partial_coverage",
    "loss_shapes",
    "nash_cyclic",
    "process_outcome",
    "pareto",
    "gen_verif_gap",
    "isomorphic",
    "fkl_rkl",
    "likelihood_displacement",
    "overoptimisation",
    "pg_variance",
    "kl_estimators",
    "offline_overoptimisation",
    "offline_online",
    "online_vs_offline",
)


def names() -> tuple[str, ...]:
    """Names of the registered experiments, in listing order."""
    return tuple(MODULES)


def _check(module: ModuleType, name: str) -> ModuleType:
    problems = []
    if getattr(module, "NAME", None) != name:
        problems.append(f"NAME must be {name!r}, got {getattr(module, 'NAME', None)!r}")
    if not isinstance(getattr(module, "TITLE", None), str):
        problems.append("TITLE must be a str")
    config = getattr(module, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        problems.append("Config must be a dataclass")
    elif not callable(getattr(config, "quick", None)):
        problems.append("Config.quick() is missing")
    for fn in ("run", "figure"):
        if not callable(getattr(module, fn, None)):
            problems.append(f"{fn}() is missing")
    if problems:
        raise TypeError(f"experiment module {module.__name__} is malformed: "
                        + "; ".join(problems))
    return module


def get(name: str) -> ModuleType:
    """Import and return the experiment module called ``name``.

    Raises
    ------
    KeyError
        If ``name`` is not registered; the message lists the known names.
    TypeError
        If the module does not follow the experiment protocol.
    """
    if name not in MODULES:
        known = ", ".join(MODULES) or "(none registered)"
        raise KeyError(f"unknown experiment {name!r}; known experiments: {known}")
    return _check(importlib.import_module(f"{__name__}.{name}"), name)


def all_experiments() -> dict[str, ModuleType]:
    """All registered experiment modules, imported, keyed by name in listing order."""
    return {name: get(name) for name in MODULES}


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields: the string literal right under each field.

    Read from the module's source with :mod:`ast` (nothing is evaluated).  Fields without a
    docstring, or classes whose source is unavailable, are simply absent.

    Examples
    --------
    In a module file (classes typed at a prompt have no source to read)::

        @dataclasses.dataclass(frozen=True)
        class Config:
            beta: float = 0.1
            '''KL coefficient.'''

    ``field_docs(Config)`` returns ``{"beta": "KL coefficient."}``.
    """
    try:
        source = inspect.getsource(inspect.getmodule(cls))
    except (OSError, TypeError):
        return {}
    nodes: list[ast.stmt] = ast.parse(source).body
    node: ast.ClassDef | None = None
    for part in cls.__qualname__.split("."):
        node = next((n for n in nodes if isinstance(n, ast.ClassDef) and n.name == part), None)
        if node is None:
            return {}
        nodes = node.body
    docs = {}
    for stmt, nxt in itertools.pairwise(nodes):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
