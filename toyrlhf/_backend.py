"""Array namespaces: one code path for NumPy, CuPy and any array-API library.

Every kernel of toyrlhf takes its namespace ``xp`` from its inputs (:func:`array_namespace`)
and is written once with array-API operations (slicing, in-place operators, ``xp.maximum``,
``xp.exp``, ``xp.log``, ``xp.sum``, ...), so the same code runs on NumPy arrays on the CPU,
CuPy arrays on a GPU, and ``array_api_strict`` arrays in the portability tests
(``tests/test_backend.py``).  There are no per-backend copies of the maths; what may differ per
backend is *how* a level of the tree is swept (:func:`kernel_profile`: cache-sized blocks and
column-by-column reductions on the CPU, whole levels and axis reductions on a GPU, where the
number of kernel launches matters).

Rules
-----
* NumPy arrays, NumPy scalars, Python scalars and nested lists are *host data*.  Inputs that
  are all host data give ``numpy`` itself (NumPy 2's own array-API namespace), so the default
  path needs nothing beyond NumPy: ``array-api-compat`` is optional.
* Arrays of another library (CuPy, ``array_api_strict``, ...) give that library's namespace:
  ``array_api_compat.array_namespace`` when it is importable (for CuPy this is
  ``array_api_compat.cupy``), else the arrays' own ``__array_namespace__()`` (CuPy's main
  namespace for CuPy arrays without one, best effort: :func:`backend_namespace` insists on
  array-api-compat for CuPy).  Host data mixed
  with them is moved to their namespace and device by the kernels (:func:`asarray`), never the
  other way round; two different non-NumPy libraries in one call raise ``TypeError``.
* Results stay in the inputs' namespace and on their device.  Numbers that leave a kernel
  (losses, averages) are Python floats.
* Floating dtypes are kept: float32 in, float32 out (integer and boolean inputs become
  float64).  See ``tests/test_backend.py`` for the float32 tolerances.

Namespace-generic kernels
-------------------------
``tree.TokenTree.check_leaf_array``/``check_levels``/``apply_eos``; ``policies.log_softmax``,
``policy_from_logits``, ``leaf_logprobs``, ``leaf_probs``, ``aggregate_to_edges``,
``sequence_kl``, ``sequence_entropy``, ``sample_completions``, ``sample_leaves``;
``projections._lse_last``, ``soft_optimal_policy``, ``soft_log_partition``, ``gibbs_policy``,
``kl_regularized_objective``, ``implicit_reward``, ``SoftOptimalPolicyClass`` (its tree-sized
work); every loss of ``losses`` (and ``log1mexp``, ``taylor_terms``, the ``GPO_FAMILY``
functions); ``best_of_n.best_of_n_logprobs``, ``best_of_n_kl``, ``best_of_n_win_rate``.  They
need a namespace whose arrays can be written in place (NumPy, CuPy, array_api_strict): the
blocked sweeps write blocks into buffers they allocated themselves.

The host boundary
-----------------
The random number generator is always a ``numpy.random.Generator`` on the host: samplers draw
their uniforms on the host and move them to the inputs' device.  ``scipy`` (optimisers, linear
programs) and matplotlib work on host arrays: the functions that call them convert with
:func:`to_numpy`, and say so in their docstrings.

Examples
--------
>>> import numpy as np
>>> array_namespace(np.zeros(3), [1.0, 2.0]) is np
True
>>> to_numpy(np.arange(3)).tolist()
[0, 1, 2]
>>> backend_namespace("numpy") is np
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "KernelProfile",
    "array_namespace",
    "as_arrays",
    "as_float",
    "asarray",
    "backend_namespace",
    "device",
    "empty",
    "exp_floor",
    "float_dtype",
    "is_host_numpy",
    "kernel_profile",
    "to_numpy",
]

#: Names accepted by :func:`backend_namespace` (and by the experiments' ``backend`` field).
BACKENDS: tuple[str, ...] = ("numpy", "cupy", "array_api_strict")

_HOST_TYPES = (np.ndarray, np.generic, bool, int, float, complex, list, tuple)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for but its library or its device is not available here."""


def _compat():
    """``array_api_compat`` if it is installed, else ``None`` (it is an optional dependency)."""
    try:
        import array_api_compat
    except ImportError:
        return None
    return array_api_compat


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _is_foreign(x) -> bool:
    """An array of a library other than NumPy (has ``__array_namespace__``, is CuPy's, or compat knows it)."""
    if x is None or isinstance(x, _HOST_TYPES):
        return False
    if hasattr(x, "__array_namespace__") or _is_cupy(x):
        return True
    compat = _compat()
    return compat is not None and compat.is_array_api_obj(x)


def array_namespace(*arrays) -> Any:
    """The array namespace of the inputs: ``numpy`` for host data, else the arrays' library.

    Parameters
    ----------
    *arrays
        Arrays, scalars, lists or ``None`` (ignored).  NumPy arrays and Python data are host
        data and do not decide the namespace when an array of another library is present.

    Returns
    -------
    module
        ``numpy`` itself when every input is host data; otherwise the namespace of the other
        arrays (``array_api_compat.array_namespace`` when importable, else
        ``x.__array_namespace__()``).

    Raises
    ------
    TypeError
        If the inputs mix two non-NumPy array libraries.

    Examples
    --------
    >>> import numpy as np
    >>> array_namespace(np.ones(2), 3.0, None) is np
    True
    """
    foreign = [x for x in arrays if _is_foreign(x)]
    if not foreign:
        return np
    compat = _compat()
    if compat is not None:
        try:
            return compat.array_namespace(*foreign)
        except TypeError as exc:
            kinds = sorted({type(x).__module__ + "." + type(x).__name__ for x in foreign})
            raise TypeError(f"the inputs mix array libraries ({', '.join(kinds)}); "
                            "move them to one namespace first") from exc
    spaces = {}
    for x in foreign:
        get = getattr(x, "__array_namespace__", None)
        if get is not None:
            ns = get()
        else:  # CuPy < 14: its main namespace follows NumPy 2 closely enough for the kernels
            import cupy as ns
        spaces[getattr(ns, "__name__", id(ns))] = ns
    if len(spaces) > 1:
        raise TypeError(f"the inputs mix array libraries ({', '.join(map(str, spaces))}); "
                        "move them to one namespace first")
    return next(iter(spaces.values()))


def is_host_numpy(xp) -> bool:
    """Whether ``xp`` computes with NumPy on the CPU (numpy, its compat wrapper, array_api_strict)."""
    return xp is np or getattr(xp, "__name__", "") in ("array_api_compat.numpy", "array_api_strict")


def device(x):
    """The device of array ``x`` (``"cpu"`` for host data)."""
    if x is None or isinstance(x, _HOST_TYPES):
        return "cpu"
    compat = _compat()
    if compat is not None:
        return compat.device(x)
    return getattr(x, "device", "cpu")


def to_numpy(x) -> np.ndarray:
    """A NumPy array with the values of ``x``, copied to the host if ``x`` lives on a device.

    NumPy arrays are returned as they are (no copy); CuPy arrays are copied with ``.get()``;
    other array-API arrays go through DLPack (``np.from_dlpack``, which may share memory with
    ``x`` on the CPU), falling back to ``np.asarray``.

    Examples
    --------
    >>> to_numpy([1.0, 2.0]).dtype
    dtype('float64')
    """
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, _HOST_TYPES):
        return np.asarray(x)
    if _is_cupy(x):
        return x.get()
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass
        to_device = getattr(x, "to_device", None)
        if to_device is not None:
            try:
                return np.from_dlpack(to_device("cpu"))
            except Exception:  # noqa: BLE001 - fall through to the generic conversion
                pass
    return np.asarray(x)


def asarray(x, like=None, *, xp=None, dtype=None):
    """``x`` as an array of namespace ``xp`` (default: that of ``like``) on ``like``'s device.

    Host data (NumPy arrays, lists, scalars) is moved to the namespace and device; arrays
    already there are returned without a copy when ``dtype`` allows.  This is how kernels bring
    host-side constants (EOS masks, uniforms drawn by a NumPy ``Generator``) next to their inputs.
    """
    if xp is None:
        xp = np if like is None else array_namespace(like)
    if xp is np:
        return np.asarray(to_numpy(x) if _is_foreign(x) else x, dtype=dtype)
    kwargs = {} if like is None else {"device": device(like)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return xp.asarray(x, **kwargs)
    except TypeError:  # a namespace whose asarray takes no device (plain CuPy)
        kwargs.pop("device", None)
        return xp.asarray(x, **kwargs)


def empty(xp, shape, dtype, like=None):
    """``xp.empty(shape, dtype=dtype)`` on ``like``'s device."""
    if xp is np or like is None:
        return xp.empty(shape, dtype=dtype)
    try:
        return xp.empty(shape, dtype=dtype, device=device(like))
    except TypeError:  # a namespace whose empty takes no device (plain CuPy)
        return xp.empty(shape, dtype=dtype)


def as_arrays(*xs):
    """``(xp, arrays)``: the inputs' namespace and every input as an array of it.

    Host data among device arrays is moved to the namespace and device of the first of them;
    arrays already there are not copied; dtypes are kept.
    """
    xp = array_namespace(*xs)
    if xp is np:
        return xp, [np.asarray(x) for x in xs]
    like = next(x for x in xs if _is_foreign(x))
    return xp, [x if _is_foreign(x) else asarray(x, like, xp=xp) for x in xs]


def as_float(x, xp=None, like=None):
    """``x`` as a float32 or float64 array of namespace ``xp`` (other dtypes become float64).

    ``xp`` defaults to ``x``'s namespace; host data next to device arrays (``like``) is moved to
    their namespace and device.  float32 stays float32: nothing is upcast silently.
    """
    if xp is None:
        xp = array_namespace(x, like)
    if xp is np:
        a = np.asarray(x)
        return a if a.dtype in (np.float32, np.float64) else np.asarray(a, dtype=np.float64)
    a = x if _is_foreign(x) else asarray(x, like, xp=xp)
    if a.dtype not in (xp.float32, xp.float64):
        a = xp.astype(a, xp.float64)
    return a


def float_dtype(xp, *arrays):
    """The floating dtype the inputs compute in: float32 stays float32, float64 stays float64.

    Integer and boolean inputs count as float64 (the default real floating dtype); mixed
    precisions promote (float32 with float64 gives float64).
    """
    fl = [a.dtype for a in arrays if xp.isdtype(a.dtype, "real floating")]
    if len(fl) < len(arrays):
        fl.append(xp.float64)
    return xp.result_type(*fl)


def exp_floor(xp, dtype) -> float:
    """Clamp for ``exp`` arguments that are ``<= 0``: 8 nats above log(smallest normal).

    ``-700.0`` for float64 (``exp(-700) ~ 1e-304``) and ``-79.0`` for float32
    (``exp(-79) ~ 5e-35``).  Kernels compute ``exp(max(z - max_a z, floor))``: a clamped term is
    at most ``exp(floor)``, below half an ulp of the row's largest term ``exp(0) = 1`` even summed
    over ``V`` tokens, so sums are unchanged bit for bit; ``-inf`` stays harmless; and NumPy's
    SIMD ``exp`` never meets ``-inf`` or subnormal results, which send it to a slow path (3-4x).
    """
    return float(math.ceil(math.log(float(xp.finfo(dtype).smallest_normal))) + 8)


@dataclass(frozen=True)
class KernelProfile:
    """How tree kernels sweep a level; the maths is the same for every profile.

    Attributes
    ----------
    block_edges : int or None
        Edges per block of a level sweep: cache-sized blocks on the CPU (64K edges = 512 KiB
        of float64, so a block and its scratch stay in L2); ``None`` sweeps whole levels (one
        kernel launch per operation and level on a GPU).
    column_reductions : bool
        Reduce over the ``V`` tokens of a node with ``V - 1`` elementwise operations on columns
        (fast in NumPy, whose reductions over a short last axis are slow) instead of
        ``xp.max``/``xp.sum(axis=-1)`` (one launch on a GPU).
    """

    block_edges: int | None
    column_reductions: bool


#: Profile of NumPy on the CPU (numpy, array_api_compat.numpy, array_api_strict).
CPU_PROFILE = KernelProfile(block_edges=1 << 16, column_reductions=True)
#: Profile of accelerators (CuPy and any other namespace).
DEVICE_PROFILE = KernelProfile(block_edges=None, column_reductions=False)


def kernel_profile(xp) -> KernelProfile:
    """The :class:`KernelProfile` of a namespace: CPU blocks for NumPy, whole levels otherwise."""
    return CPU_PROFILE if is_host_numpy(xp) else DEVICE_PROFILE


def backend_namespace(name: str):
    """The namespace of a backend by name: ``"numpy"``, ``"cupy"`` or ``"array_api_strict"``.

    CuPy is used through ``array_api_compat.cupy`` (both come with the ``gpu`` extra).

    Raises
    ------
    ValueError
        For an unknown name.
    BackendUnavailableError
        When the backend's library is not installed, or (CuPy) no CUDA GPU is visible, or
        array-api-compat is missing; the message names the backend and what is missing.

    Examples
    --------
    >>> backend_namespace("numpy").__name__
    'numpy'
    """
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend 'cupy' needs CuPy, which is not installed ({exc}); install it on a "
                "machine with an NVIDIA GPU with `pip install 'toyrlhf[gpu]'` (cupy-cuda12x and "
                "array-api-compat), or use backend 'numpy'") from exc
        try:
            count = int(cupy.cuda.runtime.getDeviceCount())
            why = "CUDA reports 0 devices"
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, missing driver, ...
            count, why = 0, f"{type(exc).__name__}: {exc}"
        if count == 0:
            raise BackendUnavailableError(
                f"backend 'cupy' needs a CUDA GPU, but none is visible ({why}); "
                "use backend 'numpy' on this machine")
        if _compat() is None:
            raise BackendUnavailableError(
                "backend 'cupy' needs array-api-compat, which is not installed: it gives CuPy the "
                "array-API namespace the kernels use; `pip install array-api-compat` (the gpu extra "
                "installs it)")
        import array_api_compat.cupy as cupy_compat

        return cupy_compat
    if name == "array_api_strict":
        try:
            import array_api_strict
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend 'array_api_strict' needs the array-api-strict package, which is not "
                f"installed ({exc}); `pip install array-api-strict`") from exc
        return array_api_strict
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
