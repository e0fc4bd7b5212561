"""Restricted, chumpy-free pickle loading for SMPL models and HumanNeRF metadata.

SMPL model files from the SMPL site are Python-2 pickles whose arrays are
``chumpy.ch.Ch`` objects, and ZJU-MoCap / HumanNeRF metadata (``cameras.pkl``,
``mesh_infos.pkl``, ``canonical_joints.pkl``) are plain pickles of dicts of
numpy arrays. Plain :func:`pickle.load` on such files would (a) need chumpy
installed and (b) execute any callable a malicious file names (``os.system``,
``builtins.eval``, ...). This module unpickles them with an allow-list:

* builtin containers and primitives (``dict``, ``list``, ``tuple``, ``set``,
  ``frozenset``, ``int``, ``float``, ``complex``, ``bool``, ``str``, ``bytes``,
  ``bytearray``, ``slice``, ``object``) and ``collections.OrderedDict``;
* numpy array / dtype / scalar reconstruction (both the ``numpy.core`` and the
  NumPy-2 ``numpy._core`` module paths);
* ``_codecs.encode`` restricted to the latin-1 codec (Python-3 protocol-0..2
  pickles of ``bytes`` use it);
* ``copyreg._reconstructor`` restricted to allowed classes (protocol-0/1
  pickles of plain objects use it);
* the scipy.sparse ``csc_matrix`` / ``csr_matrix`` / ``coo_matrix`` classes,
  under any of their historical module paths;
* every ``chumpy.*`` global, mapped to :class:`ChumpyStub`, a local stand-in
  that only stores its pickled state (chumpy's ``Ch`` pickles its value as the
  state key ``'x'``); :func:`to_numpy_tree` turns stubs into numpy arrays.

Anything else raises :class:`fmgs.errors.FmgsInputError` naming the file and
the forbidden global, before the global is imported or called. Allowed callables
that could be asked for huge zero-filled memory (``bytes(n)``, ``bytearray(n)``,
``numpy.ndarray(shape)``, ``_reconstruct`` shapes) are bounded by
:data:`MAX_DECLARED_BYTES`; so is densifying a declared sparse shape.
"""
from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import importlib
import io
import os
import pickle
from typing import Any, Callable

import numpy as np

from fmgs.errors import FmgsInputError

__all__ = ["ChumpyStub", "load_pickle", "to_numpy_tree"]


class ChumpyStub:
    """Inert stand-in for any pickled ``chumpy`` object (``chumpy.ch.Ch`` etc.).

    Instances never run chumpy code: construction arguments and the pickled
    state are only stored. ``chumpy.ch.Ch`` pickles (via ``object.__reduce_ex__``)
    as ``cls.__new__(cls)`` followed by ``__setstate__(state)`` where ``state``
    is its ``__dict__``; the array value lives under the key ``'x'``.

    Attributes:
        chumpy_class: the dotted chumpy name the pickle referred to
            (class attribute, e.g. ``"chumpy.ch.Ch"``).
        args: positional arguments the pickle constructed the object with.
        kwargs: keyword arguments the pickle constructed the object with.
        state: the pickled state as given to ``__setstate__`` (usually a dict),
            or None when the pickle carried none.
    """

    chumpy_class = "chumpy"

    def __new__(cls, *args: Any, **kwargs: Any) -> "ChumpyStub":
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Arguments were recorded by __new__; nothing to run.
        pass

    def __setstate__(self, state: Any) -> None:
        """Store the pickled state as-is (never executes anything)."""
        self.state = state

    def __repr__(self) -> str:
        keys = sorted(self.state) if isinstance(self.state, dict) else type(self.state).__name__
        return f"<ChumpyStub {self.chumpy_class} state={keys}>"


_STUB_CACHE: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    """One :class:`ChumpyStub` subclass per chumpy dotted name (cached)."""
    dotted = f"{module}.{name}"
    cls = _STUB_CACHE.get(dotted)
    if cls is None:
        cls = type(f"ChumpyStub_{name}", (ChumpyStub,), {"chumpy_class": dotted})
        _STUB_CACHE[dotted] = cls
    return cls


class _Forbidden(pickle.UnpicklingError):
    """A construct the allow-list refuses (reported as such, not as corruption)."""


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to what pickles of ``bytes`` use (latin-1)."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(obj, str):
        raise _Forbidden(f"_codecs.encode with codec {encoding!r} is not allowed")
    return obj.encode("latin-1", errors)


_BUILTINS_ALLOWED = (
    "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
    "bool", "str", "bytes", "bytearray", "slice", "object",
)

_SPARSE_NAMES = ("csc_matrix", "csr_matrix", "coo_matrix")
_SPARSE_MODULES = (
    "scipy.sparse", "scipy.sparse._csc", "scipy.sparse._csr", "scipy.sparse._coo",
    "scipy.sparse.csc", "scipy.sparse.csr", "scipy.sparse.coo",
    "scipy.sparse.compressed", "scipy.sparse._compressed",
)


def _numpy_multiarray() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")


def _numpy_numeric() -> Any:
    try:
        return importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.numeric")


def _allowed_classes() -> tuple[type, ...]:
    """Classes that ``copyreg._reconstructor`` may build."""
    import scipy.sparse as sp

    return (ChumpyStub, sp.csc_matrix, sp.csr_matrix, sp.coo_matrix, collections.OrderedDict)


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` admitting only allowed classes with base ``object``."""
    if not (isinstance(cls, type) and issubclass(cls, _allowed_classes())) or base is not object:
        raise _Forbidden(f"copyreg._reconstructor of {cls!r} (base {base!r}) is not allowed")
    return copyreg._reconstructor(cls, base, state)


#: Largest array / buffer a pickle may *declare* without storing its bytes (``bytes(n)``,
#: ``numpy.ndarray(shape)``, ``_reconstruct`` shapes), and largest sparse matrix
#: :func:`to_numpy_tree` densifies. Real arrays carry their bytes in the file, so a declared
#: size beyond this is a crafted file that would exhaust memory.
MAX_DECLARED_BYTES = 1 << 30
#: Deepest container nesting :func:`to_numpy_tree` walks (SMPL / HumanNeRF pickles: < 5).
MAX_DEPTH = 100


def _declared_bytes(shape: Any, itemsize: int = 1) -> int:
    """Bytes an array of ``shape`` would need; raises _Forbidden for a malformed shape."""
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise _Forbidden(f"array shape {shape!r} is not a tuple of non-negative integers")
    total = max(int(itemsize), 1)
    for d in dims:
        total *= d
    return total


def _sized(kind: str, nbytes: int) -> None:
    if nbytes > MAX_DECLARED_BYTES:
        raise _Forbidden(f"{kind} declares {nbytes:,} bytes without storing them "
                         f"(limit {MAX_DECLARED_BYTES:,}): a crafted file")


def _safe_bytes_factory(cls: type) -> Callable[..., Any]:
    """``bytes`` / ``bytearray`` refusing ``cls(n)`` for a huge ``n`` (zero-filled, no data)."""
    def make(*args: Any) -> Any:
        if args and isinstance(args[0], int):
            _sized(cls.__name__, args[0])
        return cls(*args)
    make.__name__ = cls.__name__
    return make


def _safe_ndarray(shape: Any = (), dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
    """``numpy.ndarray(shape, ...)`` called by a pickle: refuses huge declared shapes."""
    _sized("numpy.ndarray", _declared_bytes(shape, np.dtype(dtype).itemsize))
    return np.ndarray(shape, dtype, *args, **kwargs)


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy ... _reconstruct`` (how ndarrays pickle) with a bounded initial shape."""
    if subtype is _safe_ndarray:
        subtype = np.ndarray
    if not (isinstance(subtype, type) and issubclass(subtype, np.ndarray)):
        raise _Forbidden(f"_reconstruct of {subtype!r} is not allowed")
    _sized("numpy array", _declared_bytes(shape, 1))
    return _numpy_multiarray()._reconstruct(subtype, shape, dtype)


_SAFE_BUILTINS = {"bytes": _safe_bytes_factory(bytes), "bytearray": _safe_bytes_factory(bytearray)}


def _resolve(module: str, name: str) -> Callable[..., Any] | type | None:
    """The object an allowed ``(module, name)`` global stands for, or None if forbidden."""
    if module == "builtins" and name in _SAFE_BUILTINS:
        return _SAFE_BUILTINS[name]
    if module == "builtins" and name in _BUILTINS_ALLOWED:
        return getattr(__import__("builtins"), name)
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "copyreg" and name == "_reconstructor":
        return _safe_reconstructor
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module == "numpy" and name == "ndarray":
        return _safe_ndarray
    if module == "numpy" and name == "dtype":
        return np.dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
        return _safe_reconstruct
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
        return _numpy_multiarray().scalar
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return getattr(_numpy_numeric(), name)
    if module in _SPARSE_MODULES and name in _SPARSE_NAMES:
        import scipy.sparse as sp

        return getattr(sp, name)
    if module == "chumpy" or module.startswith("chumpy."):
        return _stub_class(module, name)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` consults the allow-list of :func:`_resolve`."""

    def __init__(self, file: io.BufferedIOBase, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        # Python-2 names (``__builtin__``, ``copy_reg``) -> Python-3 names, as
        # the stock Unpickler does with fix_imports=True.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _resolve(module, name)
        if obj is None:
            raise FmgsInputError(
                f"refusing to load pickle: forbidden global '{module}.{name}' "
                "(only numpy arrays, scipy sparse matrices, builtin containers and chumpy arrays are allowed)",
                self._path,
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise FmgsInputError(f"refusing to load pickle: persistent id {pid!r} is not supported", self._path)


def load_pickle(path: str | os.PathLike) -> object:
    """Load a pickle with the restricted, chumpy-free unpickler.

    Reads Python-2 (``encoding='latin1'``) and Python-3 pickles of protocol 0-5.
    Chumpy objects come back as :class:`ChumpyStub` instances: pass the result
    through :func:`to_numpy_tree` to obtain plain numpy arrays. Nothing outside
    the allow-list in this module's docstring is imported or called.

    Args:
        path: the pickle file, e.g. an SMPL ``SMPL_NEUTRAL.pkl`` or a HumanNeRF
            ``cameras.pkl`` / ``mesh_infos.pkl``.

    Returns:
        The unpickled object (dicts, lists, numpy arrays with their stored
        dtypes, scipy sparse matrices, :class:`ChumpyStub` instances).

    Raises:
        FmgsInputError: the file is missing or unreadable; the pickle names a
            forbidden global (the message names it); or the file is corrupt or
            truncated. The message always starts with the file path.
    """
    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise FmgsInputError("pickle file not found (no such file)", spath)
    try:
        with open(spath, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise FmgsInputError(f"cannot read pickle file: {exc.strerror or exc}", spath) from exc
    if not data:
        raise FmgsInputError("corrupt or truncated pickle: the file is empty", spath)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), spath).load()
    except FmgsInputError:
        raise
    except _Forbidden as exc:
        raise FmgsInputError(f"refusing to load pickle: {exc}", spath) from exc
    except RecursionError as exc:
        raise FmgsInputError("corrupt pickle: nesting too deep", spath) from exc
    except Exception as exc:  # noqa: BLE001 - only allow-listed constructors ran: any error is a corrupt file
        raise FmgsInputError(f"corrupt or truncated pickle ({type(exc).__name__}: {exc})", spath) from exc


def _chumpy_value(stub: ChumpyStub, path: str | None) -> np.ndarray:
    """The array value of a chumpy stub (state key ``'x'``, else the only array)."""
    state = stub.state
    # A (dict_state, slot_state) pair is what objects with __slots__ pickle as.
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
        merged: dict = {}
        for part in state:
            merged.update(part or {})
        state = merged
    value: Any = None
    if isinstance(state, dict):
        if "x" in state:
            value = state["x"]
        else:
            arrays = [v for v in state.values() if isinstance(v, (np.ndarray, ChumpyStub))]
            if len(arrays) == 1:
                value = arrays[0]
    elif isinstance(state, (np.ndarray, ChumpyStub)):
        value = state
    elif state is None and len(stub.args) == 1:
        value = stub.args[0]
    if value is None:
        desc = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise FmgsInputError(
            f"cannot convert pickled chumpy object {stub.chumpy_class} to an array "
            f"(no 'x' value in its state; state: {desc})",
            path,
        )
    if isinstance(value, ChumpyStub):
        return _chumpy_value(value, path)
    return np.asarray(value)


def _rebuild_sparse(mat: Any) -> Any:
    """Re-create a scipy sparse matrix from its attributes (robust to old pickles)."""
    import scipy.sparse as sp

    d = mat.__dict__
    shape = d.get("_shape", d.get("shape"))
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(v, (int, np.integer)) and 0 <= v < 2**31 for v in shape)):
        raise ValueError(f"sparse matrix shape {shape!r} is not two non-negative 32-bit integers")
    fmt = type(mat).__name__
    if fmt == "coo_matrix":
        if "coords" in d:  # scipy >= 1.13 stores a (row, col) tuple
            row, col = d["coords"]
        else:
            row, col = d["row"], d["col"]
        return sp.coo_matrix((np.asarray(d["data"]), (np.asarray(row), np.asarray(col))), shape=shape)
    cls = sp.csc_matrix if fmt == "csc_matrix" else sp.csr_matrix
    return cls((np.asarray(d["data"]), np.asarray(d["indices"]), np.asarray(d["indptr"])), shape=shape)


def to_numpy_tree(obj: Any, densify_sparse: bool = False, path: str | os.PathLike | None = None) -> Any:
    """Recursively replace chumpy stubs by numpy arrays.

    Dicts (keeping their type when it is ``dict``/``OrderedDict``), lists and
    tuples are walked; :class:`ChumpyStub` objects become ``np.ndarray``
    (their pickled ``'x'`` value, dtype as stored, usually float64); scipy
    sparse matrices are rebuilt from their stored ``data``/``indices``/
    ``indptr`` (or ``row``/``col``) so that pickles from old scipy versions
    work, and are densified to ``np.ndarray`` when ``densify_sparse`` is true.
    Everything else is returned unchanged.

    Args:
        obj: what :func:`load_pickle` returned.
        densify_sparse: turn scipy sparse matrices into dense ``np.ndarray``.
        path: the file the object came from, only used in error messages.

    Returns:
        The converted tree (new containers; arrays are not copied).

    Raises:
        FmgsInputError: a chumpy object carries no recognisable array value, a
            sparse matrix is missing its arrays or declares a shape whose dense form
            exceeds :data:`MAX_DECLARED_BYTES`, or containers nest deeper than
            :data:`MAX_DEPTH` (or hold themselves) (the message names ``path``).
    """
    spath = None if path is None else os.fspath(path)
    return _tree(obj, densify_sparse, spath, 0)


def _tree(obj: Any, densify_sparse: bool, spath: str | None, depth: int) -> Any:
    import scipy.sparse as sp

    if depth > MAX_DEPTH:
        raise FmgsInputError(f"corrupt pickle: containers nested deeper than {MAX_DEPTH} levels "
                             "(or a container that holds itself)", spath)
    if isinstance(obj, ChumpyStub):
        try:
            return _chumpy_value(obj, spath)
        except RecursionError:
            raise FmgsInputError("corrupt pickle: chumpy objects nested too deeply", spath) from None
        except (ValueError, TypeError) as exc:  # np.asarray of a ragged / odd value
            raise FmgsInputError(f"corrupt chumpy value in pickle ({type(exc).__name__}: {exc})", spath) from exc
    if sp.issparse(obj):
        try:
            mat = _rebuild_sparse(obj)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise FmgsInputError(f"corrupt sparse matrix in pickle ({type(exc).__name__}: {exc})", spath) from exc
        if densify_sparse:
            nbytes = int(mat.shape[0]) * int(mat.shape[1]) * mat.dtype.itemsize
            if nbytes > MAX_DECLARED_BYTES:
                raise FmgsInputError(f"sparse matrix of shape {mat.shape} would need {nbytes:,} bytes dense "
                                     f"(limit {MAX_DECLARED_BYTES:,}): not a body-model matrix", spath)
            return mat.toarray()
        return mat
    d = depth + 1
    if isinstance(obj, dict):
        items = ((k, _tree(v, densify_sparse, spath, d)) for k, v in obj.items())
        return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [_tree(v, densify_sparse, spath, d) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_tree(v, densify_sparse, spath, d) for v in obj)
    return obj
