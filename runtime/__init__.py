"""fmgs.runtime: the torch-free playback runtime (``fmgs-play``). Must never import torch.

Modules: :mod:`~fmgs.runtime.xp` (NumPy / CuPy), :mod:`~fmgs.runtime.inference` (ONNX Runtime /
TensorRT), :mod:`~fmgs.runtime.pipeline` (pose -> models -> LBS), :mod:`~fmgs.runtime.gl_renderer`
(moderngl 2DGS surfels), :mod:`~fmgs.runtime.app` / :mod:`~fmgs.runtime.cli` (window / headless).
"""
