"""Atomic file writes and saving/loading of experiment results.

Every write goes to a temporary file in the destination's directory and is then moved into place
with :func:`os.replace`, which is atomic on POSIX and Windows: an interrupted run leaves either
the old file or the new one, never a truncated file, and no temporary file behind.

A result is a frozen dataclass whose fields are numpy arrays, numbers, strings, booleans,
``None``, lists/tuples/dicts (string keys) of those, or nested such dataclasses.  It is stored in
*one* ``.npz`` file: each array as an ``.npy`` member and everything else as a JSON member,
``__meta__.json``.  The zip entries carry a fixed timestamp, so saving the same result twice
gives the same bytes.  ``numpy.load(path)`` can still open the file.

Fields whose name starts with an underscore, and fields with ``init=False``, are treated as
caches: they are not saved and get their defaults back on loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import types
import typing
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

__all__ = ["atomic_open", "atomic_write_bytes", "save_result", "load_result"]

T = TypeVar("T")

_FORMAT = "toyrlhf.result"
_VERSION = 1
_META = "__meta__.json"
#: Fixed zip timestamp (the earliest zip allows) so that the bytes depend on the content only.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a binary file for writing that appears at ``path`` only once complete.

    Parameters
    ----------
    path : str or os.PathLike
        Destination.  Its parent directory is created if missing.

    Yields
    ------
    IO[bytes]
        A temporary file in the same directory.  On normal exit it is flushed, fsynced and
        renamed onto ``path`` with :func:`os.replace`; on an exception it is deleted and
        ``path`` is left untouched.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> with atomic_open(p) as f:
    ...     _ = f.write(b"hello")
    >>> p.read_bytes()
    b'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates files with mode 0600; give the result the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + rename).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its parent directory is created if missing.
    data : bytes
        The complete new content.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


# ----------------------------------------------------------------------------- encoding
# JSON tree: scalars as themselves; every container is a one-key dict tagged by its kind, so
# a user dict can never be mistaken for a tag:
#   {"__array__": "a0"}  {"__tuple__": [...]}  {"__list__": [...]}  {"__dict__": {...}}
#   {"__dataclass__": "Qualname", "fields": {...}}


def _saved_fields(obj_or_cls: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj_or_cls) if f.init and not f.name.startswith("_")]


class _Encoder:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)):
            return int(value) if isinstance(value, int) else float(value)
        if isinstance(value, np.generic):
            if value.dtype.kind in "biuf":
                return value.item()
            raise TypeError(f"{where}: numpy scalar of dtype {value.dtype} cannot be saved")
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"{where}: arrays of dtype object cannot be saved")
            key = f"a{len(self.arrays)}"
            self.arrays[key] = value
            return {"__array__": key}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: self.encode(getattr(value, f.name), f"{where}.{f.name}")
                      for f in _saved_fields(value)}
            return {"__dataclass__": type(value).__qualname__, "fields": fields}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return {"__list__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"{where}: dict keys must be str, got {k!r}")
                out[k] = self.encode(v, f"{where}[{k!r}]")
            return {"__dict__": out}
        raise TypeError(
            f"{where}: cannot save a value of type {type(value).__name__}; allowed are numpy "
            "arrays, numbers, str, bool, None, list/tuple/dict of those and dataclasses"
        )


def save_result(result: Any, path: str | os.PathLike[str]) -> Path:
    """Save a dataclass result to one ``.npz`` file, atomically and reproducibly.

    Parameters
    ----------
    result : dataclass instance
        Fields: numpy arrays, numbers, str, bool, None, lists/tuples/dicts (str keys) of
        those, or nested dataclasses of the same kind.
    path : str or os.PathLike
        Destination, conventionally ending in ``.npz``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError
        If ``result`` is not a dataclass instance or holds a value that cannot be saved
        (the message names the field).  Nothing is written in that case.

    Examples
    --------
    >>> import dataclasses, tempfile, pathlib, numpy as np
    >>> @dataclasses.dataclass(frozen=True)
    ... class R:
    ...     x: np.ndarray
    ...     name: str
    >>> p = save_result(R(np.arange(3.0), "demo"), pathlib.Path(tempfile.mkdtemp()) / "r.npz")
    >>> load_result(R, p).name
    'demo'
    """
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        raise TypeError(f"result must be a dataclass instance, got {type(result).__name__}")
    enc = _Encoder()
    tree = enc.encode(result, type(result).__qualname__)
    meta = {"format": _FORMAT, "version": _VERSION,
            "class": f"{type(result).__module__}:{type(result).__qualname__}", "data": tree}
    meta_bytes = json.dumps(meta, sort_keys=True, indent=1).encode()

    def info(name: str) -> zipfile.ZipInfo:
        zi = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
        zi.external_attr = 0o644 << 16
        return zi

    with atomic_open(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(info(_META), meta_bytes)
        for key, arr in enc.arrays.items():
            with zf.open(info(f"{key}.npy"), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)
    return Path(path)


# ----------------------------------------------------------------------------- decoding
def _arms(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a ``Union``/``X | None`` hint, else ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotation: fall back to lookup by name
        return {}


class _Decoder:
    def __init__(self, arrays: dict[str, np.ndarray], home: type) -> None:
        self.arrays = arrays
        self.home = home

    def _find_class(self, qualname: str, hint: Any, where: str) -> type:
        for arm in _arms(hint):
            if isinstance(arm, type) and dataclasses.is_dataclass(arm) \
                    and arm.__qualname__ == qualname:
                return arm
        # Fallback: a class of that name in the module of the class being loaded.
        obj: Any = sys.modules.get(self.home.__module__)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            return obj
        raise TypeError(
            f"{where}: cannot find dataclass {qualname!r}; annotate the field with its type"
        )

    def _container_args(self, hint: Any, origin: type) -> tuple[Any, ...] | None:
        for arm in _arms(hint):
            if typing.get_origin(arm) is origin:
                return typing.get_args(arm)
        return None

    def decode(self, node: Any, hint: Any, where: str) -> Any:
        if not isinstance(node, dict):
            return node
        (tag,) = [k for k in node if k.startswith("__")]
        if tag == "__array__":
            return self.arrays[node["__array__"]]
        if tag == "__dataclass__":
            cls = self._find_class(node["__dataclass__"], hint, where)
            return self.dataclass(cls, node["fields"], where)
        if tag == "__tuple__":
            args = self._container_args(hint, tuple) or ()
            items = node["__tuple__"]
            if len(args) == 2 and args[1] is Ellipsis:
                hints = [args[0]] * len(items)
            elif len(args) == len(items):
                hints = list(args)
            else:
                hints = [None] * len(items)
            return tuple(self.decode(v, h, f"{where}[{i}]")
                         for i, (v, h) in enumerate(zip(items, hints)))
        if tag == "__list__":
            args = self._container_args(hint, list) or (None,)
            return [self.decode(v, args[0], f"{where}[{i}]")
                    for i, v in enumerate(node["__list__"])]
        if tag == "__dict__":
            args = self._container_args(hint, dict) or (None, None)
            return {k: self.decode(v, args[1], f"{where}[{k!r}]")
                    for k, v in node["__dict__"].items()}
        raise ValueError(f"{where}: unknown tag {tag!r} in saved result")

    def dataclass(self, cls: type, fields: dict[str, Any], where: str) -> Any:
        hints = _hints(cls)
        expected = {f.name for f in _saved_fields(cls)}
        if set(fields) != expected:
            raise ValueError(
                f"{where}: saved fields {sorted(fields)} do not match {cls.__qualname__}'s "
                f"fields {sorted(expected)}; re-run the experiment to refresh the result"
            )
        kwargs = {name: self.decode(value, hints.get(name), f"{where}.{name}")
                  for name, value in fields.items()}
        return cls(**kwargs)


def load_result(cls: type[T], path: str | os.PathLike[str]) -> T:
    """Load a result saved by :func:`save_result`.

    Parameters
    ----------
    cls : type
        The dataclass that was saved.  Nested dataclasses are found from its field
        annotations (or, failing that, by name in ``cls``'s module).
    path : str or os.PathLike
        A file written by :func:`save_result`.

    Returns
    -------
    cls
        A new instance equal to the one saved (arrays compare equal element-wise).

    Raises
    ------
    ValueError
        If the file is not a toyrlhf result, was saved from another class, or its fields
        do not match ``cls``'s.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if _META not in names:
            raise ValueError(f"{path} is not a toyrlhf result (no {_META})")
        meta = json.loads(zf.read(_META))
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError(f"{path}: unsupported result format "
                             f"{meta.get('format')!r} version {meta.get('version')!r}")
        want = f"{cls.__module__}:{cls.__qualname__}"
        if meta["class"] != want:
            raise ValueError(f"{path} holds a {meta['class']}, not a {want}")
        arrays = {}
        for name in names - {_META}:
            with zf.open(name) as member:
                arrays[name.removesuffix(".npy")] = np.lib.format.read_array(
                    member, allow_pickle=False)
    tree = meta["data"]
    return _Decoder(arrays, cls).dataclass(cls, tree["fields"], cls.__qualname__)
