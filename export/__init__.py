"""fmgs.export: bake a trained avatar into an engine bundle (`fmgs-export`, docs/bundle.md).

Modules: :mod:`.bake` (load a run, bake per-surfel constants), :mod:`.modules` (the exportable
nn.Modules), :mod:`.onnx_export`, :mod:`.checks` (ORT parity, skinning-bake error), :mod:`.ply`
(3DGS .ply), :mod:`.trt` (optional TensorRT), :mod:`.api` (:func:`export_run`), :mod:`.cli`.
"""
