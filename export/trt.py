"""Optional TensorRT engine builds (GPU machines with the ``tensorrt`` Python package).

``tensorrt`` is imported only here and only when asked; without it ``--trt auto`` notes
the fact and ``--trt on`` fails with :class:`fmgs.errors.FmgsInputError`. Engines are built
from the fp32 ONNX files with the TensorRT 8.6+/10 builder API: explicit batch, one
optimisation profile with the dynamic surfel axis ``S`` in ``[1, S, S]`` (the bundle's
surfel count is the optimum and the maximum). fp16 engines: with ``BuilderFlag.FP16`` on the
fp32 graph where TensorRT has the flag (8.6-10.x; weak typing, deprecated since 10.12), else
(TensorRT 11+, where the flag is removed and every network is strongly typed) from the
bundle's fp16 ONNX model (float32 inputs/outputs kept, :func:`fmgs.export.onnx_export.convert_fp16`),
whose own types set the precision (NVIDIA's "TensorRT 10.x to 11.x" migration guide). An engine is specific to the GPU and TensorRT version that built it, so the
manifest records both and the runtime falls back to ONNX Runtime when they differ.
"""
from __future__ import annotations

from pathlib import Path

from fmgs.errors import FmgsInputError


def tensorrt_status() -> tuple[bool, str]:
    """``(available, message)``: whether ``import tensorrt`` works and a CUDA device exists."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"tensorrt is not importable ({exc.__class__.__name__}: {exc}); engines not built"
    return True, f"tensorrt {trt.__version__}"


def resolve_trt(mode: str) -> tuple[bool, str]:
    """Decide whether to build engines for ``--trt auto|on|off``.

    Returns:
        ``(build, note)``: whether to build engines, and a one-line reason for the report
        (``auto`` without TensorRT: why it is unavailable; the export continues with ONNX).

    Raises:
        FmgsInputError: ``on`` without an importable ``tensorrt``, or an unknown mode.
    """
    if mode not in ("auto", "on", "off"):
        raise FmgsInputError(f"--trt must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False, "--trt off: no TensorRT engines built"
    ok, msg = tensorrt_status()
    if not ok and mode == "on":
        raise FmgsInputError(f"--trt on: {msg}. Install TensorRT on a CUDA machine or use --trt auto/off")
    if not ok:
        return False, f"--trt auto: {msg}; the bundle runs with ONNX Runtime"
    return True, f"--trt {mode}: {msg}"


def fp16_build_mode(trt) -> str:
    """How this TensorRT builds fp16 engines: ``"flag"`` (``BuilderFlag.FP16`` on the fp32
    graph: TensorRT 8.6-10.x) or ``"strongly_typed"`` (TensorRT 11+, no such flag: the fp16
    ONNX graph is built as it is typed).

    Args:
        trt: the imported ``tensorrt`` module.
    """
    return "flag" if hasattr(trt.BuilderFlag, "FP16") else "strongly_typed"


def build_engine(onnx_path: Path, plan_path: Path, num_surfels: int, dynamic_inputs: dict[str, tuple],
                 fp16: bool = False, workspace_gib: float = 4.0, fp16_onnx_path: Path | None = None) -> dict:
    """Build and serialise one TensorRT engine.

    Args:
        onnx_path: fp32 ONNX model.
        plan_path: output ``.plan`` file.
        num_surfels: ``S`` (profile optimum and maximum).
        dynamic_inputs: ``{input name: shape with "S"}`` for the inputs with a dynamic axis.
        fp16: an fp16 engine (:func:`fp16_build_mode`: ``BuilderFlag.FP16`` on ``onnx_path``,
            or a strongly typed build of ``fp16_onnx_path``).
        workspace_gib: builder workspace limit.
        fp16_onnx_path: the fp16 copy of the model (float32 inputs/outputs); needed for an
            fp16 engine on TensorRT 11+.

    Returns:
        dict with ``file``, ``precision``, ``tensorrt`` version, ``seconds`` and, for fp16,
        ``fp16_mode``.

    Raises:
        RuntimeError: the parser or the builder failed (messages attached), or an fp16
            engine on TensorRT 11+ without ``fp16_onnx_path``.
    """
    import time

    import tensorrt as trt

    t0 = time.perf_counter()
    mode = fp16_build_mode(trt) if fp16 else None
    src = Path(onnx_path)
    if mode == "strongly_typed":
        if fp16_onnx_path is None or not Path(fp16_onnx_path).is_file():
            raise RuntimeError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16: an fp16 engine is built "
                               "from the fp16 ONNX model (fmgs-export --fp16 writes it), which is missing")
        src = Path(fp16_onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    net_flags = trt.NetworkDefinitionCreationFlag
    if hasattr(net_flags, "EXPLICIT_BATCH"):        # required before 10.0, ignored since
        flags |= 1 << int(net_flags.EXPLICIT_BATCH)
    if mode == "strongly_typed" and hasattr(net_flags, "STRONGLY_TYPED"):   # always on in 11.x
        flags |= 1 << int(net_flags.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(src.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {src}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if mode == "flag":
        config.set_flag(trt.BuilderFlag.FP16)
    if dynamic_inputs:
        prof = builder.create_optimization_profile()
        for name, shape in dynamic_inputs.items():
            lo = tuple(1 if d == "S" else int(d) for d in shape)
            hi = tuple(int(num_surfels) if d == "S" else int(d) for d in shape)
            prof.set_shape(name, lo, hi, hi)
        config.add_optimization_profile(prof)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(blob))
    info = {"file": Path(plan_path).name, "precision": "fp16" if fp16 else "fp32", "tensorrt": trt.__version__,
            "seconds": round(time.perf_counter() - t0, 2)}
    if mode:
        info["fp16_mode"] = mode
    return info
