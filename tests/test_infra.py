"""Tests of the infrastructure: atomic I/O, results, plotting, progress, registry and CLI.

The CLI is tested end to end on a fake experiment written into a temporary file and
registered by monkeypatching :data:`toyrlhf.experiments.MODULES` and ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from toyrlhf import _io, experiments, plotting
from toyrlhf._io import atomic_open, atomic_write_bytes, load_result, save_result
from toyrlhf.cli import main
from toyrlhf.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]


def _tempfiles(directory: Path) -> list[Path]:
    """Leftover temporary files of atomic writes (hidden ``.NAME.*.tmp``) under ``directory``."""
    return [p for p in directory.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.bin"
    assert atomic_write_bytes(target, b"first") == target
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert _tempfiles(tmp_path) == []
    # Normal permissions, not mkstemp's 0600.
    assert target.stat().st_mode & 0o044 == 0o644 & ~_io._umask() & 0o044


def test_atomic_write_interrupted_keeps_old_file_and_no_temp(tmp_path: Path,
                                                              monkeypatch) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk vanished"):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_atomic_open_exception_midway_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "y.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_rejects_str(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(tmp_path / "z", "text")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class Inner:
    beta: float
    grid: np.ndarray
    tag: str | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner
    values: np.ndarray
    counts: np.ndarray
    mask: np.ndarray
    n: int
    ok: bool
    nothing: None
    scores: tuple[float, ...]
    names: list[str]
    table: dict[str, np.ndarray]
    runs: tuple[Inner, ...]
    maybe: Inner | None
    _cache: dict = dataclasses.field(default_factory=dict)


def _outer() -> Outer:
    grid = np.linspace(0.0, 1.0, 4)
    return Outer(
        inner=Inner(0.1, grid, "a"),
        values=np.array([[-np.inf, 0.5], [np.nan, 1e-300]]),
        counts=np.arange(6, dtype=np.int32).reshape(2, 3),
        mask=np.array([True, False]),
        n=7,
        ok=True,
        nothing=None,
        scores=(0.1, float("inf"), -0.0),
        names=["x", "y"],
        table={"k": np.ones(2), "empty": np.zeros((0, 3))},
        runs=(Inner(1.0, grid[:2]), Inner(2.0, grid[2:], None)),
        maybe=Inner(3.0, np.array(5.0)),
        _cache={"not": "saved"},
    )


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            if not f.name.startswith("_"):
                _assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    else:
        assert a == b and repr(a) == repr(b)  # repr distinguishes -0.0 from 0.0


def test_result_roundtrip_preserves_types_and_values(tmp_path: Path) -> None:
    original = _outer()
    path = save_result(original, tmp_path / "r.npz")
    loaded = load_result(Outer, path)
    _assert_same(original, loaded)
    assert loaded._cache == {}  # private fields are caches: back to their default
    assert isinstance(loaded.runs, tuple) and isinstance(loaded.names, list)
    assert isinstance(loaded.runs[0], Inner) and isinstance(loaded.maybe, Inner)


def test_result_bytes_are_reproducible_and_numpy_readable(tmp_path: Path) -> None:
    a = save_result(_outer(), tmp_path / "a.npz").read_bytes()
    b = save_result(_outer(), tmp_path / "b.npz").read_bytes()
    assert a == b
    with np.load(tmp_path / "a.npz") as npz:  # still a valid npz for plain numpy
        assert any(npz[k].shape == (2, 3) for k in npz.files if k.startswith("a"))
    assert _tempfiles(tmp_path) == []


def test_save_result_rejects_unsupported_values_and_writes_nothing(tmp_path: Path) -> None:
    bad = dataclasses.replace(_outer(), names=["x", object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"names\[1\]"):
        save_result(bad, tmp_path / "bad.npz")
    with pytest.raises(TypeError, match="dtype object"):
        save_result(dataclasses.replace(_outer(), values=np.array([None])), tmp_path / "b.npz")
    with pytest.raises(TypeError, match="dataclass instance"):
        save_result({"not": "a dataclass"}, tmp_path / "c.npz")
    assert list(tmp_path.iterdir()) == []


def test_load_result_checks_class_and_format(tmp_path: Path) -> None:
    path = save_result(Inner(0.5, np.zeros(2)), tmp_path / "inner.npz")
    with pytest.raises(ValueError, match="not a"):
        load_result(Outer, path)
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.zeros(2))
    with pytest.raises(ValueError, match="not a toyrlhf result"):
        load_result(Inner, plain)


# ----------------------------------------------------------------------------- plotting
def _demo_figure():
    with plotting.style():
        fig, axes = plotting.new_figure(1, 2)
        x = np.linspace(0, 1, 30)
        axes[0].plot(x, x**2, label="square")
        axes[0].legend()
        axes[0].set_title("a title")
        axes[1].imshow(np.outer(x, x))
        axes[1].set_xlabel(r"$\beta$")
    return fig


def test_save_figure_is_bit_for_bit_reproducible(tmp_path: Path) -> None:
    fig = _demo_figure()
    png1, svg1 = plotting.save_figure(fig, tmp_path / "one")
    png2, svg2 = plotting.save_figure(fig, tmp_path / "two.png")  # suffix is dropped
    png3, svg3 = plotting.save_figure(_demo_figure(), tmp_path / "three")  # rebuilt figure
    assert (png1.name, svg1.name, png2.name, svg2.name) == ("one.png", "one.svg",
                                                            "two.png", "two.svg")
    assert png1.read_bytes() == png2.read_bytes() == png3.read_bytes()
    assert svg1.read_bytes() == svg2.read_bytes() == svg3.read_bytes()
    assert png1.read_bytes().startswith(b"\x89PNG")
    assert b"Software" not in png1.read_bytes()
    assert b"<dc:date>" not in svg1.read_bytes() and b"<svg" in svg1.read_bytes()
    assert _tempfiles(tmp_path) == []


def test_save_figure_is_reproducible_across_processes(tmp_path: Path) -> None:
    """Two interpreters with different hash seeds write identical files."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from toyrlhf import plotting
        with plotting.style():
            fig, ax = plotting.new_figure()
            ax.plot(np.arange(5), np.arange(5) ** 2, label="sq")
            ax.fill_between(np.arange(5), 0, np.arange(5))
            ax.legend()
        plotting.save_figure(fig, sys.argv[1])
    """)
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(
            [str(REPO), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], env=env,
                       check=True)
    for ext in ("png", "svg"):
        assert (tmp_path / f"1.{ext}").read_bytes() == (tmp_path / f"2.{ext}").read_bytes()


def test_save_figure_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pdf"):
        plotting.save_figure(_demo_figure(), tmp_path / "f", formats=("pdf",))


def test_new_figure_shapes_style_and_layout() -> None:
    fig, axes = plotting.new_figure(2, 3)
    assert axes.shape == (2, 3)
    assert fig.get_size_inches() == pytest.approx((3 * plotting.PANEL_SIZE[0],
                                                    2 * plotting.PANEL_SIZE[1]))
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    _, ax = plotting.new_figure()
    (line,) = ax.plot([0, 1], [0, 1])
    assert line.get_color().lower() == plotting.COLORS[0].lower()  # shared colour cycle
    assert ax.xaxis.get_gridlines()[0].get_visible()  # grid on
    with pytest.raises(ValueError, match="nrows"):
        plotting.new_figure(0, 1)


# ----------------------------------------------------------------------------- progress
class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_tty_and_when_enabled(monkeypatch) -> None:
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(progress_bar(range(5), enabled=True, desc="work")) == [0, 1, 2, 3, 4]
    assert "work" in tty.getvalue()

    quiet = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert list(progress_bar(iter("ab"), enabled=False, total=2)) == ["a", "b"]
    assert quiet.getvalue() == ""

    pipe = io.StringIO()  # not a TTY: quiet even when enabled
    monkeypatch.setattr(sys, "stderr", pipe)
    bar = progress_bar(range(3), enabled=True, desc="work")
    bar.set_postfix(loss=1.0)  # a no-op, but must not fail
    assert sum(bar) == 3
    assert pipe.getvalue() == ""


# ----------------------------------------------------------------------------- fake experiment
FAKE_SOURCE = '''
"""A fake experiment used to test the infrastructure."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from toyrlhf.plotting import new_figure, style
from toyrlhf.progress import progress_bar

NAME = "fake"
TITLE = "A fake experiment for the tests"


@dataclasses.dataclass(frozen=True)
class Config:
    """Configuration of the fake experiment."""

    n: int = 40
    """Number of points on each curve."""
    beta: float = 0.5
    """KL coefficient (100% made up)."""
    label: str = "curve"
    """Legend label."""
    log_scale: bool = False
    """Draw the y axis on a log scale."""
    betas: tuple[float, ...] = (0.1, 1.0)
    """Decay rates, one curve each."""
    mode: Literal["exact", "sampled"] = "exact"
    """How to compute."""
    seed: int | None = None
    """Seed, or None."""

    def __post_init__(self):
        if self.n < 2:
            raise ValueError(f"n must be >= 2, got {self.n}")

    @classmethod
    def quick(cls) -> Config:
        return cls(n=5)


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    x: np.ndarray
    y: np.ndarray
    summary: dict[str, float]


def run(config: Config, progress: bool = False) -> Result:
    x = np.linspace(0.0, 1.0, config.n)
    y = np.stack([config.beta * np.exp(-x / b)
                  for b in progress_bar(config.betas, progress, desc="betas")])
    return Result(config, x, y, {"max": float(y.max())})


def plot_curves(result: Result, ax) -> None:
    for b, row in zip(result.config.betas, result.y):
        ax.plot(result.x, row, label=f"{result.config.label} {b}")
    if result.config.log_scale:
        ax.set_yscale("log")
    ax.legend()


def figure(result: Result):
    with style():
        fig, ax = new_figure()
        plot_curves(result, ax)
    return fig
'''


@pytest.fixture
def fake(tmp_path_factory, monkeypatch) -> ModuleType:
    """Register the fake experiment as ``toyrlhf.experiments.fake``."""
    path = tmp_path_factory.mktemp("fakemod") / "fake.py"
    path.write_text(textwrap.dedent(FAKE_SOURCE))
    name = f"{experiments.__name__}.fake"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(experiments, "MODULES", ("fake",))
    return module


def test_registry_get_and_unknown_name(fake: ModuleType) -> None:
    assert experiments.names() == ("fake",)
    assert experiments.get("fake") is fake
    assert list(experiments.all_experiments()) == ["fake"]
    with pytest.raises(KeyError, match="known experiments: fake"):
        experiments.get("nope")


def test_registry_rejects_malformed_module(fake: ModuleType, monkeypatch) -> None:
    monkeypatch.setattr(fake, "NAME", "other")
    monkeypatch.delattr(fake, "figure")
    with pytest.raises(TypeError, match=r"NAME must be 'fake'.*figure\(\) is missing"):
        experiments.get("fake")


def test_field_docs_read_from_source(fake: ModuleType) -> None:
    docs = experiments.field_docs(fake.Config)
    assert docs["n"] == "Number of points on each curve."
    assert docs["beta"] == "KL coefficient (100% made up)."
    assert set(docs) == {f.name for f in dataclasses.fields(fake.Config)}
    assert experiments.field_docs(Inner) == {}  # fields without docstrings


# ----------------------------------------------------------------------------- CLI
def test_cli_list(fake: ModuleType, capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.split() == ["fake", *TITLE_WORDS]


TITLE_WORDS = "A fake experiment for the tests".split()


def test_cli_figures_end_to_end(fake: ModuleType, tmp_path: Path, capsys) -> None:
    out = tmp_path / "figs"
    assert main(["figures", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("fake") and " s " in printed and "1 figure(s)" in printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["fake.png", "fake.svg", "results/fake.npz"]
    result = load_result(fake.Result, out / "results" / "fake.npz")
    assert result.config == fake.Config.quick()
    assert result.y.shape == (2, 5)
    np.testing.assert_array_equal(result.y, fake.run(fake.Config.quick()).y)


def test_cli_figures_rerun_is_bit_for_bit(fake: ModuleType, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    res = tmp_path / "res_b"
    assert main(["figures", "fake", "--quick", "--out", str(a)]) == 0
    assert main(["figures", "fake", "--quick", "--out", str(b), "--results", str(res)]) == 0
    for rel_a, rel_b in [("fake.png", "fake.png"), ("fake.svg", "fake.svg")]:
        assert (a / rel_a).read_bytes() == (b / rel_b).read_bytes()
    assert (a / "results" / "fake.npz").read_bytes() == (res / "fake.npz").read_bytes()
    assert not (b / "results").exists()
    assert _tempfiles(tmp_path) == []


def test_cli_full_config_differs_from_quick(fake: ModuleType, tmp_path: Path) -> None:
    assert main(["figures", "--out", str(tmp_path)]) == 0
    assert load_result(fake.Result, tmp_path / "results" / "fake.npz").x.shape == (40,)


def test_cli_unknown_name_exits_2_listing_known(fake: ModuleType, tmp_path: Path,
                                                capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["figures", "fake", "nope", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "known experiments: fake" in err
    assert list(tmp_path.iterdir()) == []  # checked before anything ran
    with pytest.raises(SystemExit) as info:
        main(["run", "nope"])
    assert info.value.code == 2


def test_cli_run_overrides_config_fields(fake: ModuleType, tmp_path: Path) -> None:
    argv = ["run", "fake", "--quick", "--out", str(tmp_path), "--n", "7", "--beta", "0.25",
            "--betas", "0.2", "0.3", "0.4", "--mode", "sampled", "--log-scale",
            "--seed", "none", "--label", "hi"]
    assert main(argv) == 0
    config = load_result(fake.Result, tmp_path / "results" / "fake.npz").config
    assert config == fake.Config(n=7, beta=0.25, betas=(0.2, 0.3, 0.4), mode="sampled",
                                 log_scale=True, seed=None, label="hi")
    assert main(["run", "fake", "--out", str(tmp_path), "--seed", "3", "--no-log_scale"]) == 0
    config = load_result(fake.Result, tmp_path / "results" / "fake.npz").config
    assert config == fake.Config(seed=3)


@pytest.mark.parametrize("bad", [["--mode", "guess"], ["--n", "1"], ["--n", "x"],
                                 ["--nope", "1"]])
def test_cli_run_bad_values_exit_2(fake: ModuleType, tmp_path: Path, bad: list[str],
                                   capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "fake", "--out", str(tmp_path), *bad])
    assert info.value.code == 2
    assert "toyrlhf run fake" in capsys.readouterr().err
    assert not tmp_path.joinpath("fake.png").exists()


def test_cli_run_help_shows_field_docstrings(fake: ModuleType, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "fake", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Number of points on each curve. (default: 40)" in out
    assert "KL coefficient (100% made up). (default: 0.5)" in out
    assert "--log-scale" in out and "{exact,sampled}" in out


def test_python_m_toyrlhf_and_light_import() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "toyrlhf", "--version"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "toyrlhf 0.1.0", done.stderr
    code = ("import sys, toyrlhf, toyrlhf.cli, toyrlhf.experiments; "
            "print(sorted(m for m in ('matplotlib', 'cupy', 'torch', 'jax') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- real experiments
@pytest.mark.parametrize("name", experiments.names())
def test_registered_experiment_quick_roundtrip(name: str, tmp_path: Path) -> None:
    """Every registered experiment follows the protocol at its quick size."""
    module = experiments.get(name)
    result = module.run(module.Config.quick())
    first = save_result(result, tmp_path / "r1.npz")
    again = save_result(load_result(type(result), first), tmp_path / "r2.npz")
    assert first.read_bytes() == again.read_bytes()  # lossless round trip
    pngs = [plotting.save_figure(module.figure(result), tmp_path / f"f{i}")[0]
            for i in range(2)]
    assert pngs[0].read_bytes() == pngs[1].read_bytes()
    with zipfile.ZipFile(first) as zf:
        assert "__meta__.json" in zf.namelist()
