"""Inference back-end of the runtime: ONNX Runtime sessions, or TensorRT engines on a GPU.

:func:`load_model` returns an object with ``run(feeds) -> {output name: array}``,
``input_names``, ``output_names``, ``backend`` and ``providers`` for one bundle model:

* a TensorRT engine (``*.plan`` listed in the bundle) when ``tensorrt`` and CuPy import and
  a CUDA device works (:class:`TensorRTModel`, CuPy arrays in and out);
* otherwise an ONNX Runtime session (:class:`OrtModel`) with the best providers the
  installed onnxruntime offers (TensorRT > CUDA > CPU). ``onnxruntime-gpu`` lists the CUDA
  providers even where no GPU works and then silently runs on the CPU (field notes), so
  the providers the session *actually* uses (``session.get_providers()``) are reported.

Never raises for a missing GPU: the CPU provider is always the last resort.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from fmgs.errors import FmgsInputError

__all__ = ["ort_providers", "preload_cuda_libraries", "OrtModel", "TensorRTModel", "tensorrt_status", "load_model", "check_model_io"]

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def ort_providers(prefer: str = "auto") -> list[str]:
    """Execution providers to request from ONNX Runtime, best first.

    Args:
        prefer: ``"auto"`` (TensorRT, CUDA when the installed onnxruntime lists them, then
            CPU), ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (that one then CPU).
    Returns:
        Provider names; always ends with ``"CPUExecutionProvider"``.
    Raises:
        ValueError: unknown ``prefer``.
    """
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    want = {"auto": list(_GPU_PROVIDERS), "cpu": [], "cuda": ["CUDAExecutionProvider"],
            "tensorrt": ["TensorrtExecutionProvider"]}
    if prefer not in want:
        raise ValueError(f"provider preference must be one of {sorted(want)}, got {prefer!r}")
    return [p for p in want[prefer] if p in avail] + ["CPUExecutionProvider"]


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> str:
    """Load the CUDA / cuDNN libraries of ``onnxruntime-gpu``'s CUDA provider once per process.

    ONNX Runtime >= 1.21 documents ``onnxruntime.preload_dlls()`` for finding CUDA and cuDNN
    installed as pip ``nvidia-*`` wheels (or a compatible torch's) without ``LD_LIBRARY_PATH``;
    without it a process that has not imported torch may fail to create the CUDA provider
    and silently fall back to the CPU. Called only when a GPU provider is requested
    (:class:`OrtModel`), so the CPU path never touches it. Never raises.

    Returns:
        What happened, for reports: ``"preloaded"``, ``"not available (...)"`` or the error.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return f"not available (onnxruntime {ort.__version__} has no preload_dlls; it came in 1.21)"
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 - a missing library must not stop the CPU fallback
        return f"failed ({exc.__class__.__name__}: {exc})"
    return "preloaded"


class OrtModel:
    """One ONNX model in an ONNX Runtime session.

    Args:
        path: the ``.onnx`` file.
        prefer: provider preference (:func:`ort_providers`).
        threads: intra-op threads (default: all cores, ``os.cpu_count()``).
        name: label for messages (default: the file stem).

    Attributes:
        providers: the providers the session really uses (``get_providers()``).
        backend: ``"onnxruntime"``.

    Raises:
        FmgsInputError: the file is missing or not a loadable ONNX model (named).
    """

    backend = "onnxruntime"

    def __init__(self, path, prefer: str = "auto", threads: int | None = None, name: str | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name or self.path.stem
        if not self.path.is_file():
            raise FmgsInputError("ONNX model not found", self.path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        # no busy-waiting worker threads: on a 2-core machine their spinning steals the cores
        # from skinning and llvmpipe's draw threads (measured 11.5 -> 17.1 FPS at 512^2)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        providers = ort_providers(prefer)
        #: result of :func:`preload_cuda_libraries` when a GPU provider was requested, else None
        self.preload = preload_cuda_libraries() if any(p in _GPU_PROVIDERS for p in providers) else None
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
            raise FmgsInputError(f"cannot load the ONNX model ({exc.__class__.__name__}: {exc})", self.path) from None
        self.providers = list(self.session.get_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # declared shapes: ints for fixed axes, None for dynamic ones ("S")
        self.input_shapes = {i.name: [d if isinstance(d, int) else None for d in i.shape]
                             for i in self.session.get_inputs()}
        self.output_shapes = {o.name: [d if isinstance(d, int) else None for d in o.shape]
                              for o in self.session.get_outputs()}

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run the model.

        Args:
            feeds: ``{input name: float32 array}`` (NumPy; CuPy arrays are copied to the
                host). Extra keys are ignored.
        Returns:
            ``{output name: float32 NumPy array}``.
        Raises:
            KeyError: a required input is missing.
        """
        from fmgs.runtime.xp import to_numpy

        f = {}
        for n in self.input_names:
            if n not in feeds:
                raise KeyError(f"{self.path}: model input {n!r} not provided (have {sorted(feeds)})")
            f[n] = np.ascontiguousarray(to_numpy(feeds[n]), dtype=np.float32)
        outs = self.session.run(self.output_names, f)
        return dict(zip(self.output_names, outs))


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT engines can run here (``tensorrt`` + working CuPy), and why not."""
    from fmgs.runtime.xp import cupy_status

    ok, why = cupy_status()
    if not ok:
        return False, why
    try:
        import tensorrt  # noqa: F401, PLC0415 - optional
    except Exception as exc:
        return False, f"tensorrt not importable ({exc.__class__.__name__}: {exc})"
    return True, "tensorrt + " + why


def _engine_dtype(trt, engine, name: str) -> np.dtype:
    """NumPy dtype of an engine I/O tensor (``tensorrt.nptype``); float32 where it cannot be read."""
    try:
        return np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
    except Exception:  # noqa: BLE001 - a type NumPy lacks (bf16, fp8) or an older binding
        return np.dtype(np.float32)


class TensorRTModel:
    """A serialized TensorRT engine (``*.plan``) run on CuPy arrays (TensorRT >= 10 API).

    Dynamic ``S`` axes are set from the inputs' shapes every call; outputs are allocated
    (and cached per shape) as CuPy arrays.

    Args:
        path: the ``.plan`` file (built for this GPU and TensorRT version).
        name: label for messages.

    Raises:
        FmgsInputError: unreadable or incompatible engine (named).
        RuntimeError: TensorRT / CuPy unusable (see :func:`tensorrt_status`).
    """

    backend = "tensorrt"

    def __init__(self, path, name: str | None = None):
        ok, why = tensorrt_status()
        if not ok:
            raise RuntimeError(why)
        import cupy as cp  # noqa: PLC0415
        import tensorrt as trt  # noqa: PLC0415

        self.path = Path(path)
        self.name = name or self.path.stem
        self._cp, self._trt = cp, trt
        logger = trt.Logger(trt.Logger.ERROR)
        try:
            runtime = trt.Runtime(logger)
            self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as exc:  # noqa: BLE001
            raise FmgsInputError(f"cannot load the TensorRT engine ({exc})", self.path) from None
        if self.engine is None:
            raise FmgsInputError("TensorRT could not deserialize the engine (built for another GPU or "
                                 "TensorRT version?)", self.path)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        # the engine's own I/O types (float32 for our exports, fp16 engines included; read,
        # not assumed, so an engine with half I/O gets half buffers)
        self._dtypes = {n: _engine_dtype(trt, self.engine, n) for n in names}
        self.providers = ["TensorRT"]
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._outs: dict[str, object] = {}

    def run(self, feeds: dict) -> dict:
        """Run the engine on ``{input name: array}`` (CuPy or NumPy); returns CuPy arrays."""
        cp = self._cp
        keep = []
        for n in self.input_names:
            a = cp.ascontiguousarray(cp.asarray(feeds[n], dtype=self._dtypes[n]))
            keep.append(a)
            self.context.set_input_shape(n, tuple(a.shape))
            self.context.set_tensor_address(n, a.data.ptr)
        out = {}
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            buf = self._outs.get(n)
            if buf is None or buf.shape != shape:
                buf = self._outs[n] = cp.empty(shape, dtype=self._dtypes[n])
            self.context.set_tensor_address(n, buf.data.ptr)
            out[n] = buf
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        self.stream.synchronize()
        return out


def load_model(onnx_path, engines: dict | None = None, backend: str = "auto", prefer: str = "auto",
               threads: int | None = None, name: str | None = None):
    """The best runnable form of one bundle model.

    Args:
        onnx_path: the model's ``.onnx`` file.
        engines: optional ``{precision: .plan path}`` (``Bundle.engines[name]``); fp16 is
            preferred over fp32 when both exist.
        backend: ``"auto"`` (TensorRT engine when possible, else ONNX Runtime),
            ``"onnxruntime"`` or ``"tensorrt"``.
        prefer: ONNX Runtime provider preference (:func:`ort_providers`).
        threads: ONNX Runtime intra-op threads.
        name: label.
    Returns:
        :class:`TensorRTModel` or :class:`OrtModel`.
    Raises:
        FmgsInputError: unreadable model file; ``backend="tensorrt"`` without a usable
            engine (the message says why).
    """
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ValueError(f"inference back-end must be 'auto', 'onnxruntime' or 'tensorrt', got {backend!r}")
    engines = engines or {}
    if backend in ("auto", "tensorrt") and engines:
        ok, why = tensorrt_status()
        plan = engines.get("fp16") or engines.get("fp32") or next(iter(engines.values()))
        if ok:
            return TensorRTModel(plan, name=name)
        if backend == "tensorrt":
            raise FmgsInputError(f"--inference tensorrt: the engine cannot run here ({why})", plan)
    elif backend == "tensorrt":
        raise FmgsInputError(f"--inference tensorrt: the bundle has no TensorRT engine for model "
                             f"{name or Path(onnx_path).stem!r} (re-export with fmgs-export --trt on)", onnx_path)
    return OrtModel(onnx_path, prefer=prefer, threads=threads, name=name)


def _shape_ok(declared, actual) -> bool:
    """A model's declared shape (ints, None = dynamic) admits an actual shape (None: unknown)."""
    if declared is None or actual is None:
        return True
    return len(declared) == len(actual) and all(d is None or d == a for d, a in zip(declared, actual))


def check_model_io(model, entry: dict | None, feeds: dict, outputs: tuple, path=None) -> None:
    """Check at load that a model takes what the runtime will feed it and gives what it reads.

    A model file swapped for another (or re-exported with other widths) would otherwise fail
    at the first frame with an ONNX Runtime error, or silently compute with mismatched
    inputs. Checks: every model input is one the runtime provides (``feeds``) with a
    compatible shape (fixed axes equal, dynamic axes free); the model's inputs and outputs
    are the ones the manifest entry lists (when it lists any); every name of ``outputs`` is
    produced (a tuple entry is a group of aliases, one of which must exist).

    Args:
        model: :class:`OrtModel` or :class:`TensorRTModel` (shapes are checked for ONNX
            Runtime models, which declare them).
        entry: the manifest's ``models[name]`` entry, or None.
        feeds: ``{input name: actual shape tuple, or None when unknown}`` the runtime can feed.
        outputs: required output names; an item may be a tuple of aliases.
        path: the model file, for messages (default ``model.path``).

    Raises:
        FmgsInputError: a mismatch; the message names the model file and the tensor.
    """
    path = path or getattr(model, "path", None)
    shapes = getattr(model, "input_shapes", {})
    for n in model.input_names:
        if n not in feeds:
            raise FmgsInputError(f"model input {n!r} is not one the runtime provides ({sorted(feeds)}): "
                                 "a model from another export or another kind of bundle?", path)
        if not _shape_ok(shapes.get(n), feeds[n] if feeds[n] is None else tuple(feeds[n])):
            raise FmgsInputError(f"model input {n!r} has shape {shapes[n]} (None = dynamic) but the bundle "
                                 f"provides {list(feeds[n])}", path)
    if entry:
        for key, have in (("inputs", model.input_names), ("outputs", model.output_names)):
            listed = [i.get("name") for i in entry.get(key) or [] if isinstance(i, dict)]
            if listed and sorted(listed) != sorted(have):
                raise FmgsInputError(f"model {key} {sorted(have)} differ from the manifest's {sorted(listed)}", path)
    for want in outputs:
        names = want if isinstance(want, tuple) else (want,)
        if not any(n in model.output_names for n in names):
            raise FmgsInputError(f"model has no output {' / '.join(names)!r} (outputs: {model.output_names})", path)
