"""Command line: ``toyrlhf list``, ``toyrlhf figures [NAMES...]``, ``toyrlhf run NAME --field v``.

``figures`` runs each experiment's default ``Config()`` (or ``Config.quick()`` with ``--quick``),
saves the result to ``<results>/<name>.npz`` and the figure to ``<out>/<name>.png`` and
``.svg``, all atomically, and prints the time each took.  ``run`` does the same for one
experiment with fields of its ``Config`` overridden from options built from the dataclass;
their help is the field docstrings, read from the source with :mod:`ast`.

Backends: ``figures --backend numpy|cupy|array_api_strict`` sets the ``backend`` field of every
chosen experiment whose ``Config`` has one (the others run on NumPy, and say so);
``run NAME --backend ...`` is that field's own option.  Either way the backend is checked
before anything runs, and a missing library or GPU is reported as a usage error that names
the backend and what is missing (:func:`toyrlhf._backend.backend_namespace`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from . import __version__, experiments
from ._backend import BACKENDS, BackendUnavailableError, backend_namespace

__all__ = ["main", "build_parser", "config_parser", "with_backend"]

DEFAULT_OUT = Path("figures")


# ----------------------------------------------------------------------------- running
def produce(module: ModuleType, config: Any, out: Path, results: Path, progress: bool) -> float:
    """Run one experiment, save its result and figure, print and return the seconds taken."""
    import matplotlib

    matplotlib.use("Agg")
    from ._io import save_result
    from .plotting import save_figure, style

    name = module.NAME
    t0 = time.perf_counter()
    result = module.run(config, progress=progress)
    t1 = time.perf_counter()
    save_result(result, results / f"{name}.npz")
    with style():
        fig = module.figure(result)
        paths = save_figure(fig, out / name)
    t2 = time.perf_counter()
    print(f"{name:<28} {t2 - t0:8.2f} s  (run {t1 - t0:.2f} s, plot {t2 - t1:.2f} s)  "
          + "  ".join(str(p) for p in paths), flush=True)
    return t2 - t0


def _dirs(ns: argparse.Namespace) -> tuple[Path, Path]:
    out = Path(ns.out)
    return out, Path(ns.results) if ns.results is not None else out / "results"


def _cmd_list(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    mods = experiments.all_experiments()
    if not mods:
        print("no experiments registered")
    width = max((len(n) for n in mods), default=0)
    for name, mod in mods.items():
        print(f"{name:<{width}}  {mod.TITLE}")
    return 0


def _unknown(parser: argparse.ArgumentParser, bad: Sequence[str]) -> typing.NoReturn:
    known = ", ".join(experiments.names()) or "(none registered)"
    parser.error(f"unknown experiment(s): {', '.join(bad)}; known experiments: {known}")


def _check_backend(parser: argparse.ArgumentParser, name: str | None) -> None:
    """Fail early, as a usage error, when a backend's library or device is missing."""
    if name is None:
        return
    try:
        backend_namespace(name)
    except (BackendUnavailableError, ValueError) as exc:
        parser.error(str(exc))


def with_backend(config: Any, backend: str | None) -> tuple[Any, bool]:
    """``config`` with its ``backend`` field set, and whether it has one.

    ``backend=None`` keeps the config as it is.  A config without the field is returned
    unchanged (its experiment computes with NumPy).
    """
    if backend is None:
        return config, True
    if "backend" not in {f.name for f in dataclasses.fields(config)}:
        return config, False
    return dataclasses.replace(config, backend=backend), True


def _cmd_figures(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    chosen = list(ns.names) or list(experiments.names())
    bad = [n for n in chosen if n not in experiments.names()]
    if bad:
        _unknown(parser, bad)
    _check_backend(parser, ns.backend)
    out, results = _dirs(ns)
    total = 0.0
    for name in chosen:
        module = experiments.get(name)
        config = module.Config.quick() if ns.quick else module.Config()
        config, has = with_backend(config, ns.backend)
        if not has and ns.backend != "numpy":
            print(f"{name}: its Config has no backend field; it runs on NumPy", flush=True)
        total += produce(module, config, out, results, progress=not ns.no_progress)
    print(f"{len(chosen)} figure(s) in {total:.2f} s")
    return 0


def _cmd_run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if ns.name not in experiments.names():
        _unknown(parser, [ns.name])
    module = experiments.get(ns.name)
    sub, converters = config_parser(module)
    args = sub.parse_args(ns.args)
    overrides = {k: converters[k](v) for k, v in vars(args).items() if k in converters}
    base = module.Config.quick() if args.quick else module.Config()
    try:
        config = dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as exc:
        sub.error(str(exc))
    _check_backend(sub, getattr(config, "backend", None))
    out, results = _dirs(args)
    produce(module, config, out, results, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------- parsers
def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR",
                   help="directory for the PNG and SVG figures (default: %(default)s)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="directory for the saved results (default: OUT/results)")
    p.add_argument("--quick", action="store_true",
                   help="use Config.quick(), a tiny configuration, instead of Config()")
    p.add_argument("--no-progress", action="store_true", help="never show progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with sub-commands ``list``, ``figures`` and ``run``."""
    parser = argparse.ArgumentParser(
        prog="toyrlhf", description="Exact RLHF/DPO/PPO theory on small token trees.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the experiments (names and titles)")
    p.set_defaults(func=_cmd_list, parser=p)

    p = sub.add_parser("figures", help="run experiments and save their results and figures")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="experiments to run (default: all; see `toyrlhf list`)")
    _add_output_options(p)
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend of the experiments whose Config has a backend field "
                        "(cupy needs CuPy and a GPU; default: each Config's own, numpy)")
    p.set_defaults(func=_cmd_figures, parser=p)

    p = sub.add_parser(
        "run", help="run one experiment with Config fields set from options",
        description="Run one experiment; `toyrlhf run NAME --help` lists its Config options.")
    p.add_argument("name", metavar="NAME", help="the experiment (see `toyrlhf list`)")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="options for NAME, e.g. --beta 0.5 (see `toyrlhf run NAME --help`)")
    p.set_defaults(func=_cmd_run, parser=p)
    return parser


def _arms(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _option_spec(hint: Any) -> tuple[dict[str, Any], Callable[[Any], Any]] | None:
    """argparse keywords and a post-parse converter for a field type, or None if unsupported."""
    arms = [a for a in _arms(hint) if a is not type(None)]
    optional = len(arms) < len(_arms(hint))
    if len(arms) != 1:
        return None
    t = arms[0]
    origin, args = typing.get_origin(t), typing.get_args(t)

    def scalar(kind: type) -> Callable[[str], Any]:
        if not optional:
            return kind

        def parse(text: str) -> Any:
            return None if text.lower() == "none" else kind(text)

        parse.__name__ = kind.__name__  # argparse names the type in error messages
        return parse

    def same(x: Any) -> Any:
        return x

    if t is bool:
        return {"action": argparse.BooleanOptionalAction}, same
    if t in (int, float, str):
        return {"type": scalar(t), "metavar": t.__name__.upper()}, same
    if origin is typing.Literal and args and len({type(a) for a in args}) == 1 \
            and type(args[0]) in (int, float, str):
        return {"type": scalar(type(args[0])), "choices": args}, same
    if origin in (tuple, list) and args:
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            elem, nargs = args[0], "+"
        elif origin is list and len(args) == 1:
            elem, nargs = args[0], "+"
        elif origin is tuple and len(set(args)) == 1:
            elem, nargs = args[0], len(args)
        else:
            return None
        if elem not in (int, float, str):
            return None
        return {"type": elem, "nargs": nargs, "metavar": elem.__name__.upper()}, origin
    return None


def config_parser(
    module: ModuleType,
) -> tuple[argparse.ArgumentParser, dict[str, Callable[[Any], Any]]]:
    """Build the parser of ``toyrlhf run NAME`` from the experiment's ``Config`` dataclass.

    Each init field of type bool, int, float, str, ``Literal[...]``, ``X | None`` of those,
    ``tuple[X, ...]`` or ``list[X]`` becomes ``--field`` (and ``--field-name`` when the name has
    underscores); its help is the field's docstring plus the default.  Other fields keep
    their defaults.

    Returns
    -------
    parser : argparse.ArgumentParser
        Unset fields are absent from the parsed namespace (``default=SUPPRESS``).
    converters : dict
        Field name -> function applied to the parsed value (e.g. ``tuple`` for tuple fields).
    """
    cls = module.Config
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    docs = experiments.field_docs(cls)
    default = cls()
    parser = argparse.ArgumentParser(prog=f"toyrlhf run {module.NAME}", description=module.TITLE)
    _add_output_options(parser)
    group = parser.add_argument_group(
        "Config fields", "(unset fields keep the default of Config(), or of Config.quick())")
    converters: dict[str, Callable[[Any], Any]] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        spec = _option_spec(hints.get(f.name))
        if spec is None:
            continue
        kwargs, converters[f.name] = spec
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        text = docs.get(f.name, "").replace("%", "%%")
        text = f"{text} (default: {getattr(default, f.name)!r})".strip()
        group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=text, **kwargs)
    return parser, converters


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``toyrlhf`` console script; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    return ns.func(ns, ns.parser)  # the sub-command's parser, for its error messages


if __name__ == "__main__":
    sys.exit(main())
