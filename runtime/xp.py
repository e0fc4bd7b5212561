"""Array back-end of the runtime: NumPy everywhere, CuPy on an NVIDIA GPU, chosen at run time.

The per-frame array code (:mod:`fmgs.runtime.pipeline`) is written once against the
NumPy API subset that CuPy implements; :func:`get_array_module` returns the module to
use. CuPy is an optional import: it is used only when it imports, sees a CUDA device and
can run a kernel (``cupy-cuda12x`` installs on CPU-only machines and fails only at the
first kernel, so that is tested here).
"""
from __future__ import annotations

import functools
from types import ModuleType

import numpy as np

__all__ = ["get_array_module", "cupy_status", "to_numpy", "is_cupy", "same_module", "copy_into"]


@functools.lru_cache(maxsize=1)
def cupy_status() -> tuple[bool, str]:
    """Whether CuPy can be used, and why not.

    Returns:
        ``(True, "cupy X on <device>")`` or ``(False, reason)``; never raises.
    """
    try:
        import cupy as cp  # noqa: PLC0415 - optional dependency
    except Exception as exc:  # ImportError or a broken CUDA install
        return False, f"cupy not importable ({exc.__class__.__name__}: {exc})"
    try:
        n = cp.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "cupy sees no CUDA device"
        x = cp.arange(8, dtype=cp.float32)
        if float((x * 2).sum()) != 56.0:
            return False, "cupy kernel returned a wrong result"
        name = cp.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return True, f"cupy {cp.__version__} on {name}"
    except Exception as exc:  # no driver, no device, kernel compile failure
        return False, f"cupy cannot run on this machine ({exc.__class__.__name__}: {exc})"


def get_array_module(name: str = "auto") -> ModuleType:
    """The array module for per-frame work.

    Args:
        name: ``"numpy"``, ``"cupy"`` or ``"auto"`` (CuPy when :func:`cupy_status` says it
            works, else NumPy).
    Returns:
        ``numpy`` or ``cupy``.
    Raises:
        ValueError: unknown name.
        RuntimeError: ``"cupy"`` requested but unusable (the reason is in the message).
    """
    if name == "numpy":
        return np
    if name not in ("cupy", "auto"):
        raise ValueError(f"array back-end must be 'numpy', 'cupy' or 'auto', got {name!r}")
    ok, why = cupy_status()
    if ok:
        import cupy as cp  # noqa: PLC0415

        return cp
    if name == "cupy":
        raise RuntimeError(f"array back-end 'cupy' requested but {why}")
    return np


def is_cupy(a) -> bool:
    """True for a CuPy array (without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def to_numpy(a) -> np.ndarray:
    """Host NumPy copy/view of a NumPy or CuPy array."""
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def same_module(a, xp: ModuleType) -> bool:
    """True when array ``a`` belongs to array module ``xp`` (a CuPy array and ``cupy``, or a
    NumPy array and ``numpy``): ``xp``'s functions can then write into it with ``out=``."""
    return is_cupy(a) == (xp.__name__.split(".")[0] == "cupy")


def copy_into(dst, src) -> None:
    """Copy ``src`` into ``dst`` (same shape) whichever of host (NumPy) and device (CuPy)
    memory each lives in: one device-to-host or host-to-device transfer, no intermediate
    array where ``dst`` is C-contiguous (e.g. a block of whole rows of a renderer table).

    Args:
        dst: NumPy or CuPy array, written in place.
        src: NumPy or CuPy array of ``dst``'s shape; cast to ``dst``'s dtype.

    Raises:
        ValueError: the shapes differ.
    """
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"copy_into: shapes differ, {tuple(dst.shape)} <- {tuple(src.shape)}")
    src_dev, dst_dev = is_cupy(src), is_cupy(dst)
    if src_dev == dst_dev:                      # same memory: the module's own copy
        mod = _cupy() if dst_dev else np
        mod.copyto(dst, src, casting="unsafe")
    elif src_dev:                               # device -> host (cupy.ndarray.get)
        if dst.flags.c_contiguous and src.dtype == dst.dtype:
            src.get(out=dst)
        else:
            np.copyto(dst, src.get(), casting="unsafe")
    else:                                       # host -> device (cupy.ndarray.set)
        host = np.ascontiguousarray(src, dtype=dst.dtype)
        if dst.flags.c_contiguous:
            dst.set(host)
        else:
            dst[...] = _cupy().asarray(host)


def _cupy() -> ModuleType:
    import cupy as cp  # noqa: PLC0415 - only reached with CuPy arrays in hand

    return cp
