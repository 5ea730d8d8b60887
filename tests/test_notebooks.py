"""The lecture notebooks run top to bottom, are stored clean, and write nowhere they should not.

Each notebook in ``notebooks/`` is executed with nbclient in a fresh kernel whose working
directory is a temporary folder.  The kernel is started from a kernelspec written for this test
run that points at ``sys.executable`` (the interpreter running pytest, e.g. ``.venv/bin/python``)
and puts the checkout first on ``PYTHONPATH``: the notebooks import the same toyrlhf as the rest
of the suite, whatever other kernels the machine has installed.  The notebooks' own ``assert``
cells (the "Try it" exercises) are part of what is tested: a failed assert is a cell error.  An
audit hook injected before the first cell fails the run if the notebook writes a file outside
its temporary folder, the system temporary folder or ``figures/``.

The clean-storage checks read the JSON directly, so they run even without nbclient.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = (
    "01_language_mdp",
    "02_information_geometry",
    "03_value_of_rl",
    "04_policy_gradients_ppo",
    "05_preference_losses_online_offline",
    "06_beyond_bradley_terry",
)
CELL_TIMEOUT = 120  # seconds per cell
KERNEL_NAME = "toyrlhf-pytest"


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ids(paths):
    return [p.stem for p in paths]


# ------------------------------------------------------------------------------ storage
def test_every_lecture_notebook_is_present():
    stems = {p.stem for p in NOTEBOOKS}
    missing = [name for name in EXPECTED if name not in stems]
    assert not missing, f"missing notebooks: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path):
    nb = _load(path)
    dirty = [
        i for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; clear them"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_structure(path):
    """Prose first, the shared plotting style, and self-checking "Try it" exercises."""
    nb = _load(path)
    cells = nb["cells"]
    src = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    code = "\n".join(s for c, s in zip(cells, src) if c["cell_type"] == "code")
    assert cells[0]["cell_type"] == "markdown" and src[0].lstrip().startswith("# "), "start with a title"
    assert "%matplotlib inline" in code and "apply_style()" in code
    try_its = [i for i, (c, s) in enumerate(zip(cells, src)) if c["cell_type"] == "markdown" and "Try it" in s]
    assert try_its, f"{path.name} has no 'Try it' exercise"
    for i in try_its:
        nxt = next((j for j in range(i + 1, len(cells)) if cells[j]["cell_type"] == "code"), None)
        assert nxt is not None and "assert" in src[nxt], f"{path.name}: 'Try it' cell {i} is not checked by an assert"
    # only the public API: no private toyrlhf modules
    assert "toyrlhf._" not in code and "tr._" not in code, f"{path.name} imports private toyrlhf modules"


# ------------------------------------------------------------------------------ execution
# Injected before the notebook's first cell: an audit hook (PEP 578) that records every file the
# kernel opens for writing, renames, removes or creates outside the allowed folders.  Checked by a
# cell injected after the last one.  Unlike comparing snapshots of the checkout, it only sees
# what the notebook's own process does, so edits made by other processes cannot fail the test.
_GUARD_SETUP = """
import os as _nbg_os, sys as _nbg_sys, tempfile as _nbg_tempfile
import matplotlib as _nbg_mpl

_nbg_allowed = tuple(_nbg_os.path.join(_nbg_os.path.realpath(p), "") for p in {allowed!r} + [
    _nbg_tempfile.gettempdir(), _nbg_mpl.get_cachedir(), _nbg_mpl.get_configdir(), "/dev"])
_nbg_violations = []
_nbg_busy = [False]
_NBG_WRITE = _nbg_os.O_WRONLY | _nbg_os.O_RDWR | _nbg_os.O_CREAT | _nbg_os.O_APPEND | _nbg_os.O_TRUNC


def _nbg_note(path):
    if isinstance(path, int) or path is None:
        return
    p = _nbg_os.path.join(_nbg_os.path.realpath(_nbg_os.fsdecode(path)), "")
    if "__pycache__" not in p.split(_nbg_os.sep) and not p.startswith(_nbg_allowed):
        _nbg_violations.append(p.rstrip(_nbg_os.sep))


def _nbg_hook(event, args):
    if _nbg_busy[0]:
        return
    _nbg_busy[0] = True
    try:
        if event == "open":
            path, mode, flags = args
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _NBG_WRITE):
                _nbg_note(path)
        elif event in ("os.rename", "os.link", "os.symlink"):
            _nbg_note(args[0]); _nbg_note(args[1])
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.utime"):
            _nbg_note(args[0])
    except Exception:
        pass
    finally:
        _nbg_busy[0] = False


_nbg_sys.addaudithook(_nbg_hook)
"""
_GUARD_CHECK = """
assert not _nbg_violations, (
    "the notebook wrote outside a temporary folder or figures/: " + repr(sorted(set(_nbg_violations))))
"""


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory):
    """A kernelspec for the interpreter running the tests, with the checkout importable."""
    base = tmp_path_factory.mktemp("kernels")
    spec_dir = base / KERNEL_NAME
    spec_dir.mkdir()
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    spec = {
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "toyrlhf (pytest)",
        "language": "python",
        "env": {
            "PYTHONPATH": pythonpath,
            "IPYTHONDIR": str(base / "ipython"),  # no history database in the user's home
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        },
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return base


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path, kernel_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(str(path), as_version=4)
    allowed = [str(tmp_path), str(ROOT / "figures"), str(kernel_dir)]
    nb.cells.insert(0, nbformat.v4.new_code_cell(_GUARD_SETUP.format(allowed=allowed)))
    nb.cells.append(nbformat.v4.new_code_cell(_GUARD_CHECK))
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    # raises CellExecutionError, naming the cell, on any error, failed assert or forbidden write
    client.execute()

    stderr = "".join(
        out.get("text", "")
        for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.get("name") == "stderr"
    )
    assert "RuntimeWarning" not in stderr, f"{path.name} emitted numerical warnings:\n{stderr}"
