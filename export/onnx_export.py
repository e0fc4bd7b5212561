"""ONNX export of the pose/view-dependent models (dynamo exporter, opset 18, dynamic ``S``).

:func:`export_models` writes ``pose_encoder.onnx``, ``geometry.onnx``, ``color.onnx`` and
optionally ``skinning.onnx`` (full model), or ``color.onnx`` alone (foundation model),
and returns their manifest ``models`` entries (input/output names, shapes with ``"S"``
for the dynamic surfel axis, dtypes, meanings). Models are traced with
``torch.onnx.export(..., dynamo=True)`` (the legacy exporter cannot export the hash
encoding's ``bitwise_xor``; see the field notes) on a small real slice of the surfels,
with ``S`` declared dynamic, and saved as single files (no external data).

Folded first layers (default, ``Baked.folded``): the graphs take ``W_1[:, :F] f`` (baked by
:func:`fmgs.export.modules.fold_first_layer`) under the same input names and add the per-frame
terms themselves, so the runtime feeds them exactly as before; each entry records
``folded_first_layer``. The graphs are also written for ONNX Runtime's CPU kernels (no
batched 3x3 MatMuls, no ``Expand``; see :mod:`fmgs.export.modules`).

Planar layout (manifest ``"layout": "planar"`` on the geometry and colour entries): every
per-surfel tensor of these graphs is ``(C, S)`` -- one contiguous row per channel, the
layout of the runtime's LBS buffers and surfel table -- and carries a ``_planar`` name
(``geometry_features_planar``, ``centers_planar_out``, ``colors_planar``, ...). The runtime
transposes the bundle's row-major channels once at load and then feeds and reads the graphs
without a per-frame transpose; ONNX Runtime runs the planar graphs faster (no interleaving
concats; measured in docs/benchmarks.md). Bundles written before carry no ``layout`` key and
row-major graphs, which the runtime still plays.

``--fp16`` (:func:`convert_fp16`): onnxruntime's ``float16`` converter rewrites the
weights and arithmetic to float16 and keeps float32 inputs/outputs (``keep_io_types``),
giving ``<name>.fp16.onnx`` beside the fp32 reference model. On the CPU ONNX Runtime runs
most float16 kernels by casting back to float32 (no speed-up; see docs/benchmarks.md);
fp16 is meant for GPUs (TensorRT builds its fp16 engines from the fp32 ONNX itself).
"""
from __future__ import annotations

import io
import logging
import contextlib
import warnings
from pathlib import Path

import torch

from fmgs.bundle import GRAPH_LAYOUTS, PLANAR
from fmgs.export.modules import (
    ColorModule,
    FoundationColorModule,
    GeometryModule,
    PlanarColorModule,
    PlanarFoundationColorModule,
    PlanarGeometryModule,
    PoseEncoderModule,
    SkinningModule,
    geometry_foldable,
)

OPSET = 18
_EXAMPLE_ROWS = 64


def _planar(a: torch.Tensor) -> torch.Tensor:
    """A row-major per-surfel tensor ``(S, ...)`` as a contiguous planar one ``(..., S)``."""
    return torch.movedim(a.detach(), 0, -1).contiguous()


def _io(name: str, shape: list, meaning: str, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, "meaning": meaning}


def _export(module: torch.nn.Module, args: tuple, names_in: list[str], names_out: list[str],
            dynamic_inputs, path: Path) -> None:
    """Export ``module(*args)`` to ``path`` with the surfel axis of ``dynamic_inputs`` dynamic ('S').

    ``dynamic_inputs``: a set of input names (their axis 0 is ``S``: row-major) or
    ``{name: axis}`` (planar inputs: the last axis).
    """
    S = torch.export.Dim("S", min=2, max=1 << 24)
    axes = dynamic_inputs if isinstance(dynamic_inputs, dict) else dict.fromkeys(dynamic_inputs, 0)
    # positional (the forward's argument names need not equal the ONNX input names)
    dyn = tuple({axes[n] % args[i].dim(): S} if n in axes else None for i, n in enumerate(names_in))
    module.eval()
    buf = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=names_in,
                                 output_names=names_out, dynamic_shapes=dyn, external_data=False,
                                 optimize=True, verbose=False)
    prog.save(str(path), external_data=False)


class _Layout:
    """Names, shapes and example tensors of one graph layout (module docstring).

    ``io(name, row_shape, meaning)``: the manifest I/O entry (planar: ``<name>_planar``, the
    ``"S"`` axis last); ``t(x)``: an example tensor in the layout; ``dyn(names)``: the dynamic
    axes for :func:`_export`.
    """

    def __init__(self, layout: str):
        if layout not in GRAPH_LAYOUTS:
            raise ValueError(f"graph layout must be one of {GRAPH_LAYOUTS}, got {layout!r}")
        self.planar = layout == PLANAR
        self.entry = {"layout": PLANAR} if self.planar else {}

    def name(self, n: str) -> str:
        """``n`` in this layout: planar ``<n>_planar``, an output ``<n>_out`` as ``<n>_planar_out``."""
        if not self.planar:
            return n
        return f"{n[:-4]}_planar_out" if n.endswith("_out") else f"{n}_planar"

    def io(self, n: str, row_shape: list, meaning: str) -> dict:
        if not self.planar or row_shape[0] != "S":
            return _io(n, row_shape, meaning)
        return _io(self.name(n), [*row_shape[1:], "S"], meaning + (", transposed" if n in _BUNDLE_CHANNELS else ""))

    def t(self, x: torch.Tensor) -> torch.Tensor:
        return _planar(x) if self.planar else x.detach().contiguous()

    def dyn(self, names: list[str]) -> dict:
        return {n: (-1 if self.planar else 0) for n in names if n != "pose_code"}


#: Graph inputs fed straight from a bundle channel of the same name (planar: transposed at load).
_BUNDLE_CHANNELS = ("geometry_features", "appearance_features", "centers", "rotations", "scales")


@torch.no_grad()
def export_foundation_models(run, baked, out_dir: Path, skinning: bool = True, layout: str = PLANAR) -> dict[str, dict]:
    """Export the foundation model's colour MLP into ``out_dir`` (``skinning`` is ignored:
    its weights are SMPL's, baked). Returns the manifest entries as
    :func:`export_full_models`."""
    lay = _Layout(layout)
    out_dir = Path(out_dir)
    m = run.model
    k = _EXAMPLE_ROWS
    entries: dict[str, dict] = {}
    fold = bool(baked.folded)
    f_c = torch.as_tensor(baked.surfels["appearance_features"][:k]).contiguous()
    Fc = int(f_c.shape[1])
    Fraw = int(baked.torch_inputs["f_c"].shape[1])
    cls = PlanarFoundationColorModule if lay.planar else FoundationColorModule
    mod = cls(m.color_mlp, m.sh_degree if m.view_dependent else -1, Fraw, folded=fold)
    view = m.view_dependent
    args = (lay.t(f_c),) + ((lay.t(torch.nn.functional.normalize(torch.randn(k, 3), dim=-1)),) if view else ())
    inputs = [lay.io("appearance_features", ["S", Fc], "surfels.safetensors appearance_features"
                     + (" (folded first layer W_1[:, :F] f_c)" if fold else " (f_c)"))]
    if view:
        inputs.append(lay.io("view_dirs", ["S", 3], "normalize(T[:3,:3]^T d), d = normalize(mu_o - camera_centre)"))
    outputs = [lay.io("colors", ["S", 3], "linear RGB in (0, 1)")]
    ins = [i["name"] for i in inputs]
    _export(mod, args, ins, [o["name"] for o in outputs], lay.dyn(ins), out_dir / "color.onnx")
    entries["color"] = {
        "file": "color.onnx", "opset": OPSET, "optional": False, **lay.entry, "inputs": inputs, "outputs": outputs,
        "view_dir_canonicalization": "transpose" if view else None, "folded_first_layer": fold,
        "equation": "foundation colour: sigmoid(MLP([f_c, SH_3(d_hat)])) (eq. 7 without z_g, Z_p)",
    }
    return entries


@torch.no_grad()
def export_full_models(run, baked, out_dir: Path, skinning: bool = True, layout: str = PLANAR) -> dict[str, dict]:
    """Export the full model's per-frame graphs into ``out_dir``: pose encoder, geometry
    residual, colour, and (``skinning``, with the skinning field on) the live skinning field.

    Args:
        run: :class:`fmgs.trainer.engine.run.LoadedRun`.
        baked: :class:`fmgs.export.bake.Baked` of the same run.
        out_dir: staging folder.
        skinning: also export the live skinning field.
        layout: ``"planar"`` (default) or ``"rows"`` geometry and colour graphs (module
            docstring; ``"rows"`` for runtimes older than the planar layout).

    Returns:
        ``{name: manifest entry}`` with ``file``, ``inputs``, ``outputs``, ``opset``,
        ``optional``, ``layout`` (planar graphs) and model-specific notes.

    Raises:
        ValueError: unknown ``layout``.
    """
    lay = _Layout(layout)
    out_dir = Path(out_dir)
    m = run.model
    k = _EXAMPLE_ROWS
    entries: dict[str, dict] = {}
    fold = bool(baked.folded)
    f_g = torch.as_tensor(baked.surfels["geometry_features"][:k]).contiguous()
    f_c = torch.as_tensor(baked.surfels["appearance_features"][:k]).contiguous()
    Fg, Fc = int(f_g.shape[1]), int(f_c.shape[1])
    fold_g = fold and geometry_foldable(m.geometry_field)
    P = int(m.cfg.pose_dim)
    L = int(m.cfg.geometry_latent_dim)
    pe = PoseEncoderModule(m.pose_encoder, baked.torch_inputs["J_hat"])
    _export(pe, (torch.eye(3).expand(24, 3, 3).contiguous(),), ["rot_mats"], ["pose_code"], set(),
            out_dir / "pose_encoder.onnx")
    entries["pose_encoder"] = {
        "file": "pose_encoder.onnx", "opset": OPSET, "optional": False,
        "inputs": [_io("rot_mats", [24, 3, 3], "local joint rotations (rodrigues of the SMPL pose); joint 0 ignored")],
        "outputs": [_io("pose_code", [1, P], "pose latent Z_p")],
        "equation": "hierarchical pose encoder (3DGS-Avatar), canonical joints baked in",
    }
    z_p = pe(torch.eye(3).expand(24, 3, 3).contiguous())
    cls = PlanarGeometryModule if lay.planar else GeometryModule
    geo = cls(m.geometry_field, L, folded=fold_g, max_displacement=m.cfg.max_displacement)
    args = (lay.t(f_g), z_p, lay.t(m.centers[:k]), lay.t(m.frames[:k]), lay.t(m.scales0[:k]))
    inputs = [lay.io("geometry_features", ["S", Fg], "surfels.safetensors geometry_features"
                     + (" (folded first layer W_1[:, :F] f_g)" if fold_g else " (f_g)")),
              _io("pose_code", [1, P], "pose_encoder output"),
              lay.io("centers", ["S", 3], "surfels.safetensors centers (m)"),
              lay.io("rotations", ["S", 3, 3], "surfels.safetensors rotations" + (" ([i, j, s] = R_s[i, j])" if lay.planar else "")),
              lay.io("scales", ["S", 2], "surfels.safetensors scales (m)")]
    if lay.planar:
        rot_out = [lay.io("t_u_out", ["S", 3], "column 0 of R' = R exp([delta_r]_x)"),
                   lay.io("t_v_out", ["S", 3], "column 1 of R' (the normal is t_u x t_v)")]
    else:
        rot_out = [_io("rotations_out", ["S", 3, 3], "R' = R exp([delta_r]_x)")]
    outputs = [lay.io("centers_out", ["S", 3], "mu' = mu + n delta_d (m)"), *rot_out,
               lay.io("scales_out", ["S", 2], "s' = s exp(delta_s) (m)"),
               lay.io("z_g", ["S", L], "geometry latent for color")]
    gin = [i["name"] for i in inputs]
    _export(geo, args, gin, [o["name"] for o in outputs], lay.dyn(gin), out_dir / "geometry.onnx")
    entries["geometry"] = {
        "file": "geometry.onnx", "opset": OPSET, "optional": False, **lay.entry, "inputs": inputs, "outputs": outputs,
        "equation": "eq. 3-6" + ("" if m.geometry_field is not None else " (field off: identity, z_g = 0)"),
        "folded_first_layer": fold_g,
    }
    view = m.appearance_field.sh_degree >= 0
    col = (PlanarColorModule if lay.planar else ColorModule)(m.appearance_field, folded=fold)
    cargs = (lay.t(f_c), lay.t(torch.zeros(k, L)), z_p) + \
        ((lay.t(torch.nn.functional.normalize(torch.randn(k, 3), dim=-1)),) if view else ())
    inputs = [lay.io("appearance_features", ["S", Fc], "surfels.safetensors appearance_features"
                     + (" (folded first layer W_1[:, :F] f_c)" if fold else " (f_c)")),
              lay.io("z_g", ["S", L], "geometry output z_g"), _io("pose_code", [1, P], "pose_encoder output")]
    if view:
        inputs.append(lay.io("view_dirs", ["S", 3], "normalize(inv(T[:3,:3]) d), d = normalize(mu_o - camera_centre)"))
    outputs = [lay.io("colors", ["S", 3], "linear RGB in (0, 1)")]
    cin = [i["name"] for i in inputs]
    _export(col, cargs, cin, [o["name"] for o in outputs], lay.dyn(cin), out_dir / "color.onnx")
    entries["color"] = {
        "file": "color.onnx", "opset": OPSET, "optional": False, **lay.entry, "inputs": inputs, "outputs": outputs,
        "view_dir_canonicalization": "inverse" if view else None, "equation": "eq. 7",
        "folded_first_layer": fold,
    }
    if skinning and m.skinning_field is not None:
        prior = bool(m.cfg.skinning_prior)
        sk = SkinningModule(m.skinning_field, prior)
        sargs = (m.centers[:k],) + ((m.skin_weights[:k],) if prior else ())
        sin = ["points"] + (["prior_weights"] if prior else [])
        _export(sk, sargs, sin, ["skin_weights"], set(sin), out_dir / "skinning.onnx")
        inputs = [_io("points", ["S", 3], "canonical positions (m), e.g. geometry centers_out (mu')")]
        if prior:
            inputs.append(_io("prior_weights", ["S", 24], "surfels.safetensors prior_skin_weights (SMPL "
                                                           "weights at the canonical centres; logits get "
                                                           "+log(prior))"))
        entries["skinning"] = {
            "file": "skinning.onnx", "opset": OPSET, "optional": True, "inputs": inputs,
            "outputs": [_io("skin_weights", ["S", 24], "W, rows sum to 1")], "equation": "eq. 9",
            "skinning_query_trained": str(m.cfg.skinning_query),
        }
    return entries


def convert_fp16(src: Path, dst: Path) -> None:
    """Write a float16 copy of the ONNX model ``src`` to ``dst`` (float32 inputs/outputs kept).

    Raises:
        RuntimeError: the converter is unavailable or fails (the caller reports it).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    onnx.save(half, str(dst))
