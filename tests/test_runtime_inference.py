"""ONNX Runtime provider set-up of the runtime (:mod:`fmgs.runtime.inference`) and the
TensorRT fp16 build mode of the exporter (:mod:`fmgs.export.trt`): the CPU path never
touches the CUDA library preloading; the GPU-only halves run where their packages are."""
from __future__ import annotations

import numpy as np
import pytest


def _tiny_onnx(path):
    """A real one-node ONNX model, y = 2 x, (S, 3) float32."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "g", [x], [y], [two])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_cpu_sessions_do_not_preload_cuda_libraries(tmp_path):
    import onnxruntime as ort

    from fmgs.runtime.inference import OrtModel

    m = OrtModel(_tiny_onnx(tmp_path / "m.onnx"), prefer="cpu", threads=1)
    assert m.providers == ["CPUExecutionProvider"] and m.preload is None
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(m.run({"x": x})["y"], 2 * x)
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        # the CPU build of onnxruntime: "auto" asks for no GPU provider, so nothing is preloaded
        assert OrtModel(tmp_path / "m.onnx", prefer="auto", threads=1).preload is None


def test_preload_reports_and_never_raises():
    from fmgs.runtime.inference import preload_cuda_libraries

    note = preload_cuda_libraries()
    assert note == "preloaded" or note.startswith(("not available", "failed"))


def test_tensorrt_fp16_mode_follows_the_installed_version():
    """TensorRT 11 removed ``BuilderFlag.FP16`` (strongly typed networks only); 8.6-10.x keep it."""
    trt = pytest.importorskip("tensorrt")
    from fmgs.export.trt import fp16_build_mode

    major = int(trt.__version__.split(".")[0])
    assert fp16_build_mode(trt) == ("strongly_typed" if major >= 11 else "flag")
